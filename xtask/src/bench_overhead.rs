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
//! Scenarios per way: idle (20 s without traffic after a 1 s warm-up: a proxy settled, every
//! way alike; the mesh's proxies give back start-up code 15 s after they start), steady (1000 service rps), burst (2x for a few seconds), throughput
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
    bench_account::{Accounting, CpuMeter, Target, report_targets, spread},
    bench_util::{h2load, path_str, probe_json, rss_mib, verdict, write_json},
};

const NS: &str = "shop";
const EDGE_NS: &str = "edge";
const LOADGEN: &str = "loadgen";
pub(crate) const APP_PORT: u16 = 8080;
const BODY: usize = 1024;
/// Service requests per request to bff: bff itself, its four calls, and rank's and rerank's one.
pub(crate) const FANOUT: f64 = 7.0;
pub(crate) const SERVICE_RPS: f64 = 1000.0;
const ENVOY_UID: u32 = 1337;
const ENVOY_OUT: u16 = 15001;
const ENVOY_IN: u16 = 15006;
const FAILING_POD: &str = "recall-v1-a";

const TARGET_MEMORY_RATIO: f64 = 0.10;
const TARGET_IDLE_PROXY_RSS_MIB: f64 = 12.0;
const TARGET_NODE_CPU_RATIO: f64 = 1.0 / 3.0;
const TARGET_PROXY_CPU_RATIO: f64 = 0.25;
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
pub(crate) enum Mode {
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
    /// Runs of each mode, interleaved (no mesh, sidecars, mesh, no mesh, ...).
    pub repeats: usize,
}

/// Seconds per scenario.
struct Durations {
    /// Without traffic, after the warm-up, before idle memory is taken.
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
            Self { idle: 20, steady: 30, burst: 5, saturation: 6, failure: 10 }
        }
    }
}

/// Runs the bench; returns the targets it missed.
pub fn run(out_dir: &Path, opts: &Opts) -> anyhow::Result<Vec<String>> {
    crate::bench_util::with_envoy_workdir("overhead", |envoy, work| run_in(out_dir, opts, envoy, work))
}

fn run_in(out_dir: &Path, opts: &Opts, envoy: &Path, work: &Path) -> anyhow::Result<Vec<String>> {
    let d = Durations::new(opts.quick);
    let started = std::time::Instant::now();
    let certs = crate::bench_l7::make_certs(work).context("certificates for the sidecars' mTLS")?;
    // Envoy runs as uid 1337 (so iptables can tell its own connections apart) and must read these.
    for f in fs::read_dir(work)? {
        set_mode(&f?.path(), 0o644)?;
    }
    set_mode(work, 0o755)?;
    let repeats = opts.repeats.max(1);
    let mut runs: Vec<(Mode, Value)> = Vec::new();
    // Interleaved, so drift in the machine's load touches every mode alike.
    for rep in 0..repeats {
        for mode in [Mode::NoMesh, Mode::Sidecars, Mode::Mesh] {
            eprintln!("bench overhead: {} (repeat {}/{repeats}) ...", mode.name(), rep + 1);
            let mut r = run_mode(mode, &d, envoy, work, &certs).with_context(|| format!("mode {:?}, repeat {}", mode.name(), rep + 1))?;
            r["repeat"] = (rep + 1).into();
            let g = |a: &str, b: &str| r[a][b].as_f64().unwrap_or(0.0);
            eprintln!(
                "bench overhead: {} #{}: steady p50 {:.2} p99 {:.2} ms (late starts {}), success {:.4}, proxy {:.3} vCPU, node {:.3} vCPU, memory {:.1} MiB node-accounted ({:.1} RSS, {:.1} PSS); burst p99 {:.2} ms; saturation {:.0} service rps; one pod failing: success {:.4}",
                mode.name(),
                rep + 1,
                g("steady", "p50_ms"),
                g("steady", "p99_ms"),
                r["steady"]["late_starts"],
                g("steady", "success"),
                g("steady", "proxy_vcpu"),
                g("steady", "node_vcpu"),
                g("steady_memory", "node_accounted_mib"),
                g("steady_memory", "rss_mib"),
                g("steady_memory", "pss_mib"),
                g("burst", "p99_ms"),
                g("saturation", "service_ok_rps"),
                g("partial_failure", "success"),
            );
            runs.push((mode, r));
        }
    }
    let report = summarize(&runs, opts, repeats, started.elapsed().as_secs_f64());
    fs::create_dir_all(out_dir)?;
    write_json(&out_dir.join("overhead.json"), &report)?;
    let md = markdown(&report);
    fs::write(out_dir.join("overhead.md"), &md)?;
    fs::write(out_dir.join("overhead-resources.svg"), bench_chart::resource_bars(&report))?;
    fs::write(out_dir.join("overhead-latency-cdf.svg"), bench_chart::latency_cdf(&report))?;
    println!("{md}");
    println!("wrote {}/overhead.{{md,json}}, overhead-resources.svg, overhead-latency-cdf.svg", out_dir.display());
    let missed = report["targets"]
        .as_object()
        .map(|t| t.iter().filter(|(_, v)| v["met"].as_bool() != Some(true)).map(|(k, _)| format!("overhead: {k}")).collect())
        .unwrap_or_default();
    Ok(missed)
}

pub(crate) fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
}

pub(crate) fn spec(mode: Mode) -> ClusterSpec {
    spec_with(mode, false)
}

/// With `opaque`, every port is named `tcp`: the mesh tunnels each connection and never looks
/// at a request (no routing, retries or per-request balancing), what its L4 layer alone costs.
pub(crate) fn spec_with(mode: Mode, opaque: bool) -> ClusterSpec {
    let port_name = |grpc: bool| match (opaque, grpc) {
        (true, _) => "tcp",
        (false, true) => "grpc",
        (false, false) => "http",
    };
    let mut spec = ClusterSpec::new(2).namespace(NS, mode == Mode::Mesh).namespace(EDGE_NS, false).pod(LOADGEN, EDGE_NS, 0, LOADGEN, 9000);
    for (pod, svc, version, node) in PODS {
        spec = spec.pod_labelled(pod, NS, node, svc, &[("version", version)], port_name(service(svc).grpc), APP_PORT);
    }
    for s in &SERVICES {
        spec = spec.service_named(s.name, NS, s.vip, s.name, port_name(s.grpc), s.port, APP_PORT);
    }
    spec.start_proxies = mode == Mode::Mesh;
    spec.mtls = mode == Mode::Mesh;
    spec
}

