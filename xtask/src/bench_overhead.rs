//! `cargo xtask bench overhead`: the users' question, answered on their own cluster shape: what do
//! one node proxy per node cost next to one Envoy sidecar per pod, for the same services, the
//! same policies and the same load?
//!
//! The shape (the seed's): seven services on two simulated nodes. `bff` (HTTP) calls `recall`,
//! `rank` and `user` (gRPC) and `rerank` (HTTP) at once for every request; `rank` calls `feature`
//! (HTTP) and `rerank` calls `item` (gRPC). `recall` has three v1 pods and one v2 canary pod. The
//! policies are the seed's: LEAST_REQUEST, outlier detection 5 errors / 10s / 30s / 50%, timeout
//! 2s, retries 2 x 1s on 5xx,reset,connect-failure, recall 90/10 v1/v2 (v2 on `x-canary: true`).
//! A load generator outside the mesh (the users' gateway) sends 1 KiB POSTs to bff: each of its
//! requests is 7 service requests, so 143 rps there is 1000 service requests a second, 4/7 of
//! them gRPC.
//!
//! Three ways, one cluster each, in one run:
//! 1. no mesh: the applications call the pods directly (client-side round robin over a
//!    Service's pods, no retries, no canary weights);
//! 2. sidecars: one real Envoy per service pod (`--concurrency 2`, Istio's sidecar default),
//!    traffic steered into it by iptables exactly as istio-init does (outbound REDIRECT to 15001
//!    except Envoy's own uid 1337, inbound REDIRECT to 15006), original destination recovered by
//!    Envoy's `original_dst` listener filter, mTLS between sidecars (PERMISSIVE inbound: TLS and
//!    plaintext both accepted, as Istio's default), the policies as Istio would program them;
//! 3. mesh: one node proxy per node, eBPF capture, HBONE mTLS between nodes, the same policies
//!    as Istio YAML.
//!
//! Scenarios per way: idle, steady (1000 service rps), burst (2x for a few seconds), throughput
//! at saturation (h2load, closed loop) and partial failure (one recall v1 pod answers 503 to
//! everything). Proxy CPU comes from the proxies' utime+stime, memory from their RSS (sampled
//! every 200 ms: steady mean and peak) and VmHWM. Output: target/bench/overhead.{md,json} and
//! two SVG charts (resources, latency CDF).
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::{
    bench_chart,
    bench_util::{cpu_seconds, h2load, path_str, probe_json, rss_mib, verdict, write_json},
};

const NS: &str = "shop";
const EDGE_NS: &str = "edge";
const LOADGEN: &str = "loadgen";
const APP_PORT: u16 = 8080;
const BODY: usize = 1024;
/// Service requests per request to bff: bff itself, its four calls, and rank's and rerank's one.
const FANOUT: f64 = 7.0;
const SERVICE_RPS: f64 = 1000.0;
const ENVOY_UID: u32 = 1337;
const ENVOY_OUT: u16 = 15001;
const ENVOY_IN: u16 = 15006;
const FAILING_POD: &str = "recall-v1-a";

const TARGET_MEMORY_RATIO: f64 = 0.10;
const TARGET_CPU_RATIO: f64 = 1.0 / 3.0;
const TARGET_P99_RATIO: f64 = 1.0 / 3.0;
const TARGET_FAILURE_SUCCESS: f64 = 0.999;

struct Service {
    name: &'static str,
    grpc: bool,
    vip: [u8; 4],
    port: u16,
    /// Services this one calls for every request.
    calls: &'static [&'static str],
}

const SERVICES: [Service; 7] = [
    Service { name: "bff", grpc: false, vip: [10, 96, 7, 1], port: 8080, calls: &["recall", "rank", "rerank", "user"] },
    Service { name: "recall", grpc: true, vip: [10, 96, 7, 2], port: 8081, calls: &[] },
    Service { name: "rank", grpc: true, vip: [10, 96, 7, 3], port: 8082, calls: &["feature"] },
    Service { name: "rerank", grpc: false, vip: [10, 96, 7, 4], port: 8083, calls: &["item"] },
    Service { name: "user", grpc: true, vip: [10, 96, 7, 5], port: 8084, calls: &[] },
    Service { name: "feature", grpc: false, vip: [10, 96, 7, 6], port: 8085, calls: &[] },
    Service { name: "item", grpc: true, vip: [10, 96, 7, 7], port: 8086, calls: &[] },
];

/// (pod, service, version, node)
const PODS: [(&str, &str, &str, usize); 10] = [
    ("bff", "bff", "v1", 0),
    ("recall-v1-a", "recall", "v1", 0),
    ("recall-v1-b", "recall", "v1", 1),
    ("recall-v1-c", "recall", "v1", 1),
    ("recall-v2", "recall", "v2", 0),
    ("rank", "rank", "v1", 1),
    ("rerank", "rerank", "v1", 0),
    ("user", "user", "v1", 1),
    ("feature", "feature", "v1", 0),
    ("item", "item", "v1", 1),
];

