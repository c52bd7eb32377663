//! `cargo xtask bench abuse`: a legitimate client at 500 requests/s through the mesh while an
//! attacker pod on the same node misbehaves, phase by phase: 20,000 idle connections, slowloris
//! headers, 1 MiB uploads that never finish, a flood of failing TLS handshakes on the other
//! node's tunnel port, a gRPC upstream failing each call with a status text of its own. Per phase: the client's success rate and p99 (against twice its quiet
//! p99), both node proxies' peak RSS (against the memory budget) and open descriptors, and what
//! the attacker managed.
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::bench_util::{ms, ok_count, probe_json, rss_mib, verdict, write_json};

const RATE: u64 = 500;
const VIP: &str = "10.96.3.1";
const EVIL_VIP: &str = "10.96.3.2";
/// gRPC's 17 codes and "unknown", the only `grpc_response_status` values the proxy may export.
const GRPC_STATUS_LABELS_MAX: usize = 18;
/// `mesh-node run --memory-budget-mib`'s default, which the proxies here run with.
const BUDGET_MIB: f64 = 192.0;
const TARGET_SUCCESS: f64 = 0.999;
const TARGET_P99_FACTOR: f64 = 2.0;
/// After the attacks, what each proxy may still hold beyond its quiet-phase RSS (the metric
/// series and caches the attacks legitimately grew, not their connections' buffers).
const SETTLED_MARGIN_MIB: f64 = 16.0;

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("lemo", true)
        .pod("bff", "lemo", 0, "bff", 9000)
        .pod("attacker", "lemo", 0, "attacker", 9100)
        .pod_labelled("web-1", "lemo", 1, "web", &[], "http", 8080)
        .pod_labelled("web-2", "lemo", 0, "web", &[], "http", 8080)
        .service_named("web", "lemo", [10, 96, 3, 1], "web", "http", 80, 8080)
        .pod_labelled("evil", "lemo", 1, "evil", &[], "grpc", 9090)
        .service_named("evil", "lemo", [10, 96, 3, 2], "evil", "grpc", 9090, 9090)
}

/// (phase, attacker mode, target, connections or loops)
fn phases(c: &SimCluster) -> Vec<(&'static str, Option<&'static str>, String, u64)> {
    let web = format!("{VIP}:80");
    let tunnel = format!("{}:15008", c.node(1).ip);
    vec![
        ("quiet", None, String::new(), 0),
        ("20000 idle connections", Some("idle"), web.clone(), 20_000),
        ("slowloris, 2000 connections", Some("slowloris"), web.clone(), 2_000),
        ("1 MiB uploads never finished, 500", Some("upload"), web, 500),
        ("failing TLS handshakes on 15008, 64 loops", Some("tls-garbage"), tunnel, 64),
        ("gRPC, a new status text per call, 800/s", Some("grpc-calls"), format!("http://{EVIL_VIP}:9090/grpc"), 8),
    ]
}

/// The `mesh-node` process of node i's proxy container (not the `unshare` around it).
pub(crate) fn node_proxy_pid(c: &SimCluster, i: usize) -> Option<u32> {
    let procs = std::fs::read_to_string(c.node(i).cgroup.join("mesh-node").join("cgroup.procs")).ok()?;
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "mesh-node"))
}

