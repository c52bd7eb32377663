//! `cargo xtask bench`: 1 KiB request/response latency at a fixed rate and bulk throughput,
//! direct pod-to-pod vs through the mesh, same node and cross node, in one run.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use mesh_e2e::{ClusterSpec, SimCluster};
use serde_json::{Value, json};

const RATE: u64 = 1000;
const BULK_BYTES: u64 = 1 << 30;

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("direct", false)
        .pod("client-mesh", "mesh", 0, "client", 9000)
        .pod("client-direct", "direct", 0, "client", 9000)
        .pod("srv-a", "mesh", 0, "srv-a", 7000)
        .pod("srv-b", "mesh", 1, "srv-b", 7000)
        .service("srv-a", "mesh", [10, 96, 1, 1], "srv-a", 80, 7000)
        .service("srv-b", "mesh", [10, 96, 1, 2], "srv-b", 80, 7000)
}

struct Path4 {
    name: &'static str,
    client: &'static str,
    target: String,
}

pub fn run(json_out: &Path, seconds: u64) -> anyhow::Result<()> {
    eprintln!("bench: building two simulated nodes...");
    let c = SimCluster::start(spec())?;
    c.start_servers()?;
    let paths = [
        Path4 { name: "direct, same node", client: "client-direct", target: format!("{}:7000", c.pod("srv-a").ip) },
        Path4 { name: "mesh, same node", client: "client-mesh", target: "10.96.1.1:80".into() },
        Path4 { name: "direct, cross node", client: "client-direct", target: format!("{}:7000", c.pod("srv-b").ip) },
        Path4 { name: "mesh, cross node", client: "client-mesh", target: "10.96.1.2:80".into() },
    ];
    let timeout = Duration::from_secs(seconds + 60);
    let mut rows = Vec::new();
    for p in &paths {
        eprintln!("bench: {} ({} -> {})", p.name, p.client, p.target);
        // Warm up connections and caches, then measure.
        c.probe(p.client, &["rr", &p.target, "--rate", "500", "--seconds", "1", "--conns", "4"], timeout)?;
        let rr: Value = serde_json::from_str(c.probe(p.client, &["rr", &p.target, "--rate", &RATE.to_string(), "--seconds", &seconds.to_string(), "--conns", "4", "--size", "1024"], timeout)?.trim())?;
        let bulk: Value = serde_json::from_str(c.probe(p.client, &["bulk", &p.target, "--bytes", &BULK_BYTES.to_string()], timeout)?.trim())?;
        rows.push(json!({
            "path": p.name,
            "rate_rps": RATE,
            "requests": rr["requests"],
            "p50_ms": rr["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
            "p90_ms": rr["p90_us"].as_f64().unwrap_or(0.0) / 1000.0,
            "p99_ms": rr["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
            "bulk_gbit_s": bulk["mbit_per_s"].as_f64().unwrap_or(0.0) / 1000.0,
        }));
    }
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    drop(c);

    println!("\n{:<20} {:>9} {:>9} {:>9} {:>12}", "path (1 KiB rr)", "p50 ms", "p90 ms", "p99 ms", "bulk Gbit/s");
    for r in &rows {
        println!(
            "{:<20} {:>9.3} {:>9.3} {:>9.3} {:>12.2}",
            r["path"].as_str().unwrap_or(""),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p90_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["bulk_gbit_s"].as_f64().unwrap_or(0.0)
        );
    }
    let f = |i: usize, k: &str| rows[i][k].as_f64().unwrap_or(0.0);
    let same_added = f(1, "p50_ms") - f(0, "p50_ms");
    let cross_added = f(3, "p50_ms") - f(2, "p50_ms");
    let cross_tput = f(3, "bulk_gbit_s") / f(2, "bulk_gbit_s").max(1e-9);
    let same_tput = f(1, "bulk_gbit_s") / f(0, "bulk_gbit_s").max(1e-9);
    println!("\nmesh adds p50: same node {same_added:+.3} ms, cross node {cross_added:+.3} ms (target: cross node <= 0.100 ms)");
    println!("mesh keeps bulk throughput: same node {:.0}%, cross node {:.0}% (target: cross node >= 50%)", same_tput * 100.0, cross_tput * 100.0);
    let report = json!({
        "rows": rows,
        "cross_node_added_p50_ms": cross_added,
        "same_node_added_p50_ms": same_added,
        "cross_node_throughput_ratio": cross_tput,
        "same_node_throughput_ratio": same_tput,
        "targets": {"cross_node_added_p50_ms_max": 0.1, "cross_node_throughput_ratio_min": 0.5},
        "node_stats": stats,
    });
    if let Some(dir) = json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(json_out, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", json_out.display()))?;
    println!("wrote {}", json_out.display());
    Ok(())
}