fn service(name: &str) -> &'static Service {
    SERVICES.iter().find(|s| s.name == name).expect("known service")
}

fn vip(s: &Service) -> String {
    let [a, b, c, d] = s.vip;
    format!("{a}.{b}.{c}.{d}")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    NoMesh,
    Sidecars,
    Mesh,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoMesh => "no mesh",
            Mode::Sidecars => "sidecars",
            Mode::Mesh => "mesh",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Mode::NoMesh => "no_mesh",
            Mode::Sidecars => "sidecars",
            Mode::Mesh => "mesh",
        }
    }
}

pub struct Opts {
    pub quick: bool,
}

/// Seconds per scenario.
struct Durations {
    idle: u64,
    steady: u64,
    burst: u64,
    saturation: u64,
    failure: u64,
}

impl Durations {
    fn new(quick: bool) -> Self {
        if quick {
            Self { idle: 1, steady: 3, burst: 2, saturation: 2, failure: 3 }
        } else {
            Self { idle: 3, steady: 40, burst: 5, saturation: 6, failure: 15 }
        }
    }
}

pub fn run(out_dir: &Path, opts: &Opts) -> anyhow::Result<()> {
    crate::bench_util::with_envoy_workdir("overhead", |envoy, work| run_in(out_dir, opts, envoy, work))
}

fn run_in(out_dir: &Path, opts: &Opts, envoy: &Path, work: &Path) -> anyhow::Result<()> {
    let d = Durations::new(opts.quick);
    let started = std::time::Instant::now();
    let certs = crate::bench_l7::make_certs(work).context("certificates for the sidecars' mTLS")?;
    // Envoy runs as uid 1337 (so iptables can tell its own connections apart) and must read these.
    for f in fs::read_dir(work)? {
        set_mode(&f?.path(), 0o644)?;
    }
    set_mode(work, 0o755)?;
    let mut modes = Vec::new();
    for mode in [Mode::NoMesh, Mode::Sidecars, Mode::Mesh] {
        eprintln!("bench overhead: {} ...", mode.name());
        let result = run_mode(mode, &d, envoy, work, &certs).with_context(|| format!("mode {:?}", mode.name()))?;
        eprintln!(
            "bench overhead: {}: steady p50 {:.2} p99 {:.2} ms, success {:.4}, proxy {:.3} vCPU, {:.1} MiB; burst p99 {:.2} ms; saturation {:.0} service rps; one pod failing: success {:.4}",
            mode.name(),
            result.steady["p50_ms"].as_f64().unwrap_or(0.0),
            result.steady["p99_ms"].as_f64().unwrap_or(0.0),
            result.steady["success"].as_f64().unwrap_or(0.0),
            result.steady["proxy_vcpu"].as_f64().unwrap_or(0.0),
            result.steady["proxy_rss_mean_mib"].as_f64().unwrap_or(0.0),
            result.burst["p99_ms"].as_f64().unwrap_or(0.0),
            result.saturation["service_ok_rps"].as_f64().unwrap_or(0.0),
            result.failure["success"].as_f64().unwrap_or(0.0),
        );
        modes.push((mode, result));
    }
    let report = summarize(&modes, opts, started.elapsed().as_secs_f64());
    fs::create_dir_all(out_dir)?;
    write_json(&out_dir.join("overhead.json"), &report)?;
    let md = markdown(&report);
    fs::write(out_dir.join("overhead.md"), &md)?;
    fs::write(out_dir.join("overhead-resources.svg"), bench_chart::resource_bars(&report))?;
    fs::write(out_dir.join("overhead-latency-cdf.svg"), bench_chart::latency_cdf(&report))?;
    println!("{md}");
    println!("wrote {}/overhead.{{md,json}}, overhead-resources.svg, overhead-latency-cdf.svg", out_dir.display());
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
}

fn spec(mode: Mode) -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace(NS, mode == Mode::Mesh).namespace(EDGE_NS, false).pod(LOADGEN, EDGE_NS, 0, LOADGEN, 9000);
    for (pod, svc, version, node) in PODS {
        let port_name = if service(svc).grpc { "grpc" } else { "http" };
        spec = spec.pod_labelled(pod, NS, node, svc, &[("version", version)], port_name, APP_PORT);
    }
    for s in &SERVICES {
        spec = spec.service_named(s.name, NS, s.vip, s.name, if s.grpc { "grpc" } else { "http" }, s.port, APP_PORT);
    }
    spec.start_proxies = mode == Mode::Mesh;
    spec.mtls = mode == Mode::Mesh;
    spec
}