/// Where `caller` reaches `callee`: its Service address (captured by the mesh or the sidecar),
/// or with `pod_urls` (always without a mesh) every pod of it in turn.
fn call_arg(c: &SimCluster, mode: Mode, callee: &Service, pod_urls: bool) -> String {
    let scheme = if callee.grpc { "grpc" } else { "http" };
    let urls: Vec<String> = match mode {
        _ if pod_urls => {
            PODS.iter().filter(|p| p.1 == callee.name).map(|p| format!("{scheme}://{}:{APP_PORT}", c.pod(p.0).ip)).collect()
        }
        _ => vec![format!("{scheme}://{}:{}", vip(callee), callee.port)],
    };
    format!("{}={}", callee.name, urls.join(","))
}

pub(crate) fn start_apps(c: &SimCluster, mode: Mode) -> anyhow::Result<()> {
    start_apps_with(c, mode, mode == Mode::NoMesh)
}

/// With `pod_urls` every caller spreads its calls over the callee's pods itself (round robin),
/// as without a mesh; otherwise it calls the Service address and the mesh or sidecar balances.
pub(crate) fn start_apps_with(c: &SimCluster, mode: Mode, pod_urls: bool) -> anyhow::Result<()> {
    let probe = bins::path("mesh-probe");
    let body = BODY.to_string();
    let port = APP_PORT.to_string();
    for (pod, svc, _, _) in PODS {
        let mut args: Vec<String> = ["http-serve", "--name", pod, "--port", &port, "--body-bytes", &body].map(String::from).to_vec();
        for callee in service(svc).calls {
            args.push("--call".into());
            args.push(call_arg(c, mode, service(callee), pod_urls));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.serve_in_pod(pod, &probe, &args, APP_PORT)?;
    }
    Ok(())
}

/// The mesh's processes by where a real cluster would run them: each node's proxy on its node,
/// the CA (a Deployment's pod, the same image as the node proxy: deploy/ca.yaml) on the first
/// node, where its code pages are the node proxy's (one image layer, one page cache).
pub(crate) fn mesh_groups(c: &SimCluster) -> Vec<(String, Vec<u32>)> {
    let mut groups = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let mut pids: Vec<u32> = c.proxy_pid(i).into_iter().collect();
        let procs = fs::read_to_string(node.cgroup.join("mesh-node").join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        groups.push((node.name.clone(), pids));
    }
    if let (Some(ca), Some(first)) = (c.ca_pid(), groups.first_mut()) {
        first.1.push(ca);
    }
    groups
}

fn run_mode(mode: Mode, d: &Durations, envoy: &Path, work: &Path, certs: &crate::bench_l7::Certs) -> anyhow::Result<Value> {
    let c = SimCluster::start(spec(mode))?;
    start_apps(&c, mode)?;
    // (group name, pids): what each node runs for the mesh (sidecars: the Envoys of its pods).
    let groups: Vec<(String, Vec<u32>)> = match mode {
        Mode::NoMesh => Vec::new(),
        Mode::Sidecars => {
            let pids = start_overhead_sidecars(&c, envoy, work, certs)?;
            c.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.clone(), PODS.iter().zip(&pids).filter(|(p, _)| p.3 == i).map(|(_, pid)| *pid).collect()))
                .collect()
        }
        Mode::Mesh => {
            c.apply_config("policies.yaml", &policies())?;
            mesh_groups(&c)
        }
    };
    let proxies: Vec<u32> = groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let node_proxies: Vec<u32> = match mode {
        Mode::Mesh => (0..c.nodes.len()).filter_map(|i| c.proxy_pid(i)).collect(),
        _ => proxies.clone(),
    };
    let bff = format!("http://{}:{APP_PORT}/", c.pod("bff").ip);
    let rate = SERVICE_RPS / FANOUT;
    // Warm up: connections, certificates, pools.
    let warm = load(&c, &bff, rate, 1, &[])?;
    if warm["requests"].as_u64().unwrap_or(0) == 0 {
        bail!("warm-up sent no request: {warm}");
    }
    thread::sleep(Duration::from_secs(d.idle));
    let idle = Accounting::take(&groups);
    let idle_proxy_rss_max = node_proxies.iter().map(|p| rss_mib(*p)).fold(0.0, f64::max);

    let sampler = MemSampler::start(groups.clone());
    eprintln!("bench overhead: {}: steady {} s at {rate:.0} rps to bff ({SERVICE_RPS} service rps)", mode.name(), d.steady);
    let steady = measured(&c, &bff, rate, d.steady, &[], &proxies, Some(&sampler))?;
    let steady_memory = sampler.mean();
    eprintln!("bench overhead: {}: burst {} s at {:.0} rps", mode.name(), d.burst, 2.0 * rate);
    let burst = measured(&c, &bff, 2.0 * rate, d.burst, &[], &proxies, None)?;
    eprintln!("bench overhead: {}: saturation {} s (h2load, 32 connections)", mode.name(), d.saturation);
    let saturation = saturate(&c, &bff, d.saturation, &proxies, work)?;
    eprintln!("bench overhead: {}: partial failure {} s ({FAILING_POD} answers 503)", mode.name(), d.failure);
    let fail_header = format!("x-fail-pods: {FAILING_POD}");
    let failure = measured(&c, &bff, rate, d.failure, &[&fail_header], &proxies, None)?;
    let (peak, last) = sampler.stop();
    // The CA alone (mesh only): what leaving it out, or giving it its own copy of the binary
    // (a node without a node proxy), changes.
    let ca = c.ca_pid().filter(|_| mode == Mode::Mesh).and_then(crate::bench_account::proc_mem);
    let ca = ca.map_or(Value::Null, |p| json!({"rss_mib": p.rss_kib as f64 / 1024.0, "pss_mib": p.pss_kib as f64 / 1024.0, "uss_mib": p.uss_kib as f64 / 1024.0}));
    let hwm_mib = proxies.iter().map(|p| hwm_mib(*p)).fold(0.0, |a, b| a + b);
    if mode != Mode::NoMesh && proxies.iter().any(|p| !Path::new(&format!("/proc/{p}")).exists()) {
        bail!("a proxy process exited during the run");
    }
    Ok(json!({
        "proxy_processes": node_proxies.len(),
        "mesh_processes": proxies.len(),
        "idle_memory": idle.to_json(),
        "idle_proxy_rss_max_mib": idle_proxy_rss_max,
        "steady_memory": steady_memory,
        "steady_memory_last_sample": last.to_json(),
        "ca_memory_after": ca,
        "peak_memory": peak,
        "sum_vmhwm_mib": hwm_mib,
        "steady": steady,
        "burst": burst,
        "saturation": saturation,
        "partial_failure": failure,
    }))
}

