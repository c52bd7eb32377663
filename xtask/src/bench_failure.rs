//! `cargo xtask bench --only failure`: the users' seed, "five recall pods, one failing".
//!
//! Five `recall` pods (HTTP on 8080, 1 KiB answers) on two nodes behind Service `recall`
//! (port `http` 8081 -> 8080), a `bff` client on node-a. At a fixed rate, three runs:
//! all pods healthy (the reference), one pod answering 503 to everything with no policy
//! (Istio defaults: LEAST_REQUEST, default retries, which retry a 503 twice on other pods), and the same with
//! outlier detection and retries applied.
use std::{path::Path, time::Duration};

use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::bench_util::{ms, ok_count, probe_json, verdict, write_json};

const RATE: u64 = 1000;
const CONNS: &str = "4";
const VIP: &str = "10.96.2.1";
const PODS: [&str; 5] = ["recall-1", "recall-2", "recall-3", "recall-4", "recall-5"];
/// On node-b (index 1 -> 1 % 2): the failure is cross node, as it mostly would be.
const FAILING: &str = "recall-2";
const TARGET_SUCCESS: f64 = 0.999;
const TARGET_THROUGHPUT: f64 = 0.95;

fn seed_policies() -> String {
    crate::bench_util::seed_policies("recall", "lemo")
}

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace("lemo", true).pod("bff", "lemo", 0, "bff", 9000);
    for (i, name) in PODS.iter().enumerate() {
        spec = spec.pod_labelled(name, "lemo", i % 2, "recall", &[], "http", 8080);
    }
    spec.service_named("recall", "lemo", [10, 96, 2, 1], "recall", "http", 8081, 8080)
}

struct Run {
    name: &'static str,
    report: Value,
    retries: u64,
}

pub fn run(json_out: &Path, seconds: u64) -> anyhow::Result<()> {
    eprintln!("bench failure: five recall pods on two nodes, {FAILING} failing...");
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    for name in PODS {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080", "--body-bytes", "1024"], 8080)?;
    }
    let url = format!("http://{VIP}:8081/");
    let timeout = Duration::from_secs(seconds + 60);
    let count = (RATE * seconds).to_string();
    let rate = RATE.to_string();
    let fail_header = format!("x-fail-pods: {FAILING}");
    let load = |failing: bool| -> anyhow::Result<Value> {
        let mut args = vec!["http", url.as_str(), "--count", &count, "--rate", &rate, "--conns", CONNS, "--timeout-ms", "5000"];
        if failing {
            args.extend(["--header", fail_header.as_str()]);
        }
        probe_json(&c, "bff", &args, timeout)
    };
    let retries = |c: &SimCluster| c.counter(0, "proxy", "http_retries") + c.counter(1, "proxy", "http_retries");

    // Warm up connections (no failures, no policy).
    probe_json(&c, "bff", &["http", &url, "--count", "500", "--rate", "500", "--conns", CONNS], timeout)?;
    let mut runs = Vec::new();
    for (name, failing, policies) in [("healthy (reference)", false, false), ("one failing, no policies", true, false), ("one failing, outlier+retries", true, true)] {
        if policies {
            c.apply_config("policy.yaml", &seed_policies())?;
        }
        eprintln!("bench failure: {name}: {RATE} rps, {CONNS} conns, {seconds} s");
        let before = retries(&c);
        let report = load(failing)?;
        runs.push(Run { name, report, retries: retries(&c).saturating_sub(before) });
    }
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    drop(c);

    let row = |r: &Run| {
        let requests = r.report["requests"].as_u64().unwrap_or(0);
        let ok = ok_count(&r.report);
        let secs = r.report["elapsed_ms"].as_f64().unwrap_or(1.0) / 1000.0;
        json!({
            "run": r.name,
            "requests": requests,
            "ok": ok,
            "success_rate": ok as f64 / requests.max(1) as f64,
            "ok_per_s": ok as f64 / secs.max(1e-9),
            "achieved_rps": r.report["achieved_rps"],
            "late_starts": r.report["late_starts"],
            "p50_ms": ms(&r.report, "p50_us"),
            "p99_ms": ms(&r.report, "p99_us"),
            "by_status": r.report["by_status"],
            "errors": r.report["errors"],
            "by_pod": r.report["by_pod"],
            "proxy_retries": r.retries,
        })
    };
    let rows: Vec<Value> = runs.iter().map(row).collect();
    let healthy_tput = rows[0]["ok_per_s"].as_f64().unwrap_or(0.0).max(1e-9);
    println!("\nfive recall pods, {FAILING} answers 503 to everything; {RATE} rps, {CONNS} conns, {seconds} s, 1 KiB answers");
    println!("{:<30} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8}", "run", "requests", "success %", "2xx/s", "% healthy", "p50 ms", "p99 ms", "retries");
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<30} {:>9} {:>10.3} {:>10.1} {:>9.1} {:>9.3} {:>8.3} {:>8}",
            r["run"].as_str().unwrap_or(""),
            r["requests"].as_u64().unwrap_or(0),
            f("success_rate") * 100.0,
            f("ok_per_s"),
            f("ok_per_s") / healthy_tput * 100.0,
            f("p50_ms"),
            f("p99_ms"),
            r["proxy_retries"].as_u64().unwrap_or(0)
        );
    }
    let with = &rows[2];
    let success = with["success_rate"].as_f64().unwrap_or(0.0);
    let tput = with["ok_per_s"].as_f64().unwrap_or(0.0) / healthy_tput;
    println!(
        "with outlier detection + retries: success {:.3}% (target >= {:.1}%: {}), throughput {:.1}% of healthy (target >= {:.0}%: {})",
        success * 100.0,
        TARGET_SUCCESS * 100.0,
        verdict(success >= TARGET_SUCCESS),
        tput * 100.0,
        TARGET_THROUGHPUT * 100.0,
        verdict(tput >= TARGET_THROUGHPUT)
    );
    write_json(
        json_out,
        &json!({
            "rate_rps": RATE, "conns": 4, "seconds": seconds, "failing_pod": FAILING,
            "policies": seed_policies(),
            "rows": rows,
            "with_policies": {"success_rate": success, "throughput_ratio": tput},
            "targets": {"success_rate_min": TARGET_SUCCESS, "throughput_ratio_min": TARGET_THROUGHPUT},
            "met": {"success_rate": success >= TARGET_SUCCESS, "throughput_ratio": tput >= TARGET_THROUGHPUT},
            "node_stats": stats,
        }),
    )
}