/// Where `caller` reaches `callee`: its Service address (captured by the mesh or the sidecar),
/// or without a mesh every pod of it in turn.
fn call_arg(c: &SimCluster, mode: Mode, callee: &Service) -> String {
    let scheme = if callee.grpc { "grpc" } else { "http" };
    let urls: Vec<String> = match mode {
        Mode::NoMesh => {
            PODS.iter().filter(|p| p.1 == callee.name).map(|p| format!("{scheme}://{}:{APP_PORT}", c.pod(p.0).ip)).collect()
        }
        _ => vec![format!("{scheme}://{}:{}", vip(callee), callee.port)],
    };
    format!("{}={}", callee.name, urls.join(","))
}

fn start_apps(c: &SimCluster, mode: Mode) -> anyhow::Result<()> {
    let probe = bins::path("mesh-probe");
    let body = BODY.to_string();
    let port = APP_PORT.to_string();
    for (pod, svc, _, _) in PODS {
        let mut args: Vec<String> = ["http-serve", "--name", pod, "--port", &port, "--body-bytes", &body].map(String::from).to_vec();
        for callee in service(svc).calls {
            args.push("--call".into());
            args.push(call_arg(c, mode, service(callee)));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.serve_in_pod(pod, &probe, &args, APP_PORT)?;
    }
    Ok(())
}

struct ModeResult {
    proxies: usize,
    idle_rss_mib: f64,
    steady: Value,
    burst: Value,
    saturation: Value,
    failure: Value,
    peak_rss_mib: f64,
    hwm_mib: f64,
}

fn run_mode(mode: Mode, d: &Durations, envoy: &Path, work: &Path, certs: &crate::bench_l7::Certs) -> anyhow::Result<ModeResult> {
    let c = SimCluster::start(spec(mode))?;
    start_apps(&c, mode)?;
    let proxies = match mode {
        Mode::NoMesh => Vec::new(),
        Mode::Sidecars => start_sidecars(&c, envoy, work, certs)?,
        Mode::Mesh => {
            c.apply_config("policies.yaml", &policies())?;
            c.proxy_pids()
        }
    };
    let bff = format!("http://{}:{APP_PORT}/", c.pod("bff").ip);
    let rate = SERVICE_RPS / FANOUT;
    // Warm up: connections, certificates, pools.
    let warm = load(&c, &bff, rate, 1, &[])?;
    if warm["requests"].as_u64().unwrap_or(0) == 0 {
        bail!("warm-up sent no request: {warm}");
    }
    thread::sleep(Duration::from_secs(d.idle));
    let idle_rss_mib = rss_total(&proxies);

    let sampler = RssSampler::start(proxies.clone());
    eprintln!("bench overhead: {}: steady {} s at {rate:.0} rps to bff ({SERVICE_RPS} service rps)", mode.name(), d.steady);
    let steady = measured(&c, &bff, rate, d.steady, &[], &proxies, Some(&sampler))?;
    eprintln!("bench overhead: {}: burst {} s at {:.0} rps", mode.name(), d.burst, 2.0 * rate);
    let burst = measured(&c, &bff, 2.0 * rate, d.burst, &[], &proxies, None)?;
    eprintln!("bench overhead: {}: saturation {} s (h2load, 32 connections)", mode.name(), d.saturation);
    let saturation = saturate(&c, &bff, d.saturation, &proxies, work)?;
    eprintln!("bench overhead: {}: partial failure {} s ({FAILING_POD} answers 503)", mode.name(), d.failure);
    let fail_header = format!("x-fail-pods: {FAILING_POD}");
    let failure = measured(&c, &bff, rate, d.failure, &[&fail_header], &proxies, None)?;
    let peak_rss_mib = sampler.stop();
    let hwm_mib = proxies.iter().map(|p| hwm_mib(*p)).fold(0.0, |a, b| a + b);
    if mode != Mode::NoMesh && proxies.iter().any(|p| !Path::new(&format!("/proc/{p}")).exists()) {
        bail!("a proxy process exited during the run");
    }
    Ok(ModeResult { proxies: proxies.len(), idle_rss_mib, steady, burst, saturation, failure, peak_rss_mib, hwm_mib })
}

/// One fixed-rate run of the load generator against bff; its JSON report.
fn load(c: &SimCluster, url: &str, rate: f64, seconds: u64, headers: &[&str]) -> anyhow::Result<Value> {
    let count = ((rate * seconds as f64).round() as u64).max(1).to_string();
    let rate = format!("{rate:.3}");
    let body = BODY.to_string();
    let mut args = vec!["http", url, "--method", "POST", "--body-bytes", &body, "--rate", &rate, "--count", &count, "--conns", "16", "--timeout-ms", "5000"];
    for h in headers {
        args.extend(["--header", h]);
    }
    probe_json(c, LOADGEN, &args, Duration::from_secs(seconds + 60))
}

/// A fixed-rate run with the proxies' CPU time around it.
fn measured(c: &SimCluster, url: &str, rate: f64, seconds: u64, headers: &[&str], proxies: &[u32], rss: Option<&RssSampler>) -> anyhow::Result<Value> {
    let cpu0 = cpu_seconds(proxies);
    let t0 = std::time::Instant::now();
    if let Some(s) = rss {
        s.reset_mean();
    }
    let r = load(c, url, rate, seconds, headers)?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(proxies) - cpu0;
    let requests = r["requests"].as_u64().unwrap_or(0);
    let not_ok = r["not_ok"].as_u64().unwrap_or(requests);
    let mut out = json!({
        "rate_rps": rate,
        "service_rps": rate * FANOUT,
        "seconds": seconds,
        "requests": requests,
        "ok": requests.saturating_sub(not_ok),
        "success": if requests > 0 { (requests - not_ok.min(requests)) as f64 / requests as f64 } else { 0.0 },
        "by_status": r["by_status"],
        "errors": r["errors"],
        "p50_ms": r["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p90_ms": r["p90_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p99_ms": r["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "cdf_ms": r["cdf_us"].as_array().map(|a| a.iter().map(|p| json!([p[0], p[1].as_f64().unwrap_or(0.0) / 1000.0])).collect::<Vec<_>>()),
        "proxy_cpu_s": cpu,
        "proxy_vcpu": cpu / wall.max(1e-9),
    });
    if let Some(s) = rss {
        out["proxy_rss_mean_mib"] = s.mean().into();
    }
    Ok(out)
}

/// Closed-loop load: the most bff requests a second the whole chain answers.
fn saturate(c: &SimCluster, url: &str, seconds: u64, proxies: &[u32], work: &Path) -> anyhow::Result<Value> {
    let body = work.join("body-1k");
    fs::write(&body, vec![b'x'; BODY])?;
    let cpu0 = cpu_seconds(proxies);
    let t0 = std::time::Instant::now();
    let r = h2load(c, LOADGEN, &["-c32", "-m1", "--h1", "-d", body.to_str().expect("UTF-8 temp path"), url], seconds)?;
    let cpu = cpu_seconds(proxies) - cpu0;
    let ok_rps = r["ok_rps"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "bff_ok_rps": ok_rps,
        "service_ok_rps": ok_rps * FANOUT,
        "failed": r["failed"],
        "errored": r["errored"],
        "proxy_vcpu": cpu / t0.elapsed().as_secs_f64().max(1e-9),
    }))
}

fn rss_total(pids: &[u32]) -> f64 {
    // Folded from +0.0: an empty f64 sum is -0.0.
    pids.iter().map(|p| rss_mib(*p)).fold(0.0, |a, b| a + b)
}

fn hwm_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()).and_then(|kb| kb.parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
}

/// Sums the proxies' RSS every 200 ms: the peak over the whole run, and a mean that
/// [`RssSampler::reset_mean`] restarts.
struct RssSampler {
    stop: Arc<AtomicBool>,
    state: Arc<std::sync::Mutex<(f64, f64, u64)>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(std::sync::Mutex::new((0.0f64, 0.0f64, 0u64)));
        let (s, st) = (stop.clone(), state.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let total = rss_total(&pids);
                let mut g = st.lock().unwrap();
                g.0 = g.0.max(total);
                g.1 += total;
                g.2 += 1;
                drop(g);
                thread::sleep(Duration::from_millis(200));
            }
        });
        Self { stop, state, handle: Some(handle) }
    }
    fn reset_mean(&self) {
        let mut g = self.state.lock().unwrap();
        g.1 = 0.0;
        g.2 = 0;
    }
    fn mean(&self) -> f64 {
        let g = self.state.lock().unwrap();
        if g.2 == 0 { 0.0 } else { g.1 / g.2 as f64 }
    }
    fn stop(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.state.lock().unwrap().0
    }
}