/// One fixed-rate run of the load generator against bff; its JSON report. Latency counts from
/// each request's scheduled start (`mesh-probe http --rate`), late starts reported.
pub(crate) fn load(c: &SimCluster, url: &str, rate: f64, seconds: u64, headers: &[&str]) -> anyhow::Result<Value> {
    let count = ((rate * seconds as f64).round() as u64).max(1).to_string();
    let rate = format!("{rate:.3}");
    let body = BODY.to_string();
    let mut args = vec!["http", url, "--method", "POST", "--body-bytes", &body, "--rate", &rate, "--count", &count, "--conns", "16", "--timeout-ms", "5000"];
    for h in headers {
        args.extend(["--header", h]);
    }
    probe_json(c, LOADGEN, &args, Duration::from_secs(seconds + 60))
}

/// A fixed-rate run with the proxies' and the node's CPU around it.
fn measured(c: &SimCluster, url: &str, rate: f64, seconds: u64, headers: &[&str], proxies: &[u32], mem: Option<&MemSampler>) -> anyhow::Result<Value> {
    if let Some(s) = mem {
        s.reset_mean();
    }
    let meter = CpuMeter::start_in(proxies, Some(&c.root_cgroup));
    let r = load(c, url, rate, seconds, headers)?;
    let cpu = meter.stop();
    if let Some(s) = mem {
        s.freeze_mean();
    }
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
        "latency_from": r["latency_from"],
        "late_starts": r["late_starts"],
        "max_start_lag_us": r["max_start_lag_us"],
        "achieved_rps": r["achieved_rps"],
        "p50_ms": r["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p90_ms": r["p90_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p99_ms": r["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "cdf_ms": r["cdf_us"].as_array().map(|a| a.iter().map(|p| json!([p[0], p[1].as_f64().unwrap_or(0.0) / 1000.0])).collect::<Vec<_>>()),
    });
    merge(&mut out, cpu.to_json());
    Ok(out)
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// Closed-loop load: the most bff requests a second the whole chain answers.
fn saturate(c: &SimCluster, url: &str, seconds: u64, proxies: &[u32], work: &Path) -> anyhow::Result<Value> {
    let body = work.join("body-1k");
    fs::write(&body, vec![b'x'; BODY])?;
    let meter = CpuMeter::start_in(proxies, Some(&c.root_cgroup));
    let r = h2load(c, LOADGEN, &["-c32", "-m1", "--h1", "-d", body.to_str().expect("UTF-8 temp path"), url], seconds)?;
    let cpu = meter.stop();
    let ok_rps = r["ok_rps"].as_f64().unwrap_or(0.0);
    let mut out = json!({
        "bff_ok_rps": ok_rps,
        "service_ok_rps": ok_rps * FANOUT,
        "failed": r["failed"],
        "errored": r["errored"],
    });
    merge(&mut out, cpu.to_json());
    Ok(out)
}

fn hwm_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()).and_then(|kb| kb.parse::<f64>().ok()).map_or(0.0, |kb| kb / 1024.0)
}