/// Node i's proxy's metric series: how many, how many distinct `grpc_response_status` values,
/// and the series it refused over its cap.
fn series_json(c: &SimCluster, i: usize) -> Value {
    let Ok(text) = c.metrics(i) else { return json!({"error": "metrics not scraped"}) };
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let statuses: std::collections::HashSet<&str> = samples
        .iter()
        .filter_map(|l| l.split("grpc_response_status=\"").nth(1)?.split('"').next())
        .collect();
    let overflow = samples
        .iter()
        .find(|l| l.starts_with("mesh_metric_series_overflow_total"))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    json!({"series": samples.len(), "grpc_status_labels": statuses.len(), "overflow": overflow})
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub fn run(json_out: &Path, seconds: u64) -> anyhow::Result<()> {
    eprintln!("bench abuse: bff calls web at {RATE} rps while an attacker pod on the same node misbehaves...");
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    for name in ["web-1", "web-2"] {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080", "--body-bytes", "1024"], 8080)?;
    }
    c.serve_in_pod("evil", &probe, &["http-serve", "--name", "evil", "--port", "9090", "--grpc-status-unique"], 9090)?;
    let pids: Vec<u32> = (0..2).filter_map(|i| node_proxy_pid(&c, i)).collect();
    anyhow::ensure!(pids.len() == 2, "both node proxies should run");
    let url = format!("http://{VIP}/");
    let count = (RATE * seconds).to_string();
    let rate = RATE.to_string();
    let mut rows = Vec::new();
    let mut quiet_p99 = 0.0;
    for (name, mode, target, n) in phases(&c) {
        // The attacker first, given two seconds to open its connections.
        let attacker = match mode {
            Some(mode) => {
                // Niced: on this 2-core VM the attacker's own CPU would otherwise be what slows
                // the client, which a pod with CPU limits on a real node could not do.
                let probe_path = probe.to_string_lossy().into_owned();
                let args = ["-n", "19", probe_path.as_str(), "abuse", mode, target.as_str(), "--count", &n.to_string(), "--seconds", &(seconds + 4).to_string()];
                let child = c.spawn_piped("attacker", Path::new("nice"), &args)?;
                std::thread::sleep(Duration::from_secs(2));
                Some(child)
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (stop, pids) = (stop.clone(), pids.clone());
            std::thread::spawn(move || {
                let mut peak = vec![(0.0f64, 0usize); pids.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (i, pid) in pids.iter().enumerate() {
                        peak[i].0 = peak[i].0.max(rss_mib(*pid));
                        peak[i].1 = peak[i].1.max(fds(*pid));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                peak
            })
        };
        let load = probe_json(&c, "bff", &["http", &url, "--count", &count, "--rate", &rate, "--conns", "4", "--timeout-ms", "5000"], Duration::from_secs(seconds + 60))?;
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.join().unwrap_or_default();
        let attack: Value = match attacker {
            Some(child) => {
                let out = child.wait_with_output()?;
                serde_json::from_slice(&out.stdout).unwrap_or(json!({"error": String::from_utf8_lossy(&out.stdout).to_string()}))
            }
            None => Value::Null,
        };
        let requests = load["requests"].as_u64().unwrap_or(0).max(1);
        let success = ok_count(&load) as f64 / requests as f64;
        let p99 = ms(&load, "p99_us");
        if mode.is_none() {
            quiet_p99 = p99;
        }
        let rss_after: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
        let series: Vec<Value> = (0..2).map(|i| series_json(&c, i)).collect();
        let row = json!({
            "metric_series": series,
            "phase": name, "success_rate": success, "p99_ms": p99, "p50_ms": ms(&load, "p50_us"),
            "late_starts": load["late_starts"],
            "proxy_peak_rss_mib": peak.iter().map(|p| p.0).collect::<Vec<_>>(),
            "proxy_rss_after_mib": rss_after,
            "proxy_peak_fds": peak.iter().map(|p| p.1).collect::<Vec<_>>(),
            "attacker": attack,
        });
        eprintln!("  {name}: success {:.3}%, p99 {p99:.2} ms, node-a proxy peak {:.0} MiB / {} fds, attacker {attack}", success * 100.0, peak[0].0, peak[0].1);
        rows.push(row);
        // Let the proxies shed what the phase left (connections closed, buffers freed).
        std::thread::sleep(Duration::from_secs(2));
    }
    let stats = [c.stats(0).ok(), c.stats(1).ok()];
    // Every attacker gone: give the allocator trimmer (every 5 s) its turn, then look again.
    std::thread::sleep(Duration::from_secs(7));
    let settled: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    let quiet_rss: Vec<f64> = rows.first().and_then(|r| r["proxy_rss_after_mib"].as_array()).into_iter().flatten().filter_map(Value::as_f64).collect();
    let settled_ok = settled.iter().zip(&quiet_rss).all(|(s, q)| *s <= q + SETTLED_MARGIN_MIB);

    println!("\nabuse: {RATE} rps from bff to web (2 pods, 2 nodes) for {seconds} s per phase; attacker pod on node-a");
    println!("{:<42} {:>9} {:>9} {:>16} {:>10}  attacker (connected / failed / alive at end)", "phase", "success", "p99 ms", "peak RSS a/b MiB", "peak fds a");
    let mut all_met = true;
    for r in &rows {
        let success = r["success_rate"].as_f64().unwrap_or(0.0);
        let p99 = r["p99_ms"].as_f64().unwrap_or(0.0);
        let rss: Vec<f64> = r["proxy_peak_rss_mib"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
        let a = &r["attacker"];
        let labels_ok = r["metric_series"].as_array().into_iter().flatten().all(|s| s["grpc_status_labels"].as_u64().unwrap_or(0) as usize <= GRPC_STATUS_LABELS_MAX);
        let ok = success >= TARGET_SUCCESS && p99 <= quiet_p99 * TARGET_P99_FACTOR && rss.iter().all(|m| *m <= BUDGET_MIB) && labels_ok;
        all_met &= ok;
        println!(
            "{:<42} {:>8.3}% {:>9.2} {:>7.0} / {:<6.0} {:>10}  {} / {} / {}  {}",
            r["phase"].as_str().unwrap_or(""),
            success * 100.0,
            p99,
            rss.first().copied().unwrap_or(0.0),
            rss.get(1).copied().unwrap_or(0.0),
            r["proxy_peak_fds"][0],
            a["connected"],
            a["failed"],
            a["alive_at_end"],
            verdict(ok),
        );
    }
    if let Some(last) = rows.last() {
        for (i, s) in last["metric_series"].as_array().into_iter().flatten().enumerate() {
            println!(
                "node-{} proxy after all phases: {} metric series, {} distinct grpc_response_status values (at most {GRPC_STATUS_LABELS_MAX}), {} series refused over the cap",
                ["a", "b"][i.min(1)],
                s["series"],
                s["grpc_status_labels"],
                s["overflow"]
            );
        }
    }
    println!(
        "RSS after every attack ended: {} MiB (quiet: {} MiB; at most {SETTLED_MARGIN_MIB} MiB more): {}",
        settled.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" / "),
        quiet_rss.iter().map(|m| format!("{m:.0}")).collect::<Vec<_>>().join(" / "),
        verdict(settled_ok)
    );
    all_met &= settled_ok;
    println!(
        "targets per phase: success >= {:.1}%, p99 <= {TARGET_P99_FACTOR}x quiet ({:.2} ms), each proxy's RSS <= {BUDGET_MIB} MiB, grpc_response_status values <= {GRPC_STATUS_LABELS_MAX}: {}",
        TARGET_SUCCESS * 100.0,
        quiet_p99 * TARGET_P99_FACTOR,
        if all_met { "MET" } else { "NOT MET" }
    );
    write_json(
        json_out,
        &json!({
            "rate_rps": RATE, "seconds_per_phase": seconds, "rows": rows, "quiet_p99_ms": quiet_p99,
            "targets": {"success_rate_min": TARGET_SUCCESS, "p99_factor_max": TARGET_P99_FACTOR, "rss_mib_max": BUDGET_MIB},
            "met": all_met, "node_stats": stats, "settled_rss_mib": settled, "settled_margin_mib": SETTLED_MARGIN_MIB,
        }),
    )
}