// ---------------------------------------------------------------------------------------------
// The mesh's policies: the seed's Istio YAML, as the users apply it.

fn policies() -> String {
    let mut y = String::new();
    for s in &SERVICES {
        let subsets = if s.name == "recall" { "\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}" } else { "" };
        let routes = if s.name == "recall" {
            format!(
                "  - match:\n    - headers:\n        x-canary: {{exact: \"true\"}}\n    route:\n    - destination: {{host: recall, subset: v2}}\n{RETRY}  - route:\n    - destination: {{host: recall, subset: v1}}\n      weight: 90\n    - destination: {{host: recall, subset: v2}}\n      weight: 10\n{RETRY}"
            )
        } else {
            format!("  - route:\n    - destination: {{host: {}}}\n{RETRY}", s.name)
        };
        let _ = write!(
            y,
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {n}, namespace: {NS}}}\nspec:\n  host: {n}\n  trafficPolicy:\n    loadBalancer: {{simple: LEAST_REQUEST}}\n    outlierDetection:\n      consecutive5xxErrors: 5\n      interval: 10s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 50{subsets}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {n}, namespace: {NS}}}\nspec:\n  hosts: [{n}]\n  http:\n{routes}---\n",
            n = s.name
        );
    }
    y
}

const RETRY: &str = "    timeout: 2s\n    retries:\n      attempts: 2\n      perTryTimeout: 1s\n      retryOn: 5xx,reset,connect-failure\n";

