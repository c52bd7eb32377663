//! `cargo xtask bench` (l7 part): what telemetry costs the mesh's HTTP/1.1 path. Proxy CPU per
//! 1000 requests with telemetry off (`--metrics off`, no access log, no tracing) and fully on
//! (Istio metrics scraped by a real Prometheus at its default 15 s interval, a JSON access log line per request,
//! a span per request at 100% sampling exported to a real OTLP collector), alternating runs on
//! the l7 cluster so drift hits both modes alike.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use mesh_e2e::SimCluster;
use serde_json::{Value, json};

use crate::bench_util::{cpu_seconds, ms, ok_count, probe_json, verdict, write_json};

const RATE: u64 = 1000;
const URL: &str = "http://10.96.3.1:80/";
const TARGET_OVERHEAD_PCT: f64 = 15.0;
/// Prometheus' default interval (and the usual one for Istio's proxies).
const SCRAPE: &str = "15s";

/// From nothing to everything, so the cost of each part shows.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    /// Istio's metrics (the default), scraped every second.
    Metrics,
    /// Plus a JSON access log line per request.
    MetricsLog,
    /// Plus a span per request (100% sampling) to the collector.
    All,
}

const MODES: [Mode; 4] = [Mode::Off, Mode::Metrics, Mode::MetricsLog, Mode::All];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Metrics => "metrics",
            Mode::MetricsLog => "metrics+log",
            Mode::All => "metrics+log+traces",
        }
    }
}

/// rotel's collector binary in the venv `cargo xtask setup` made.
fn rotel_agent() -> Option<PathBuf> {
    let lib = crate::setup::python().parent()?.parent()?.join("lib");
    fs::read_dir(lib).ok()?.flatten().map(|e| e.path().join("site-packages/rotel/rotel-agent")).find(|p| p.is_file())
}

/// Prometheus and the collector in node-a's namespace, where the proxies' telemetry goes.
fn start_backends(c: &SimCluster, work: &Path) -> anyhow::Result<bool> {
    let netns = c.node(0).netns.clone();
    let targets: Vec<String> = c.nodes.iter().map(|n| format!("'{}:15020'", n.ip)).collect();
    let config = work.join("prometheus.yml");
    fs::write(
        &config,
        format!("global:\n  scrape_interval: {SCRAPE}\nscrape_configs:\n- job_name: mesh\n  static_configs:\n  - targets: [{}]\n", targets.join(", ")),
    )?;
    c.spawn_in_netns(
        &netns,
        Path::new("prometheus"),
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", work.join("tsdb").display()),
            "--web.listen-address=127.0.0.1:9090",
            "--log.level=warn",
        ],
        &work.join("prometheus.log"),
    )
    .context("starting prometheus")?;
    let Some(agent) = rotel_agent() else {
        eprintln!("bench telemetry: warning: rotel-agent not in the venv; telemetry on runs without tracing");
        return Ok(false);
    };
    let dir = work.display().to_string();
    c.spawn_in_netns(
        &netns,
        &agent,
        &[
            "start",
            "--otlp-grpc-endpoint",
            "127.0.0.1:4317",
            "--otlp-http-endpoint",
            "127.0.0.1:4318",
            "--exporter",
            "blackhole",
            "--pid-file",
            &format!("{dir}/rotel.pid"),
            "--log-file",
            &format!("{dir}/rotel-agent.log"),
        ],
        &work.join("rotel.log"),
    )?;
    Ok(true)
}

fn restart_proxies(c: &SimCluster, mode: Mode, tracing: bool) -> anyhow::Result<()> {
    for i in 0..c.nodes.len() {
        c.stop_proxy(i)?;
        let mut args = match mode {
            Mode::Off => vec!["--metrics", "off"],
            Mode::Metrics => vec![],
            Mode::MetricsLog | Mode::All => vec!["--access-log", "json"],
        };
        // Node-a's proxy is the one that sees HTTP requests (and makes spans).
        if mode == Mode::All && tracing && i == 0 {
            args.extend(["--otlp-endpoint", "http://127.0.0.1:4317", "--trace-sampling", "1"]);
        }
        c.start_proxy_with(i, &args)?;
    }
    Ok(())
}