/// Takes the whole-node memory accounting of the mesh's processes every second: the peak over
/// the whole run, and means over the window between [`MemSampler::reset_mean`] and
/// [`MemSampler::freeze_mean`].
struct MemSampler {
    stop: Arc<AtomicBool>,
    state: Arc<std::sync::Mutex<SamplerState>>,
    handle: Option<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct SamplerState {
    peak_node: f64,
    peak_rss: f64,
    /// node-accounted, RSS, PSS, private sums and count over the mean window.
    sums: [f64; 4],
    count: u64,
    frozen: bool,
    last: Accounting,
}

impl MemSampler {
    fn start(groups: Vec<(String, Vec<u32>)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(std::sync::Mutex::new(SamplerState::default()));
        let (s, st) = (stop.clone(), state.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let a = Accounting::take(&groups);
                let mut g = st.lock().unwrap();
                g.peak_node = g.peak_node.max(a.node_mib());
                g.peak_rss = g.peak_rss.max(a.rss_mib());
                if !g.frozen {
                    for (i, v) in [a.node_mib(), a.rss_mib(), a.pss_mib(), a.private_mib()].into_iter().enumerate() {
                        g.sums[i] += v;
                    }
                    g.count += 1;
                    g.last = a;
                }
                drop(g);
                // Short sleeps, so stop() does not wait a whole period.
                for _ in 0..10 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Self { stop, state, handle: Some(handle) }
    }
    fn reset_mean(&self) {
        let mut g = self.state.lock().unwrap();
        g.sums = [0.0; 4];
        g.count = 0;
        g.frozen = false;
    }
    fn freeze_mean(&self) {
        self.state.lock().unwrap().frozen = true;
    }
    fn mean(&self) -> Value {
        let g = self.state.lock().unwrap();
        let m = |i: usize| if g.count == 0 { 0.0 } else { g.sums[i] / g.count as f64 };
        json!({"node_accounted_mib": m(0), "rss_mib": m(1), "pss_mib": m(2), "private_mib": m(3), "samples": g.count})
    }
    /// Stops sampling: the peaks, and the last sample of the mean window (per process).
    fn stop(mut self) -> (Value, Accounting) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let g = self.state.lock().unwrap();
        (json!({"node_accounted_mib": g.peak_node, "rss_mib": g.peak_rss}), g.last.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// The mesh's policies: the seed's Istio YAML, as the users apply it.

pub(crate) fn policies() -> String {
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

/// The overhead bench's sidecars: one per service pod, every Service known to each.
fn start_overhead_sidecars(c: &SimCluster, envoy: &Path, work: &Path, certs: &crate::bench_l7::Certs) -> anyhow::Result<Vec<u32>> {
    let services = overhead_services(&|p| c.pod(p).ip.to_string());
    let shape = SidecarShape { namespace: NS, app_port: APP_PORT, services: &services };
    let pods: Vec<&str> = PODS.iter().map(|p| p.0).collect();
    start_sidecars(c, envoy, work, certs, &shape, &pods)
}

/// The seven Services as every sidecar sees them: recall's two subsets and its 90/10 canary
/// route, the others one cluster each, the seed's route policy on every route.
fn overhead_services(ip_of: &dyn Fn(&str) -> String) -> Vec<MeshService> {
    SERVICES
        .iter()
        .map(|s| {
            let subsets: Vec<(&str, Option<&str>)> = if s.name == "recall" { vec![("v1", Some("v1")), ("v2", Some("v2"))] } else { vec![("", None)] };
            let clusters = subsets
                .into_iter()
                .map(|(subset, version)| (subset.to_string(), PODS.iter().filter(|p| p.1 == s.name && version.is_none_or(|v| p.2 == v)).map(|p| ip_of(p.0)).collect()))
                .collect();
            let routes = if s.name == "recall" {
                format!(
                    "              - match: {{prefix: \"/\", headers: [{{name: x-canary, string_match: {{exact: \"true\"}}}}]}}\n                route: {{cluster: outbound|recall|v2, {ROUTE_POLICY}}}\n              - match: {{prefix: \"/\"}}\n                route:\n                  weighted_clusters:\n                    clusters:\n                    - {{name: outbound|recall|v1, weight: 90}}\n                    - {{name: outbound|recall|v2, weight: 10}}\n                  timeout: 2s\n                  retry_policy: {RETRY_POLICY}\n"
                )
            } else {
                format!("              - match: {{prefix: \"/\"}}\n                route: {{cluster: outbound|{}|, {ROUTE_POLICY}}}\n", s.name)
            };
            MeshService { name: s.name.into(), vip: vip(s), port: s.port, grpc: s.grpc, clusters, routes, outlier_interval: "10s" }
        })
        .collect()
}

/// What a sidecar knows of one Service: its address, the clusters its routes send to and the
/// routes (YAML list items at a virtual host's `routes:` indentation).
pub(crate) struct MeshService {
    pub(crate) name: String,
    pub(crate) vip: String,
    pub(crate) port: u16,
    pub(crate) grpc: bool,
    /// (subset, endpoint addresses); cluster `outbound|<name>|<subset>`, endpoints at the app port.
    pub(crate) clusters: Vec<(String, Vec<String>)>,
    pub(crate) routes: String,
    pub(crate) outlier_interval: &'static str,
}

/// Every sidecar of a bench: the namespace of its Services, the application port and the
/// Services each sidecar knows.
pub(crate) struct SidecarShape<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) app_port: u16,
    pub(crate) services: &'a [MeshService],
}

/// The SPIFFE identity in the benches' one workload certificate (`bench_l7::make_certs`), which
/// each client sidecar requires of the server it reaches, as Istio's sidecars check the
/// destination's service account.
pub(crate) const SIDECAR_SAN: &str = "spiffe://cluster.local/ns/mesh/sa/default";

/// Starts one Envoy per pod (`--concurrency 2`, as uid 1337), waits until each listens on
/// 15001 and 15006, then installs istio-init's iptables rules in its pod; returns the pids in
/// the order of `pods`. The files in `work` must be readable by uid 1337.
pub(crate) fn start_sidecars(c: &SimCluster, envoy: &Path, work: &Path, certs: &crate::bench_l7::Certs, shape: &SidecarShape, pods: &[&str]) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    let setpriv = Path::new("setpriv");
    for pod in pods {
        let cfg = work.join(format!("envoy-{pod}.yaml"));
        fs::write(&cfg, sidecar_config(shape, pod, certs))?;
        set_mode(&cfg, 0o644)?;
        let log = work.join(format!("envoy-{pod}.log"));
        let uid = format!("--reuid={ENVOY_UID}");
        let gid = format!("--regid={ENVOY_UID}");
        let pid = c.spawn_in_pod_pid(
            pod,
            setpriv,
            &[&uid, &gid, "--clear-groups", path_str(envoy), "-c", path_str(&cfg), "--concurrency", "2", "--disable-hot-restart", "-l", "warning", "--service-node", pod, "--service-cluster", shape.namespace],
            Some(&log),
        )?;
        pids.push(pid);
    }
    let probe = bins::path("mesh-probe");
    for (pod, pid) in pods.iter().zip(&pids) {
        for port in [ENVOY_OUT, ENVOY_IN] {
            let addr = format!("127.0.0.1:{port}");
            if !c.run_in_pod(pod, &probe, &["wait", &addr, "--timeout-ms", "20000"], Duration::from_secs(30))?.status.success() {
                bail!("Envoy (pid {pid}) in {pod} did not listen on {port}:\n{}", fs::read_to_string(work.join(format!("envoy-{pod}.log"))).unwrap_or_default());
            }
        }
        // istio-init's rules, in the pod's namespace, once its Envoy listens.
        let uid = ENVOY_UID.to_string();
        let app = shape.app_port.to_string();
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
/// Service address, chosen by original destination; upstream mTLS requiring the server's SPIFFE
/// identity), inbound on 15006 (TLS with a client certificate of the mesh's CA, or plaintext:
/// PERMISSIVE).
pub(crate) fn sidecar_config(shape: &SidecarShape, pod: &str, certs: &crate::bench_l7::Certs) -> String {
    let ns = shape.namespace;
    let app_port = shape.app_port;
    // The certificate list item and the CA, for a `common_tls_context` whose fields sit at
    // column `indent`; with `san`, the peer must present that URI SAN.
    let tls_files = |indent: usize, san: Option<&str>| {
        let pad = " ".repeat(indent);
        let san = san.map_or(String::new(), |id| format!("{pad}  match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: {id:?}}}}}]\n"));
        format!(
            "{pad}tls_certificates:\n{pad}- certificate_chain: {{filename: {:?}}}\n{pad}  private_key: {{filename: {:?}}}\n{pad}validation_context:\n{pad}  trusted_ca: {{filename: {:?}}}\n{san}",
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
    for s in shape.services {
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
            vip = s.vip,
            port = s.port,
            name = s.name,
            routes = s.routes,
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
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app_port}}}}}}}
"#,
        inbound = inbound_filters(pod),
        tls_in = tls_files(12, None),
    );
    for s in shape.services {
        for (subset, ips) in &s.clusters {
            let endpoints: String =
                ips.iter().map(|ip| format!("        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {app_port}}}}}}}\n")).collect();
            let protocol = if s.grpc { "http2_protocol_options: {}" } else { "http_protocol_options: {}" };
            let _ = write!(
                y,
                r#"  - name: outbound|{name}|{subset}
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    outlier_detection:
      consecutive_5xx: 5
      interval: {interval}
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
        sni: outbound_.{port}_.{subset}_.{name}.{ns}.svc.cluster.local
        common_tls_context:
          alpn_protocols: [{alpn}]
{tls_out}    load_assignment:
      cluster_name: outbound|{name}|{subset}
      endpoints:
      - lb_endpoints:
{endpoints}"#,
                name = s.name,
                port = s.port,
                interval = s.outlier_interval,
                alpn = if s.grpc { "h2" } else { "http/1.1" },
                tls_out = tls_files(10, Some(SIDECAR_SAN)),
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
/// The same retries without a route timeout (the L7 bench's policies: `seed_policies`).
pub(crate) const ROUTE_POLICY_NO_TIMEOUT: &str = concat!("timeout: 0s, retry_policy: ", retry_policy!());

/// The inbound HTTP filter chain's filters: to the app on localhost, in the caller's protocol.
fn inbound_filters(pod: &str) -> String {
    format!("      filters:\n{}", crate::bench_l7::hcm_to_cluster(&format!("inbound_{pod}"), "inbound"))
}

// ---------------------------------------------------------------------------------------------
// The report.

/// (key, path in a run's JSON): the numbers reported per mode as median [min-max] over repeats.
const METRICS: [(&str, &[&str]); 27] = [
    ("proxy_processes", &["proxy_processes"]),
    ("mesh_processes", &["mesh_processes"]),
    ("idle_node_mib", &["idle_memory", "node_accounted_mib"]),
    ("idle_pss_mib", &["idle_memory", "pss_mib"]),
    ("idle_rss_mib", &["idle_memory", "rss_mib"]),
    ("idle_proxy_rss_max_mib", &["idle_proxy_rss_max_mib"]),
    ("steady_node_mib", &["steady_memory", "node_accounted_mib"]),
    ("steady_private_mib", &["steady_memory", "private_mib"]),
    ("steady_pss_mib", &["steady_memory", "pss_mib"]),
    ("steady_rss_mib", &["steady_memory", "rss_mib"]),
    ("peak_node_mib", &["peak_memory", "node_accounted_mib"]),
    ("steady_proxy_vcpu", &["steady", "proxy_vcpu"]),
    ("steady_node_vcpu", &["steady", "node_vcpu"]),
    ("steady_node_irq_softirq_vcpu", &["steady", "node_irq_softirq_vcpu"]),
    ("steady_node_steal_vcpu", &["steady", "node_steal_vcpu"]),
    ("steady_cluster_vcpu", &["steady", "cluster_vcpu"]),
    ("burst_proxy_vcpu", &["burst", "proxy_vcpu"]),
    ("burst_node_vcpu", &["burst", "node_vcpu"]),
    ("steady_p50_ms", &["steady", "p50_ms"]),
    ("steady_p90_ms", &["steady", "p90_ms"]),
    ("steady_p99_ms", &["steady", "p99_ms"]),
    ("steady_late_starts", &["steady", "late_starts"]),
    ("burst_p99_ms", &["burst", "p99_ms"]),
    ("steady_success", &["steady", "success"]),
    ("burst_success", &["burst", "success"]),
    ("failure_success", &["partial_failure", "success"]),
    ("saturation_service_rps", &["saturation", "service_ok_rps"]),
];

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn num(v: &Value, path: &[&str]) -> f64 {
    at(v, path).as_f64().unwrap_or(f64::NAN)
}

fn summarize(runs: &[(Mode, Value)], opts: &Opts, repeats: usize, seconds: f64) -> Value {
    let of = |mode: Mode| -> Vec<&Value> { runs.iter().filter(|(m, _)| *m == mode).map(|(_, r)| r).collect() };
    let mut by_mode = serde_json::Map::new();
    for mode in [Mode::NoMesh, Mode::Sidecars, Mode::Mesh] {
        let rs = of(mode);
        let mut stats = serde_json::Map::new();
        for (key, path) in METRICS {
            stats.insert(key.into(), spread(&rs.iter().map(|r| num(r, path)).collect::<Vec<_>>()).to_json());
        }
        // The run whose steady p99 is the median one: its latency CDF and per-node memory are shown.
        let mut order: Vec<&Value> = rs.clone();
        order.sort_by(|a, b| num(a, &["steady", "p99_ms"]).total_cmp(&num(b, &["steady", "p99_ms"])));
        let median_run = order.get(order.len() / 2).copied().cloned().unwrap_or(Value::Null);
        by_mode.insert(
            mode.key().into(),
            json!({
                "name": mode.name(),
                "stats": stats,
                "proxy_processes": median_run["proxy_processes"],
                "steady": median_run["steady"],
                "median_run_repeat": median_run["repeat"],
                "median_run_memory": median_run["steady_memory_last_sample"],
                "runs": rs,
            }),
        );
    }
    // Ratios per repeat (the three modes of one repeat ran back to back), then their spread.
    let rep = |mode: Mode, i: usize| of(mode).get(i).copied().cloned().unwrap_or(Value::Null);
    let per_repeat = |f: &dyn Fn(&Value, &Value, &Value) -> f64| -> Vec<f64> { (0..repeats).map(|i| f(&rep(Mode::NoMesh, i), &rep(Mode::Sidecars, i), &rep(Mode::Mesh, i))).collect() };
    let st = |r: &Value, k: &str| num(r, &["steady", k]);
    // Latency a mode adds is never below zero: a p99 under the no-mesh one is run-to-run noise.
    // With nothing added by the sidecars the ratio is undefined (NaN: the target reads not met).
    let added = |m: &Value, base: &Value, k: &str| (st(m, k) - st(base, k)).max(0.0);
    let memory = per_repeat(&|_, s, m| num(m, &["steady_memory", "node_accounted_mib"]) / num(s, &["steady_memory", "node_accounted_mib"]));
    let memory_no_ca = per_repeat(&|_, s, m| (num(m, &["steady_memory", "node_accounted_mib"]) - num(m, &["ca_memory_after", "uss_mib"])) / num(s, &["steady_memory", "node_accounted_mib"]));
    let memory_ca_own_binary = per_repeat(&|_, s, m| {
        let ca_shared = num(m, &["ca_memory_after", "rss_mib"]) - num(m, &["ca_memory_after", "uss_mib"]);
        (num(m, &["steady_memory", "node_accounted_mib"]) + ca_shared) / num(s, &["steady_memory", "node_accounted_mib"])
    });
    let memory_rss = per_repeat(&|_, s, m| num(m, &["steady_memory", "rss_mib"]) / num(s, &["steady_memory", "rss_mib"]));
    let memory_pss = per_repeat(&|_, s, m| num(m, &["steady_memory", "pss_mib"]) / num(s, &["steady_memory", "pss_mib"]));
    let idle_rss = per_repeat(&|_, _, m| num(m, &["idle_proxy_rss_max_mib"]));
    // With the VM's CPUs saturated (by the bench or by anything else running on it) the
    // differences say nothing: such a repeat counts as not measured.
    let saturated = |r: &Value| r["steady"]["node_saturated"].as_bool() == Some(true);
    let node_cpu = per_repeat(&|n, s, m| {
        if saturated(n) || saturated(s) || saturated(m) {
            return f64::NAN;
        }
        (st(m, "node_vcpu") - st(n, "node_vcpu")) / (st(s, "node_vcpu") - st(n, "node_vcpu"))
    });
    let cluster_cpu = per_repeat(&|n, s, m| (st(m, "cluster_vcpu") - st(n, "cluster_vcpu")) / (st(s, "cluster_vcpu") - st(n, "cluster_vcpu")));
    let saturated_repeats = (0..repeats).filter(|i| [Mode::NoMesh, Mode::Sidecars, Mode::Mesh].iter().any(|m| saturated(&rep(*m, *i)))).count();
    if saturated_repeats > 0 {
        println!("note: in {saturated_repeats} of {repeats} repeat(s) the VM's CPUs were saturated (>= 90% busy) during the steady phase: node CPU differences from /proc/stat are not measured there");
    }
    let proxy_cpu = per_repeat(&|_, s, m| st(m, "proxy_vcpu") / st(s, "proxy_vcpu"));
    let p99 = per_repeat(&|n, s, m| added(m, n, "p99_ms") / added(s, n, "p99_ms"));
    let p50 = per_repeat(&|n, s, m| added(m, n, "p50_ms") / added(s, n, "p50_ms"));
    let failure = per_repeat(&|_, _, m| num(m, &["partial_failure", "success"]));
    let targets = [
        Target { key: "memory_ratio", what: "mesh / sidecars memory (per-node accounting, steady, CA included)".into(), values: memory.clone(), limit: TARGET_MEMORY_RATIO, at_most: true, unit: "", digits: 3 },
        Target { key: "idle_proxy_rss_mib", what: "one idle node proxy (largest RSS of the two)".into(), values: idle_rss, limit: TARGET_IDLE_PROXY_RSS_MIB, at_most: true, unit: " MiB", digits: 1 },
        Target { key: "node_cpu_ratio", what: "node CPU added over no mesh, mesh / sidecars (steady)".into(), values: node_cpu, limit: TARGET_NODE_CPU_RATIO, at_most: true, unit: "", digits: 3 },
        Target { key: "cluster_cpu_ratio", what: "simulated cluster's CPU (cgroup cpu.stat) added over no mesh, mesh / sidecars (steady)".into(), values: cluster_cpu, limit: TARGET_NODE_CPU_RATIO, at_most: true, unit: "", digits: 3 },
        Target { key: "proxy_cpu_ratio", what: "proxy CPU, mesh (proxies + CA) / sidecars (steady)".into(), values: proxy_cpu, limit: TARGET_PROXY_CPU_RATIO, at_most: true, unit: "", digits: 3 },
        Target { key: "added_p99_ratio", what: "added p99, mesh / sidecars (steady)".into(), values: p99, limit: TARGET_P99_RATIO, at_most: true, unit: "", digits: 3 },
        Target { key: "partial_failure_success", what: "mesh success with one recall pod failing".into(), values: failure, limit: TARGET_FAILURE_SUCCESS, at_most: false, unit: "", digits: 4 },
    ];
    let (targets_json, _) = report_targets("overhead", &targets);
    let ratios = json!({
        "memory_node_accounted": spread(&memory).to_json(),
        "memory_node_accounted_without_ca": spread(&memory_no_ca).to_json(),
        "memory_node_accounted_ca_on_a_node_of_its_own": spread(&memory_ca_own_binary).to_json(),
        "memory_rss": spread(&memory_rss).to_json(),
        "memory_pss": spread(&memory_pss).to_json(),
        "added_p50": spread(&p50).to_json(),
    });
    let saturated_note = saturated_repeats;
    let added_ms = |mode: Mode, k: &str| spread(&per_repeat(&|n, s, m| st(if mode == Mode::Mesh { m } else { s }, k) - st(n, k))).to_json();
    json!({
        "suite": "overhead",
        "quick": opts.quick,
        "repeats": repeats,
        "machine": machine(),
        "seconds": seconds,
        "load": {"bff_rps": SERVICE_RPS / FANOUT, "service_rps": SERVICE_RPS, "body_bytes": BODY, "fanout": FANOUT},
        "accounting": "memory per node: private (USS) of every mesh process on the node plus each binary's shared pages once (largest RSS-USS among its processes there); the mesh CA on node-a (same image as the node proxy). Latency from each request's scheduled start.",
        "node_cpu": crate::bench_account::NODE_CPU_METHOD,
        "modes": by_mode,
        "added_latency_ms": {
            "sidecars": {"p50": added_ms(Mode::Sidecars, "p50_ms"), "p90": added_ms(Mode::Sidecars, "p90_ms"), "p99": added_ms(Mode::Sidecars, "p99_ms")},
            "mesh": {"p50": added_ms(Mode::Mesh, "p50_ms"), "p90": added_ms(Mode::Mesh, "p90_ms"), "p99": added_ms(Mode::Mesh, "p99_ms")},
        },
        "ratios": ratios,
        "node_cpu_saturated_repeats": saturated_note,
        "targets": targets_json,
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

/// A spread as "median [min-max]" from the report's JSON.
fn show(v: &Value, digits: usize, scale: f64) -> String {
    let g = |k: &str| v[k].as_f64().map(|x| x * scale);
    match (g("median"), g("min"), g("max")) {
        (Some(m), Some(lo), Some(hi)) if v["n"].as_u64().unwrap_or(0) > 1 => format!("{m:.digits$} [{lo:.digits$}-{hi:.digits$}]"),
        (Some(m), _, _) => format!("{m:.digits$}"),
        _ => "-".into(),
    }
}

fn markdown(r: &Value) -> String {
    let m = &r["modes"];
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
    let _ = writeln!(
        s,
        "\nEach mode ran {} time(s), interleaved (no mesh, sidecars, mesh, no mesh, ...); cells are the median [min-max] over the runs. Latency counts from each request's scheduled start. Memory as a node pays it: the private memory (USS) of every mesh process on the node plus each binary's shared pages once (approximated as the largest RSS-USS among that binary's processes on the node; shared libraries are counted with it); the mesh CA (same image as the node proxy) runs on node-a. Node CPU: {} (both simulated nodes, load generator and apps), so kernel work a mode causes shows as its difference to no mesh.\n",
        r["repeats"],
        crate::bench_account::NODE_CPU_METHOD
    );
    s.push_str("| | no mesh | sidecars (Envoy per pod) | mesh (proxy per node) |\n|---|---:|---:|---:|\n");
    let row = |s: &mut String, label: &str, key: &str, digits: usize, scale: f64| {
        let cell = |mode: &str| show(&m[mode]["stats"][key], digits, scale);
        let _ = writeln!(s, "| {label} | {} | {} | {} |", cell("no_mesh"), cell("sidecars"), cell("mesh"));
    };
    row(&mut s, "proxy processes (+ mesh CA)", "mesh_processes", 0, 1.0);
    row(&mut s, "memory idle, per-node accounting (MiB)", "idle_node_mib", 1, 1.0);
    row(&mut s, "memory steady, per-node accounting (MiB)", "steady_node_mib", 1, 1.0);
    row(&mut s, "memory steady, sum of PSS (MiB)", "steady_pss_mib", 1, 1.0);
    row(&mut s, "memory steady, sum of USS (MiB)", "steady_private_mib", 1, 1.0);
    row(&mut s, "memory steady, sum of RSS (MiB)", "steady_rss_mib", 1, 1.0);
    row(&mut s, "memory peak, per-node accounting (MiB)", "peak_node_mib", 1, 1.0);
    row(&mut s, "one idle node proxy, largest RSS (MiB)", "idle_proxy_rss_max_mib", 1, 1.0);
    row(&mut s, "proxy CPU steady (vCPU)", "steady_proxy_vcpu", 3, 1.0);
    row(&mut s, "node CPU steady (vCPU, whole VM)", "steady_node_vcpu", 3, 1.0);
    row(&mut s, "  of which irq+softirq (vCPU, by the tick-sampled share)", "steady_node_irq_softirq_vcpu", 3, 1.0);
    row(&mut s, "CPU the host took from the VM steady (steal, vCPU)", "steady_node_steal_vcpu", 3, 1.0);
    row(&mut s, "simulated cluster's CPU steady (vCPU, cgroup)", "steady_cluster_vcpu", 3, 1.0);
    row(&mut s, "proxy CPU burst 2x (vCPU)", "burst_proxy_vcpu", 3, 1.0);
    row(&mut s, "node CPU burst 2x (vCPU)", "burst_node_vcpu", 3, 1.0);
    row(&mut s, "end-to-end p50 steady (ms)", "steady_p50_ms", 2, 1.0);
    row(&mut s, "end-to-end p90 steady (ms)", "steady_p90_ms", 2, 1.0);
    row(&mut s, "end-to-end p99 steady (ms)", "steady_p99_ms", 2, 1.0);
    row(&mut s, "late starts steady (of the load generator's requests)", "steady_late_starts", 0, 1.0);
    row(&mut s, "end-to-end p99 burst 2x (ms)", "burst_p99_ms", 2, 1.0);
    row(&mut s, "success steady (%)", "steady_success", 2, 100.0);
    row(&mut s, "success burst (%)", "burst_success", 2, 100.0);
    row(&mut s, "success, one recall pod failing (%)", "failure_success", 2, 100.0);
    row(&mut s, "saturation (service requests/s)", "saturation_service_rps", 0, 1.0);

    s.push_str("\nPer node, steady (last sample of each mode's median run), MiB:\n\n| mode | group | processes | per-node accounting | private (USS) | shared once per binary | sum PSS | sum RSS |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
    for mode in ["sidecars", "mesh"] {
        for g in m[mode]["median_run_memory"]["groups"].as_array().into_iter().flatten() {
            let f = |k: &str| g[k].as_f64().map_or("-".into(), |x| format!("{x:.1}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                m[mode]["name"].as_str().unwrap_or(mode),
                g["name"].as_str().unwrap_or("?"),
                g["processes"].as_array().map_or(0, Vec::len),
                f("node_accounted_mib"),
                f("private_mib"),
                f("shared_once_per_binary_mib"),
                f("pss_mib"),
                f("rss_mib")
            );
        }
    }
    let a = &r["added_latency_ms"];
    let _ = writeln!(
        s,
        "\nAdded end-to-end latency over no mesh (per repeat, median [min-max]): p50 sidecars +{} ms, mesh +{} ms; p99 sidecars +{} ms, mesh +{} ms.",
        show(&a["sidecars"]["p50"], 2, 1.0),
        show(&a["mesh"]["p50"], 2, 1.0),
        show(&a["sidecars"]["p99"], 2, 1.0),
        show(&a["mesh"]["p99"], 2, 1.0)
    );
    let q = &r["ratios"];
    let _ = writeln!(
        s,
        "Memory mesh / sidecars: per-node accounting {} (without the CA {}; with the CA on a node of its own, its code counted again, {}), sum of PSS {}, sum of RSS {}. Added p50 mesh / sidecars {}.\n",
        show(&q["memory_node_accounted"], 3, 1.0),
        show(&q["memory_node_accounted_without_ca"], 3, 1.0),
        show(&q["memory_node_accounted_ca_on_a_node_of_its_own"], 3, 1.0),
        show(&q["memory_pss"], 3, 1.0),
        show(&q["memory_rss"], 3, 1.0),
        show(&q["added_p50"], 3, 1.0)
    );
    s.push_str("Targets (median over repeats [min-max], margin on the good side):\n\n");
    let order = ["memory_ratio", "idle_proxy_rss_mib", "node_cpu_ratio", "cluster_cpu_ratio", "proxy_cpu_ratio", "added_p99_ratio", "partial_failure_success"];
    for t in order.iter().map(|k| &r["targets"][*k]).filter(|t| t.is_object()) {
        let pct = t["target"].as_f64().is_some_and(|x| x > 0.99 && x < 1.0);
        let (digits, scale, unit) = if pct { (2, 100.0, "%") } else { (t["digits"].as_u64().unwrap_or(3) as usize, 1.0, t["unit"].as_str().unwrap_or("")) };
        let measured = t["spread"]["n"].as_u64().unwrap_or(0);
        let values = t["values"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            s,
            "- {}: {}{unit} (target {} {:.digits$}{unit}): **{}**, margin {}{}",
            t["what"].as_str().unwrap_or("?"),
            show(&t["spread"], digits, scale),
            if t["at_most"].as_bool() == Some(true) { "<=" } else { ">=" },
            t["target"].as_f64().unwrap_or(f64::NAN) * scale,
            if measured == 0 { "NOT MEASURED" } else { verdict(t["met"].as_bool() == Some(true)) },
            t["margin"].as_f64().map_or("-".into(), |m| format!("{:+.digits$}{unit}", m * scale)),
            if (measured as usize) < values { format!(" ({measured} of {values} repeats measured)") } else { String::new() },
        );
    }
    if r["node_cpu_saturated_repeats"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(s, "
In {} repeat(s) the VM's CPUs were saturated during the steady phase (other work on the machine, or the bench itself): the node-CPU ratio from /proc/stat is not measured there; the cgroup ratio counts only the simulated cluster's processes (softirq work done outside them, e.g. in ksoftirqd, is missed).", r["node_cpu_saturated_repeats"]);
    }
    s
}

/// The smoke test's check: every mode ran every scenario and measured something (requests
/// answered, latency, saturation throughput; proxy CPU, node CPU and memory where there are
/// proxies).
pub fn check_numbers(path: &Path) -> anyhow::Result<()> {
    let report: Value = serde_json::from_slice(&fs::read(path).with_context(|| format!("reading {}", path.display()))?)?;
    let mut missing = Vec::new();
    for mode in [Mode::NoMesh, Mode::Sidecars, Mode::Mesh] {
        let runs = report["modes"][mode.key()]["runs"].as_array().cloned().unwrap_or_default();
        if runs.is_empty() {
            missing.push(format!("{}: no run", mode.name()));
        }
        for m in &runs {
            let positive = |v: &Value| v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
            let mut need = vec![
                ("steady.ok", &m["steady"]["ok"]),
                ("steady.p50_ms", &m["steady"]["p50_ms"]),
                ("steady.p99_ms", &m["steady"]["p99_ms"]),
                ("steady.node_vcpu", &m["steady"]["node_vcpu"]),
                ("burst.ok", &m["burst"]["ok"]),
                ("partial_failure.requests", &m["partial_failure"]["requests"]),
                ("saturation.service_ok_rps", &m["saturation"]["service_ok_rps"]),
            ];
            if mode != Mode::NoMesh {
                need.extend([
                    ("steady.proxy_vcpu", &m["steady"]["proxy_vcpu"]),
                    ("steady_memory.node_accounted_mib", &m["steady_memory"]["node_accounted_mib"]),
                    ("steady_memory.pss_mib", &m["steady_memory"]["pss_mib"]),
                    ("idle_memory.node_accounted_mib", &m["idle_memory"]["node_accounted_mib"]),
                    ("peak_memory.node_accounted_mib", &m["peak_memory"]["node_accounted_mib"]),
                ]);
            }
            if mode == Mode::Mesh && m["mesh_processes"].as_u64() <= m["proxy_processes"].as_u64() {
                missing.push("mesh: the CA was not counted".into());
            }
            missing.extend(need.into_iter().filter(|(_, v)| !positive(v)).map(|(k, v)| format!("{}: {k} = {v}", mode.name())));
        }
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
        let services = super::overhead_services(&|p| format!("10.244.0.{}", p.len()));
        let shape = super::SidecarShape { namespace: super::NS, app_port: super::APP_PORT, services: &services };
        let y = super::sidecar_config(&shape, "bff", &certs);
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
        // The client side requires the server's SPIFFE identity.
        assert_eq!(tls_out["validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"], super::SIDECAR_SAN, "{y}");
    }

    #[test]
    fn policies_validate_as_istio_yaml() {
        let docs: Vec<serde_yaml::Value> = super::policies().split("\n---\n").filter(|d| !d.trim().is_empty()).map(|d| serde_yaml::from_str(d).unwrap()).collect();
        assert_eq!(docs.len(), 14);
        let recall_vs = docs.iter().find(|d| d["kind"] == "VirtualService" && d["metadata"]["name"] == "recall").unwrap();
        assert_eq!(recall_vs["spec"]["http"][1]["route"][0]["weight"], 90);
    }
}