// ---------------------------------------------------------------------------------------------
// The sidecars: Envoy per pod, steered by iptables, configured as Istio would program it.

fn start_sidecars(c: &SimCluster, envoy: &Path, work: &Path, certs: &crate::bench_l7::Certs) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    let setpriv = Path::new("setpriv");
    for (pod, _, _, _) in PODS {
        let cfg = work.join(format!("envoy-{pod}.yaml"));
        fs::write(&cfg, sidecar_config(&|p| c.pod(p).ip.to_string(), pod, certs))?;
        set_mode(&cfg, 0o644)?;
        let log = work.join(format!("envoy-{pod}.log"));
        let uid = format!("--reuid={ENVOY_UID}");
        let gid = format!("--regid={ENVOY_UID}");
        let pid = c.spawn_in_pod_pid(
            pod,
            setpriv,
            &[&uid, &gid, "--clear-groups", path_str(envoy), "-c", path_str(&cfg), "--concurrency", "2", "--disable-hot-restart", "-l", "warning", "--service-node", pod, "--service-cluster", NS],
            Some(&log),
        )?;
        pids.push(pid);
    }
    let probe = bins::path("mesh-probe");
    for ((pod, _, _, _), pid) in PODS.iter().zip(&pids) {
        for port in [ENVOY_OUT, ENVOY_IN] {
            let addr = format!("127.0.0.1:{port}");
            if !c.run_in_pod(pod, &probe, &["wait", &addr, "--timeout-ms", "20000"], Duration::from_secs(30))?.status.success() {
                bail!("Envoy (pid {pid}) in {pod} did not listen on {port}:\n{}", fs::read_to_string(work.join(format!("envoy-{pod}.log"))).unwrap_or_default());
            }
        }
        // istio-init's rules, in the pod's namespace, once its Envoy listens.
        let uid = ENVOY_UID.to_string();
        let app = APP_PORT.to_string();
        let out = ENVOY_OUT.to_string();
        let inb = ENVOY_IN.to_string();
        let rules: [&[&str]; 4] = [
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.0/8", "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", &out],
            &["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", &app, "-j", "REDIRECT", "--to-ports", &inb],
        ];
        for rule in rules {
            let o = c.run_in_pod(pod, Path::new("iptables"), rule, Duration::from_secs(10))?;
            if !o.status.success() {
                bail!("iptables {} in {pod}: {}", rule.join(" "), String::from_utf8_lossy(&o.stderr));
            }
        }
    }
    Ok(pids)
}


use crate::bench_l7::{HCM, HTTP_OPTS, ROUTER};
const ORIGINAL_DST: &str = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TLS_INSPECTOR: &str = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// One sidecar's static config: what istiod would push to it. Every pod's Envoy knows every
/// Service (Istio's default without a Sidecar resource), outbound on 15001 (one filter chain per
/// Service address, chosen by original destination), inbound on 15006 (TLS or plaintext).
fn sidecar_config(ip_of: &dyn Fn(&str) -> String, pod: &str, certs: &crate::bench_l7::Certs) -> String {
    // The certificate list item and the CA, for a `common_tls_context` whose fields sit at
    // column `indent`.
    let tls_files = |indent: usize| {
        let pad = " ".repeat(indent);
        format!(
            "{pad}tls_certificates:\n{pad}- certificate_chain: {{filename: {:?}}}\n{pad}  private_key: {{filename: {:?}}}\n{pad}validation_context:\n{pad}  trusted_ca: {{filename: {:?}}}\n",
            certs.cert, certs.key, certs.ca
        )
    };
    let mut y = format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: {ENVOY_OUT}}}}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": {ORIGINAL_DST}}}
    filter_chains:
"#
    );
    for s in &SERVICES {
        let routes = if s.name == "recall" {
            format!(
                "              - match: {{prefix: \"/\", headers: [{{name: x-canary, string_match: {{exact: \"true\"}}}}]}}\n                route: {{cluster: outbound|recall|v2, {ROUTE_POLICY}}}\n              - match: {{prefix: \"/\"}}\n                route:\n                  weighted_clusters:\n                    clusters:\n                    - {{name: outbound|recall|v1, weight: 90}}\n                    - {{name: outbound|recall|v2, weight: 10}}\n                  timeout: 2s\n                  retry_policy: {RETRY_POLICY}\n"
            )
        } else {
            format!("              - match: {{prefix: \"/\"}}\n                route: {{cluster: outbound|{}|, {ROUTE_POLICY}}}\n", s.name)
        };
        let _ = write!(
            y,
            r#"    - filter_chain_match:
        prefix_ranges: [{{address_prefix: {vip}, prefix_len: 32}}]
        destination_port: {port}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: outbound_{name}
          codec_type: AUTO
          route_config:
            name: {name}
            virtual_hosts:
            - name: {name}
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
"#,
            vip = vip(s),
            port = s.port,
            name = s.name,
        );
    }
    let _ = write!(
        y,
        r#"    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": {TCP_PROXY}, stat_prefix: passthrough, cluster: passthrough}}
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: {ENVOY_IN}}}}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": {ORIGINAL_DST}}}
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": {TLS_INSPECTOR}}}
    filter_chains:
    - filter_chain_match: {{transport_protocol: tls}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {DOWNSTREAM_TLS}
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
{tls_in}{inbound}    - filter_chain_match: {{transport_protocol: raw_buffer}}
{inbound}  clusters:
  - name: passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
  - name: inbound
    type: STATIC
    connect_timeout: 10s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {HTTP_OPTS}
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: inbound
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {APP_PORT}}}}}}}
"#,
        inbound = inbound_filters(pod),
        tls_in = tls_files(12),
    );
    for s in &SERVICES {
        let subsets: Vec<(&str, Option<&str>)> = if s.name == "recall" { vec![("v1", Some("v1")), ("v2", Some("v2"))] } else { vec![("", None)] };
        for (subset, version) in subsets {
            let endpoints: String = PODS
                .iter()
                .filter(|p| p.1 == s.name && version.is_none_or(|v| p.2 == v))
                .map(|p| format!("        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {APP_PORT}}}}}}}\n", ip_of(p.0)))
                .collect();
            let protocol = if s.grpc { "http2_protocol_options: {}" } else { "http_protocol_options: {}" };
            let _ = write!(
                y,
                r#"  - name: outbound|{name}|{subset}
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    outlier_detection:
      consecutive_5xx: 5
      interval: 10s
      base_ejection_time: 30s
      max_ejection_percent: 50
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {HTTP_OPTS}
        explicit_http_config:
          {protocol}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": {UPSTREAM_TLS}
        sni: outbound_.{port}_.{subset}_.{name}.{NS}.svc.cluster.local
        common_tls_context:
          alpn_protocols: [{alpn}]
{tls_out}    load_assignment:
      cluster_name: outbound|{name}|{subset}
      endpoints:
      - lb_endpoints:
{endpoints}"#,
                name = s.name,
                port = s.port,
                alpn = if s.grpc { "h2" } else { "http/1.1" },
                tls_out = tls_files(10),
            );
        }
    }
    y
}

/// Istio's route defaults plus the seed's VirtualService: timeout 2s, 2 retries of 1s on
/// 5xx,reset,connect-failure, never the same host twice.
macro_rules! retry_policy {
    () => {
        "{retry_on: \"5xx,reset,connect-failure\", num_retries: 2, per_try_timeout: 1s, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}], host_selection_retry_max_attempts: 5}"
    };
}
const ROUTE_POLICY: &str = concat!("timeout: 2s, retry_policy: ", retry_policy!());
const RETRY_POLICY: &str = retry_policy!();

/// The inbound HTTP filter chain's filters: to the app on localhost, in the caller's protocol.
fn inbound_filters(pod: &str) -> String {
    format!("      filters:\n{}", crate::bench_l7::hcm_to_cluster(&format!("inbound_{pod}"), "inbound"))
}

// ---------------------------------------------------------------------------------------------
// The report.

