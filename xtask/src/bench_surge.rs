//! `cargo xtask bench --only surge`: the seed's surge, load doubling past what the recall pods
//! sustain for a few seconds.
//!
//! Three `recall` pods on two nodes with bounded capacity (`mesh-probe http-serve --capacity 4
//! --service-ms 5`: 4 requests at once, 5 ms each, the rest queue FIFO; 800 req/s per pod,
//! 2400 req/s in all) behind Service `recall`, a `bff` client on node-a. At fixed rates
//! (open loop, late starts reported): steady at 60% of capacity for 3 s, a surge at 120% for
//! 4 s, steady again for 3 s. Two runs: no protection, and `mesh.io/adaptive-concurrency: "on"`.
use std::{path::Path, time::Duration};

use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::bench_util::{ms, ok_count, probe_json, verdict, write_json};

const VIP: &str = "10.96.3.1";
const PODS: [&str; 3] = ["recall-1", "recall-2", "recall-3"];
const WORKERS: u64 = 4;
const SERVICE_MS: u64 = 5;
const CAPACITY_RPS: f64 = (PODS.len() as u64 * WORKERS * 1000 / SERVICE_MS) as f64;
const STEADY: f64 = 0.6;
const SURGE: f64 = 1.2;
/// Phases: (name, fraction of capacity, seconds).
const PHASES: [(&str, f64, f64); 3] = [("steady", STEADY, 3.0), ("surge", SURGE, 4.0), ("steady after", STEADY, 3.0)];
/// Client requests in flight at most: enough to keep the rate through the surge unless
/// queueing makes answers take longer than CONCURRENCY / rate.
const CONCURRENCY: &str = "512";
const TARGET_P99_RATIO: f64 = 2.0;
const TARGET_SHED_MS: f64 = 1.0;
const TARGET_THROUGHPUT: f64 = 0.9;

pub const ADAPTIVE: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: recall
  namespace: lemo
  annotations:
    mesh.io/adaptive-concurrency: "on"
spec:
  host: recall
"#;

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace("lemo", true).pod("bff", "lemo", 0, "bff", 9000);
    for (i, name) in PODS.iter().enumerate() {
        spec = spec.pod_labelled(name, "lemo", i % 2, "recall", &[], "http", 8080);
    }
    spec.service_named("recall", "lemo", [10, 96, 3, 1], "recall", "http", 8081, 8080)
}