fn measure(c: &SimCluster, seconds: u64) -> anyhow::Result<Value> {
    let timeout = Duration::from_secs(seconds + 60);
    let base = ["http", URL, "--conns", "4", "--timeout-ms", "5000", "--body-bytes", "1024", "--method", "POST"];
    let with = |extra: &[&str]| -> anyhow::Result<Value> {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        probe_json(c, "client-mesh", &a, timeout)
    };
    with(&["--rate", "500", "--count", "500"])?;
    let proxies = c.proxy_pids();
    let count = (RATE * seconds).to_string();
    let before = cpu_seconds(&proxies);
    let lat = with(&["--rate", &RATE.to_string(), "--count", &count])?;
    let cpu = cpu_seconds(&proxies) - before;
    let requests = lat["requests"].as_u64().unwrap_or(0).max(1);
    Ok(json!({
        "requests": requests,
        "ok": ok_count(&lat),
        "proxy_cpu_s": cpu,
        "cpu_s_per_1k_requests": cpu * 1000.0 / requests as f64,
        "p50_ms": ms(&lat, "p50_us"),
        "p99_ms": ms(&lat, "p99_us"),
    }))
}

/// The comparison on a cluster of its own (`cargo xtask bench --only telemetry`).
pub fn run_alone(json_out: &Path, seconds: u64) -> anyhow::Result<()> {
    let c = SimCluster::start(crate::bench_l7::spec())?;
    let probe = mesh_e2e::bins::path("mesh-probe");
    c.serve_in_pod("srv", &probe, &["http-serve", "--name", "srv", "--port", "8080", "--body-bytes", "1024"], 8080)?;
    c.apply_config("policy.yaml", &crate::bench_l7::policies())?;
    run(&c, seconds, json_out)
}

/// Rounds of every mode, interleaved; each mode's figure is its median over the rounds (the
/// load generator shares the cores with the proxies, so single runs swing by 10-20%).
const ROUNDS: usize = 3;

/// Runs each mode [`ROUNDS`] times, interleaved, on `c` (the l7 bench cluster, policies applied), prints
/// the result and writes it to `json_out`. Leaves the proxies running with everything on.
pub fn run(c: &SimCluster, seconds: u64, json_out: &Path) -> anyhow::Result<()> {
    let work = c.log_dir().join("bench-telemetry");
    fs::create_dir_all(&work)?;
    let tracing = start_backends(c, &work)?;
    let mut runs = Vec::new();
    for mode in std::iter::repeat_n(MODES, ROUNDS).flatten() {
        eprintln!("bench telemetry: mesh HTTP/1.1 at {RATE} rps, telemetry {}", mode.name());
        restart_proxies(c, mode, tracing)?;
        let mut r = measure(c, seconds)?;
        r["telemetry"] = mode.name().into();
        runs.push(r);
    }
    let mean = |mode: Mode, key: &str| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r["telemetry"] == mode.name()).filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let off = mean(Mode::Off, "cpu_s_per_1k_requests");
    let overhead = |mode: Mode| (mean(mode, "cpu_s_per_1k_requests") - off) / off.max(1e-9) * 100.0;
    println!("\nTelemetry cost, mesh HTTP/1.1 cross node at {RATE} rps, 1 KiB bodies, {seconds} s runs (median of {ROUNDS} each; metrics scraped every {SCRAPE})");
    println!("{:<20} {:>22} {:>10} {:>8} {:>8}", "telemetry", "proxy CPU s / 1k req", "vs off", "p50 ms", "p99 ms");
    let mut summary = serde_json::Map::new();
    for mode in MODES {
        let cpu = mean(mode, "cpu_s_per_1k_requests");
        println!("{:<20} {cpu:>22.4} {:>+9.1}% {:>8.3} {:>8.3}", mode.name(), overhead(mode), mean(mode, "p50_ms"), mean(mode, "p99_ms"));
        summary.insert(mode.name().into(), json!({"cpu_s_per_1k_requests": cpu, "overhead_pct": overhead(mode)}));
    }
    // The target is for what users run: metrics and access logs (Istio samples 1% of traces by
    // default; 100% is shown for what a span costs).
    let judged = overhead(Mode::MetricsLog);
    println!(
        "metrics + access log cost {judged:+.1}% proxy CPU (target < {TARGET_OVERHEAD_PCT:.0}%: {}); with a span per request {}: {:+.1}%",
        verdict(judged < TARGET_OVERHEAD_PCT),
        if tracing { "(100% sampling, OTLP)" } else { "(rotel missing: not traced)" },
        overhead(Mode::All),
    );
    write_json(
        json_out,
        &json!({
            "rate_rps": RATE, "seconds": seconds, "tracing": tracing,
            "runs": runs,
            "modes": summary,
            "overhead_pct_metrics_and_log": judged,
            "target_overhead_pct": TARGET_OVERHEAD_PCT,
            "met": judged < TARGET_OVERHEAD_PCT,
        }),
    )
}