fn summarize(modes: &[(Mode, ModeResult)], opts: &Opts, seconds: f64) -> Value {
    let mut by_mode = serde_json::Map::new();
    for (mode, r) in modes {
        by_mode.insert(
            mode.key().into(),
            json!({
                "name": mode.name(),
                "proxy_processes": r.proxies,
                "idle_rss_mib": r.idle_rss_mib,
                "steady_rss_mean_mib": r.steady["proxy_rss_mean_mib"],
                "peak_rss_mib": r.peak_rss_mib,
                "sum_vmhwm_mib": r.hwm_mib,
                "steady": r.steady,
                "burst": r.burst,
                "saturation": r.saturation,
                "partial_failure": r.failure,
            }),
        );
    }
    let get = |m: &str, path: &[&str]| -> f64 {
        let mut v = &by_mode[m];
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or(f64::NAN)
    };
    let added = |m: &str, key: &str| get(m, &["steady", key]) - get("no_mesh", &["steady", key]);
    let memory_ratio = get("mesh", &["steady_rss_mean_mib"]) / get("sidecars", &["steady_rss_mean_mib"]);
    let cpu_ratio = get("mesh", &["steady", "proxy_vcpu"]) / get("sidecars", &["steady", "proxy_vcpu"]);
    // Latency a mode adds is never below zero: a p99 under the no-mesh one is run-to-run noise.
    // With nothing added by the sidecars the ratio is undefined (NaN: the target reads not met).
    let p99_ratio = added("mesh", "p99_ms").max(0.0) / added("sidecars", "p99_ms").max(0.0);
    let failure_success = get("mesh", &["partial_failure", "success"]);
    json!({
        "suite": "overhead",
        "quick": opts.quick,
        "machine": machine(),
        "seconds": seconds,
        "load": {"bff_rps": SERVICE_RPS / FANOUT, "service_rps": SERVICE_RPS, "body_bytes": BODY, "fanout": FANOUT},
        "modes": by_mode,
        "added_latency_ms": {
            "sidecars": {"p50": added("sidecars", "p50_ms"), "p90": added("sidecars", "p90_ms"), "p99": added("sidecars", "p99_ms")},
            "mesh": {"p50": added("mesh", "p50_ms"), "p90": added("mesh", "p90_ms"), "p99": added("mesh", "p99_ms")},
        },
        "targets": {
            "memory_ratio": {"value": memory_ratio, "target": TARGET_MEMORY_RATIO, "met": memory_ratio <= TARGET_MEMORY_RATIO},
            "cpu_ratio": {"value": cpu_ratio, "target": TARGET_CPU_RATIO, "met": cpu_ratio <= TARGET_CPU_RATIO},
            "added_p99_ratio": {"value": p99_ratio, "target": TARGET_P99_RATIO, "met": p99_ratio <= TARGET_P99_RATIO},
            "partial_failure_success": {"value": failure_success, "target": TARGET_FAILURE_SUCCESS, "met": failure_success >= TARGET_FAILURE_SUCCESS},
        },
    })
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())));
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())))
        .map(|kb| kb / 1024.0 / 1024.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let date = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    json!({
        "cpus": thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "kernel": kernel,
        "date": date,
    })
}

fn markdown(r: &Value) -> String {
    let m = &r["modes"];
    let f = |v: &Value, digits: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let pct = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{:.2}%", x * 100.0));
    let mach = &r["machine"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Seven services (bff, recall x3 + v2 canary, rank, rerank, user, feature, item; 10 pods on 2 simulated nodes), the seed's policies, {:.0} service requests/s ({:.0} rps of 1 KiB POSTs to bff, each fanning out to 6 more calls, 4 of 7 gRPC). Machine: {} vCPU ({}), {:.0} GiB, Linux {}, {}{}.",
        r["load"]["service_rps"].as_f64().unwrap_or(0.0),
        r["load"]["bff_rps"].as_f64().unwrap_or(0.0),
        mach["cpus"],
        mach["cpu_model"].as_str().unwrap_or("?"),
        mach["memory_gib"].as_f64().unwrap_or(0.0),
        mach["kernel"].as_str().unwrap_or("?"),
        mach["date"].as_str().unwrap_or(""),
        if r["quick"].as_bool() == Some(true) { " (--quick: short runs, numbers are only a smoke test)" } else { "" },
    );
    s.push('\n');
    s.push_str("| | no mesh | sidecars (Envoy per pod) | mesh (proxy per node) |\n|---|---:|---:|---:|\n");
    let row = |s: &mut String, label: &str, cell: &dyn Fn(&Value) -> String| {
        let _ = writeln!(s, "| {label} | {} | {} | {} |", cell(&m["no_mesh"]), cell(&m["sidecars"]), cell(&m["mesh"]));
    };
    row(&mut s, "proxy processes", &|v| v["proxy_processes"].to_string());
    row(&mut s, "proxy memory idle (RSS MiB)", &|v| f(&v["idle_rss_mib"], 1));
    row(&mut s, "proxy memory steady (RSS MiB)", &|v| f(&v["steady_rss_mean_mib"], 1));
    row(&mut s, "proxy memory peak (RSS MiB)", &|v| f(&v["peak_rss_mib"], 1));
    row(&mut s, "proxy CPU steady (vCPU)", &|v| f(&v["steady"]["proxy_vcpu"], 3));
    row(&mut s, "proxy CPU burst 2x (vCPU)", &|v| f(&v["burst"]["proxy_vcpu"], 3));
    row(&mut s, "end-to-end p50 / p90 / p99 steady (ms)", &|v| format!("{} / {} / {}", f(&v["steady"]["p50_ms"], 2), f(&v["steady"]["p90_ms"], 2), f(&v["steady"]["p99_ms"], 2)));
    row(&mut s, "end-to-end p99 burst 2x (ms)", &|v| f(&v["burst"]["p99_ms"], 2));
    row(&mut s, "success steady / burst", &|v| format!("{} / {}", pct(&v["steady"]["success"]), pct(&v["burst"]["success"])));
    row(&mut s, "success, one recall pod failing", &|v| pct(&v["partial_failure"]["success"]));
    row(&mut s, "saturation (service requests/s)", &|v| f(&v["saturation"]["service_ok_rps"], 0));
    let a = &r["added_latency_ms"];
    let _ = writeln!(
        s,
        "\nAdded end-to-end latency over no mesh (p50 / p99): sidecars +{} / +{} ms, mesh +{} / +{} ms.\n",
        f(&a["sidecars"]["p50"], 2),
        f(&a["sidecars"]["p99"], 2),
        f(&a["mesh"]["p50"], 2),
        f(&a["mesh"]["p99"], 2)
    );
    let t = &r["targets"];
    let line = |s: &mut String, what: &str, key: &str, as_pct: bool| {
        let v = &t[key];
        let val = if as_pct { pct(&v["value"]) } else { f(&v["value"], 3) };
        let target = if as_pct { pct(&v["target"]) } else { f(&v["target"], 3) };
        let _ = writeln!(s, "- {what}: {val} (target {target}): {}", verdict(v["met"].as_bool() == Some(true)));
    };
    line(&mut s, "mesh / sidecars memory (steady RSS)", "memory_ratio", false);
    line(&mut s, "mesh / sidecars CPU (steady)", "cpu_ratio", false);
    line(&mut s, "mesh / sidecars added p99", "added_p99_ratio", false);
    line(&mut s, "mesh success with one recall pod failing", "partial_failure_success", true);
    s
}