pub fn run(json_out: &Path) -> anyhow::Result<()> {
    eprintln!("bench surge: three recall pods of capacity {WORKERS} x {SERVICE_MS} ms ({CAPACITY_RPS:.0} req/s in all)...");
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    let (workers, service_ms) = (WORKERS.to_string(), SERVICE_MS.to_string());
    for name in PODS {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080", "--capacity", &workers, "--service-ms", &service_ms], 8080)?;
    }
    let url = format!("http://{VIP}:8081/");
    let phase = |fraction: f64, seconds: f64| -> anyhow::Result<Value> {
        let rate = CAPACITY_RPS * fraction;
        let count = ((rate * seconds).round() as u64).to_string();
        let rate = format!("{rate:.0}");
        probe_json(&c, "bff", &["http", &url, "--count", &count, "--rate", &rate, "--concurrency", CONCURRENCY, "--timeout-ms", "10000"], Duration::from_secs(60))
    };
    let shed = |c: &SimCluster| c.counter(0, "proxy", "flag_cl");

    let mut runs = Vec::new();
    for (name, adaptive) in [("no protection", false), ("adaptive concurrency", true)] {
        if adaptive {
            c.apply_config("policy.yaml", ADAPTIVE)?;
        }
        // Warm-up at the steady rate: connections, and the limiter's min RTT.
        phase(STEADY, 2.0)?;
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("bench surge: {name}");
        let before = shed(&c);
        let mut phases = Vec::new();
        for (phase_name, fraction, seconds) in PHASES {
            let report = phase(fraction, seconds)?;
            phases.push(row(phase_name, fraction, &report));
        }
        let limiter = c
            .meshctl(0, &["-o", "json", "clusters"])
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
            .map(|v| v["outbound|8081||recall.lemo.svc.cluster.local"]["adaptive_concurrency"].clone())
            .unwrap_or(Value::Null);
        runs.push(json!({"run": name, "phases": phases, "proxy_flag_cl": shed(&c) - before, "limiter_after": limiter}));
    }
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    drop(c);

    println!("\nsurge: three recall pods, capacity {CAPACITY_RPS:.0} req/s; steady {:.0}%, surge {:.0}% of capacity", STEADY * 100.0, SURGE * 100.0);
    println!(
        "{:<22} {:<13} {:>7} {:>8} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "run", "phase", "rps", "2xx", "503", "2xx/s", "% cap", "2xx p50", "2xx p99", "shed p50", "shed p99", "late"
    );
    for r in &runs {
        for p in r["phases"].as_array().into_iter().flatten() {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<22} {:<13} {:>7.0} {:>8} {:>7} {:>9.0} {:>7.1} {:>9.2} {:>9.2} {:>9.3} {:>9.3} {:>6}",
                r["run"].as_str().unwrap_or(""),
                p["phase"].as_str().unwrap_or(""),
                f("offered_rps"),
                p["ok"],
                p["shed_503"],
                f("ok_per_s"),
                f("ok_per_s") / CAPACITY_RPS * 100.0,
                f("ok_p50_ms"),
                f("ok_p99_ms"),
                f("shed_p50_ms"),
                f("shed_p99_ms"),
                p["late_starts"]
            );
        }
    }
    let adaptive = &runs[1]["phases"];
    let steady_p99 = adaptive[0]["ok_p99_ms"].as_f64().unwrap_or(0.0);
    let surge_p99 = adaptive[1]["ok_p99_ms"].as_f64().unwrap_or(f64::MAX);
    let shed_p99 = adaptive[1]["shed_p99_ms"].as_f64().unwrap_or(f64::MAX);
    let shed_n = adaptive[1]["shed_503"].as_u64().unwrap_or(0);
    let tput = adaptive[1]["ok_per_s"].as_f64().unwrap_or(0.0) / CAPACITY_RPS;
    let p99_ratio = surge_p99 / steady_p99.max(1e-9);
    // What the pods delivered during the surge when nothing was shed: their real capacity.
    let unprotected_tput = runs[0]["phases"][1]["ok_per_s"].as_f64().unwrap_or(0.0);
    let vs_unprotected = adaptive[1]["ok_per_s"].as_f64().unwrap_or(0.0) / unprotected_tput.max(1e-9);
    let met = json!({
        "admitted_p99_ratio": p99_ratio <= TARGET_P99_RATIO,
        "shed_p99_under_1ms": shed_n > 0 && shed_p99 < TARGET_SHED_MS,
        "admitted_throughput": tput >= TARGET_THROUGHPUT,
    });
    println!(
        "with adaptive concurrency: surge 2xx p99 {surge_p99:.2} ms = {p99_ratio:.2}x steady {steady_p99:.2} ms (target <= {TARGET_P99_RATIO}x: {}); \
         {shed_n} shed, p50 {:.3} / p99 {shed_p99:.3} ms (target p99 < {TARGET_SHED_MS} ms: {}); admitted {:.1}% of capacity (target >= {:.0}%: {}), \
         {:.1}% of what the pods delivered unprotected",
        verdict(met["admitted_p99_ratio"] == true),
        adaptive[1]["shed_p50_ms"].as_f64().unwrap_or(0.0),
        verdict(met["shed_p99_under_1ms"] == true),
        tput * 100.0,
        TARGET_THROUGHPUT * 100.0,
        verdict(met["admitted_throughput"] == true),
        vs_unprotected * 100.0,
    );
    write_json(
        json_out,
        &json!({
            "capacity_rps": CAPACITY_RPS, "pods": PODS.len(), "workers_per_pod": WORKERS, "service_ms": SERVICE_MS,
            "phases": PHASES.iter().map(|(n, f, s)| json!({"phase": n, "fraction_of_capacity": f, "seconds": s})).collect::<Vec<_>>(),
            "client_concurrency": CONCURRENCY,
            "policy": ADAPTIVE,
            "runs": runs,
            "with_adaptive": {"surge_ok_p99_ms": surge_p99, "steady_ok_p99_ms": steady_p99, "p99_ratio": p99_ratio, "shed_p99_ms": shed_p99, "throughput_ratio": tput, "throughput_vs_unprotected": vs_unprotected},
            "targets": {"p99_ratio_max": TARGET_P99_RATIO, "shed_ms_max": TARGET_SHED_MS, "throughput_ratio_min": TARGET_THROUGHPUT},
            "met": met,
            "node_stats": stats,
        }),
    )
}

fn row(phase: &str, fraction: f64, r: &Value) -> Value {
    let ok = ok_count(r);
    let secs = r["elapsed_ms"].as_f64().unwrap_or(1.0) / 1000.0;
    json!({
        "phase": phase,
        "offered_rps": CAPACITY_RPS * fraction,
        "requests": r["requests"],
        "ok": ok,
        "shed_503": r["by_status"]["503"].as_u64().unwrap_or(0),
        "ok_per_s": ok as f64 / secs.max(1e-9),
        "achieved_rps": r["achieved_rps"],
        "late_starts": r["late_starts"],
        "max_start_lag_us": r["max_start_lag_us"],
        "ok_p50_ms": ms(r, "ok_p50_us"),
        "ok_p99_ms": ms(r, "ok_p99_us"),
        "shed_p50_ms": ms(r, "not_ok_answers_p50_us"),
        "shed_p99_ms": ms(r, "not_ok_answers_p99_us"),
        "by_status": r["by_status"],
        "errors": r["errors"],
        "max_in_flight": r["max_in_flight"],
    })
}
