//! `cargo xtask bench --only sockmap`: the socket fast path's effect, before and after in one
//! run. Two identical simulated clusters (two nodes, mTLS tunnels) run side by side, their node
//! proxies started without and with `--sockmap`; each repeat measures, interleaved, the same
//! node and the cross-node mesh path on both (1 KiB request/response at a fixed rate: latency
//! from the scheduled start and proxy CPU; then bulk throughput), beside the direct path.
//! The fast path's kernel counters are read from the `--sockmap` cluster afterwards, so the
//! report shows the bytes really took it.
use std::path::Path;

use mesh_e2e::SimCluster;
use serde_json::{Value, json};

use crate::{
    bench::{Path4, measure, spec, start_servers},
    bench_account::spread,
    bench_overhead::mesh_groups,
    bench_util::write_json,
};

/// A cluster whose node proxies run with `extra` arguments.
fn cluster(extra: &[&str]) -> anyhow::Result<SimCluster> {
    let mut s = spec(true, false);
    s.start_proxies = false;
    let c = SimCluster::start(s)?;
    for i in 0..c.nodes.len() {
        c.start_proxy_with(i, extra)?;
    }
    start_servers(&c)?;
    Ok(c)
}

fn paths(c: &SimCluster) -> Vec<Path4> {
    let mesh = mesh_groups(c);
    vec![
        Path4 { name: "direct, same node", client: "client-direct", target: format!("{}:7000", c.pod("srv-a").ip), mesh: false, groups: vec![] },
        Path4 { name: "mesh, same node", client: "client-mesh", target: "10.96.1.1:80".into(), mesh: true, groups: mesh.clone() },
        Path4 { name: "mesh, cross node", client: "client-mesh", target: "10.96.1.2:80".into(), mesh: true, groups: mesh },
    ]
}

fn fast_path(c: &SimCluster, i: usize) -> Value {
    c.meshctl(i, &["-o", "json", "bpf"])
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .map(|v| v["fast_path"].clone())
        .unwrap_or(Value::Null)
}

pub fn run(json_out: &Path, seconds: u64, repeats: usize) -> anyhow::Result<()> {
    let repeats = repeats.max(1);
    eprintln!("bench sockmap: two clusters, node proxies without and with --sockmap...");
    let tcp = cluster(&[])?;
    let fast = cluster(&["--sockmap"])?;
    let state = fast_path(&fast, 0);
    if state["state"] != "active" {
        eprintln!("bench sockmap: the fast path is not active on this kernel ({state}); the 'sockmap' rows measure the TCP path");
    }
    let (tcp_paths, fast_paths) = (paths(&tcp), paths(&fast));
    // runs[rep][row]: rows are (mode, path) in the order printed below.
    let mut runs: Vec<Vec<Value>> = Vec::new();
    for rep in 0..repeats {
        eprintln!("bench sockmap: repeat {}/{repeats}", rep + 1);
        let mut rows = Vec::new();
        for i in 0..tcp_paths.len() {
            rows.push(measure(&tcp, &tcp_paths[i], seconds)?);
            if i > 0 {
                rows.push(measure(&fast, &fast_paths[i], seconds)?);
            }
        }
        runs.push(rows);
    }
    let counters = fast_path(&fast, 0);
    drop(fast);
    drop(tcp);
    let names = ["direct, same node", "mesh TCP, same node", "mesh sockmap, same node", "mesh TCP, cross node", "mesh sockmap, cross node"];
    let col = |i: usize, k: &str| -> Vec<f64> { runs.iter().map(|rows| rows[i][k].as_f64().unwrap_or(f64::NAN)).collect() };
    println!("\nsocket fast path, before (TCP) and after (--sockmap), same run; 1 KiB rr at 1000 rps over 4 conns for {seconds} s, {repeats} repeat(s): median [min-max]");
    println!("{:<26} {:>22} {:>22} {:>22} {:>20} {:>20}", "path", "p50 ms", "p99 ms", "bulk Gbit/s", "proxy vCPU-s/1k", "node vCPU-s/1k");
    let mut table = Vec::new();
    for (i, name) in names.iter().enumerate() {
        println!(
            "{:<26} {:>22} {:>22} {:>22} {:>20} {:>20}",
            name,
            spread(&col(i, "p50_ms")).show(3),
            spread(&col(i, "p99_ms")).show(3),
            spread(&col(i, "bulk_gbit_s")).show(2),
            spread(&col(i, "vcpu_s_per_1k_requests")).show(3),
            spread(&col(i, "node_vcpu_s_per_1k_requests")).show(3),
        );
        table.push(json!({
            "path": name,
            "p50_ms": spread(&col(i, "p50_ms")).to_json(),
            "p99_ms": spread(&col(i, "p99_ms")).to_json(),
            "bulk_gbit_s": spread(&col(i, "bulk_gbit_s")).to_json(),
            "vcpu_s_per_1k_requests": spread(&col(i, "vcpu_s_per_1k_requests")).to_json(),
            "node_vcpu_s_per_1k_requests": spread(&col(i, "node_vcpu_s_per_1k_requests")).to_json(),
        }));
    }
    let ratio = |a: usize, b: usize, k: &str| -> Vec<f64> { col(a, k).iter().zip(col(b, k)).map(|(x, y)| x / y.max(1e-9)).collect() };
    let diff = |a: usize, b: usize, k: &str| -> Vec<f64> { col(a, k).iter().zip(col(b, k)).map(|(x, y)| x - y).collect() };
    println!(
        "sockmap vs TCP: same node p50 {} ms, bulk x{}, proxy CPU x{}; cross node p50 {} ms, bulk x{}, proxy CPU x{}",
        spread(&diff(2, 1, "p50_ms")).show(3),
        spread(&ratio(2, 1, "bulk_gbit_s")).show(2),
        spread(&ratio(2, 1, "vcpu_s_per_1k_requests")).show(2),
        spread(&diff(4, 3, "p50_ms")).show(3),
        spread(&ratio(4, 3, "bulk_gbit_s")).show(2),
        spread(&ratio(4, 3, "vcpu_s_per_1k_requests")).show(2),
    );
    let c = &counters["counters"];
    println!(
        "fast path on node-a: {}, {} writes / {:.1} MiB redirected in the kernel, {} written before the peer joined",
        counters["state"],
        c["redirected_msgs"],
        c["redirected_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0),
        c["unpaired_msgs"]
    );
    write_json(json_out, &json!({"repeats": repeats, "seconds": seconds, "table": table, "runs": runs, "fast_path_node_a": counters}))?;
    Ok(())
}