/// The smoke test's check: every mode ran every scenario and measured something (requests
/// answered, latency, saturation throughput; proxy CPU and memory where there are proxies).
pub fn check_numbers(path: &Path) -> anyhow::Result<()> {
    let report: Value = serde_json::from_slice(&fs::read(path).with_context(|| format!("reading {}", path.display()))?)?;
    let mut missing = Vec::new();
    for mode in [Mode::NoMesh, Mode::Sidecars, Mode::Mesh] {
        let m = &report["modes"][mode.key()];
        let positive = |v: &Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
        let mut need = vec![
            ("steady.ok", &m["steady"]["ok"]),
            ("steady.p50_ms", &m["steady"]["p50_ms"]),
            ("steady.p99_ms", &m["steady"]["p99_ms"]),
            ("burst.ok", &m["burst"]["ok"]),
            ("partial_failure.requests", &m["partial_failure"]["requests"]),
            ("saturation.service_ok_rps", &m["saturation"]["service_ok_rps"]),
        ];
        if mode != Mode::NoMesh {
            need.extend([("steady.proxy_vcpu", &m["steady"]["proxy_vcpu"]), ("steady_rss_mean_mib", &m["steady_rss_mean_mib"]), ("peak_rss_mib", &m["peak_rss_mib"])]);
        }
        missing.extend(need.into_iter().filter(|(_, v)| !positive(v)).map(|(k, v)| format!("{}: {k} = {v}", mode.name())));
    }
    if !missing.is_empty() {
        bail!("{}: modes without numbers:\n  {}", path.display(), missing.join("\n  "));
    }
    println!("bench overhead --quick: every mode produced numbers ({})", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn sidecar_config_is_yaml_with_every_service() {
        let certs = crate::bench_l7::Certs { ca: PathBuf::from("/w/ca.crt"), cert: PathBuf::from("/w/leaf.crt"), key: PathBuf::from("/w/leaf.key") };
        let y = super::sidecar_config(&|p| format!("10.244.0.{}", p.len()), "bff", &certs);
        let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap_or_else(|e| panic!("{e}\n{y}"));
        let clusters = v["static_resources"]["clusters"].as_sequence().unwrap();
        // passthrough, inbound, one per Service, two for recall's subsets.
        assert_eq!(clusters.len(), 2 + 7 + 1);
        let chains = v["static_resources"]["listeners"][0]["filter_chains"].as_sequence().unwrap();
        assert_eq!(chains.len(), 7 + 1);
        let tls_in = &v["static_resources"]["listeners"][1]["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"];
        let tls_out = &clusters[2]["transport_socket"]["typed_config"]["common_tls_context"];
        for tls in [tls_in, tls_out] {
            assert_eq!(tls["tls_certificates"][0]["private_key"]["filename"], "/w/leaf.key", "{y}");
            assert_eq!(tls["validation_context"]["trusted_ca"]["filename"], "/w/ca.crt", "{y}");
        }
    }

    #[test]
    fn policies_validate_as_istio_yaml() {
        let docs: Vec<serde_yaml::Value> = super::policies().split("\n---\n").filter(|d| !d.trim().is_empty()).map(|d| serde_yaml::from_str(d).unwrap()).collect();
        assert_eq!(docs.len(), 14);
        let recall_vs = docs.iter().find(|d| d["kind"] == "VirtualService" && d["metadata"]["name"] == "recall").unwrap();
        assert_eq!(recall_vs["spec"]["http"][1]["route"][0]["weight"], 90);
    }
}
