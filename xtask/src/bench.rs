//! `cargo xtask bench`: 1 KiB request/response latency at a fixed rate and bulk throughput,
//! direct pod-to-pod vs through the mesh, same node and cross node, in one run.
//!
//! Then the cost of mutual TLS between nodes: the cross-node mesh path on a cluster whose
//! tunnels are mTLS (HBONE: HTTP/2 CONNECT over TLS 1.3; the main cluster above) and on one whose
//! tunnels are plaintext HTTP/2 CONNECT, each next to a direct baseline on the same cluster:
//! latency at 1000 rps, bulk throughput, max rps over 16 connections (h2load HTTP/1.1 against an
//! HTTP server behind a `tcp-` Service port, so the mesh proxies it per connection), proxy CPU
//! per 1000 requests, and how many tunnel connections node-a holds to node-b while it carries
//! the 1000 rps (its own counter, and `ss` in node-a's namespace).
use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, bail};

use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::{
    bench_account::{Accounting, CpuMeter, Target, report_targets, spread},
    bench_overhead::mesh_groups,
    bench_util::{h2load, verdict, write_json},
};

const RATE: u64 = 1000;
const BULK_BYTES: u64 = 1 << 30;
/// The HTTP server (1 KiB answers) behind a `tcp-` Service port, for the max-rps runs.
const HTTP_POD: &str = "http-b";
const HTTP_PORT: u16 = 8080;
const HTTP_VIP: &str = "10.96.1.3";
/// `srv-b` (node-b) through its Service: the mesh's cross-node path.
pub(crate) const CROSS_NODE_TARGET: &str = "10.96.1.2:80";
const HTTP_BODY: usize = 1024;
/// Node proxies' inbound tunnel port.
const TUNNEL_PORT: u16 = 15008;
const TARGET_MTLS_ADDED_P50_MS: f64 = 0.15;
const TARGET_MTLS_ADDED_P99_MS: f64 = 0.40;
const TARGET_MTLS_MAX_RPS: f64 = 20_000.0;
const TARGET_MAX_TUNNELS: u64 = 4;
const TARGET_CROSS_ADDED_P50_MS: f64 = 0.10;
const TARGET_BULK_RATIO: f64 = 0.60;
/// The ztunnel pair's pods and Service (only with `--ztunnel`).
const ZT_NS: &str = "zt";
const ZT_VIP: &str = "10.96.1.9";

pub struct Opts {
    pub seconds: u64,
    pub max_seconds: u64,
    /// Latency runs of every path, interleaved.
    pub repeats: usize,
    /// A ztunnel binary: adds a ztunnel pair (dedicated mode, one in the client pod and one in
    /// the server pod, HBONE mTLS, FAKE_CA) as a peer on the cross-node path.
    pub ztunnel: Option<std::path::PathBuf>,
}

pub(crate) fn spec(mtls: bool, ztunnel: bool) -> ClusterSpec {
    let mut spec = ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("direct", false)
        .pod("client-mesh", "mesh", 0, "client", 9000)
        .pod("client-direct", "direct", 0, "client", 9000)
        .pod("srv-a", "mesh", 0, "srv-a", 7000)
        .pod("srv-b", "mesh", 1, "srv-b", 7000)
        .pod_labelled(HTTP_POD, "mesh", 1, HTTP_POD, &[], "tcp-http", HTTP_PORT)
        .service("srv-a", "mesh", [10, 96, 1, 1], "srv-a", 80, 7000)
        .service("srv-b", "mesh", [10, 96, 1, 2], "srv-b", 80, 7000)
        .service_named(HTTP_POD, "mesh", [10, 96, 1, 3], HTTP_POD, "tcp-http", 80, HTTP_PORT);
    if ztunnel {
        // Outside the mesh's namespaces: the ztunnels capture these pods' traffic themselves.
        spec = spec.namespace(ZT_NS, false).pod("client-zt", ZT_NS, 0, "client-zt", 9000).pod("srv-zt", ZT_NS, 1, "srv-zt", 7000);
    }
    spec.mtls = mtls;
    spec
}

/// `mesh-probe serve` in every pod, except the HTTP server in `http-b`.
pub(crate) fn start_servers(c: &SimCluster) -> anyhow::Result<()> {
    let probe = bins::path("mesh-probe");
    let body = HTTP_BODY.to_string();
    for pod in &c.pods {
        let name = pod.spec.name.as_str();
        for (_, port) in &pod.spec.ports {
            let p = port.to_string();
            if name == HTTP_POD {
                c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", &p, "--body-bytes", &body], *port)?;
            } else {
                c.serve_in_pod(name, &probe, &["serve", "--name", name, "--port", &p], *port)?;
            }
        }
    }
    Ok(())
}

pub(crate) struct Path4 {
    pub(crate) name: &'static str,
    pub(crate) client: &'static str,
    pub(crate) target: String,
    /// Through the mesh's proxies (tunnel connections are sampled).
    pub(crate) mesh: bool,
    /// (node or control plane, pids): the data plane's processes on this path (CPU, memory).
    pub(crate) groups: Vec<(String, Vec<u32>)>,
}

/// (node-a's `tunnel_connections` counter, `ss` count); None when not readable.
type TunnelSample = (Option<u64>, Option<u64>);

/// Tunnel connections node-a holds to node-b, as node-a's proxy counts them and as `ss` sees
/// established TCP connections to node-b's port 15008 in node-a's namespace.
fn tunnel_sample(c: &SimCluster) -> TunnelSample {
    let stats = c.stats(0).ok().and_then(|s| s["tunnel_connections"].as_u64());
    let filter = format!("( dport = :{TUNNEL_PORT} and dst {} )", c.nodes[1].ip);
    let ss = c
        .run_in_netns(&c.nodes[0].netns, Path::new("ss"), &["-Htn", "state", "established", &filter], Duration::from_secs(5))
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.trim().is_empty()).count() as u64);
    (stats, ss)
}

/// Runs `work` while sampling the tunnel connections at 1/4, 1/2 and 3/4 of `seconds`, then
/// once right after; returns its result and the samples.
fn with_tunnel_samples<T: Send>(c: &SimCluster, seconds: u64, work: impl FnOnce() -> T + Send) -> (T, Value) {
    let (out, during) = thread::scope(|s| {
        let h = s.spawn(work);
        let mut during = Vec::new();
        for _ in 0..3 {
            thread::sleep(Duration::from_secs_f64(seconds as f64 / 4.0));
            if h.is_finished() {
                break;
            }
            during.push(tunnel_sample(c));
        }
        (h.join().expect("bench worker panicked"), during)
    });
    let after = tunnel_sample(c);
    let max = |f: fn(&TunnelSample) -> Option<u64>| during.iter().chain([&after]).filter_map(f).max();
    let report = json!({
        "stats_during": during.iter().map(|s| s.0).collect::<Vec<_>>(),
        "ss_during": during.iter().map(|s| s.1).collect::<Vec<_>>(),
        "stats_after": after.0,
        "ss_after": after.1,
        "stats_max": max(|s| s.0),
        "ss_max": max(|s| s.1),
    });
    (out, report)
}

/// Warm-up, 1 KiB rr at RATE over 4 connections (proxy CPU sampled over it, and for the
/// cross-node mesh path the tunnel connections), then bulk.
pub(crate) fn measure(c: &SimCluster, p: &Path4, seconds: u64) -> anyhow::Result<Value> {
    eprintln!("bench: {} ({} -> {})", p.name, p.client, p.target);
    let timeout = Duration::from_secs(seconds + 60);
    // Warm up connections and caches, then measure.
    c.probe(p.client, &["rr", &p.target, "--rate", "500", "--seconds", "1", "--conns", "4"], timeout)?;
    let proxies: Vec<u32> = p.groups.iter().flat_map(|g| g.1.iter().copied()).collect();
    let tunneled_before = c.counter(0, "proxy", "outbound_tunneled");
    let meter = CpuMeter::start_in(&proxies, Some(&c.root_cgroup));
    let (rr, tunnels) = with_tunnel_samples(c, seconds, || {
        c.probe(p.client, &["rr", &p.target, "--rate", &RATE.to_string(), "--seconds", &seconds.to_string(), "--conns", "4", "--size", "1024"], timeout)
    });
    let use_ = meter.stop();
    let cpu = use_.proc_cpu_s;
    let memory = Accounting::take(&p.groups);
    let rr: Value = serde_json::from_str(rr?.trim())?;
    let tunneled = c.counter(0, "proxy", "outbound_tunneled") - tunneled_before;
    let bulk: Value = serde_json::from_str(c.probe(p.client, &["bulk", &p.target, "--bytes", &BULK_BYTES.to_string()], timeout)?.trim())?;
    let requests = rr["requests"].as_u64().unwrap_or(0);
    let has_procs = !proxies.is_empty();
    Ok(json!({
        "path": p.name,
        "latency_from": rr["latency_from"],
        "late_starts": rr["late_starts"],
        "max_start_lag_us": rr["max_start_lag_us"],
        "cpu": use_.to_json(),
        "node_vcpu_s_per_1k_requests": use_.node_vcpu * use_.wall_s * 1000.0 / requests.max(1) as f64,
        "memory": memory.to_json(),
        "rate_rps": RATE,
        "requests": rr["requests"],
        "errors": rr["errors"],
        "p50_ms": rr["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p90_ms": rr["p90_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p99_ms": rr["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "bulk_gbit_s": bulk["mbit_per_s"].as_f64().unwrap_or(0.0) / 1000.0,
        "proxy_cpu_s": if has_procs { cpu.into() } else { Value::Null },
        "vcpu_s_per_1k_requests": if has_procs { (cpu * 1000.0 / requests.max(1) as f64).into() } else { Value::Null },
        "tunnel_connections": tunnels,
        "tunneled_connections": tunneled,
    }))
}

/// h2load HTTP/1.1, 16 connections, one request in flight each, against the HTTP server (1 KiB
/// answers): through the mesh (the `tcp-` Service, proxied per connection) or direct.
fn max_rps(c: &SimCluster, mesh: bool, max_seconds: u64) -> Value {
    let (client, url) = if mesh {
        ("client-mesh", format!("http://{HTTP_VIP}:80/"))
    } else {
        ("client-direct", format!("http://{}:{HTTP_PORT}/", c.pod(HTTP_POD).ip))
    };
    eprintln!("bench: max rps, 16 conns, HTTP/1.1 ({client} -> {url})");
    let tunneled_before = c.counter(0, "proxy", "outbound_tunneled");
    let (res, tunnels) = with_tunnel_samples(c, max_seconds + 1, || h2load(c, client, &["-c16", "-m1", "--h1", &url], max_seconds));
    let mut v = res.unwrap_or_else(|e| {
        eprintln!("bench: h2load failed: {e:#}");
        json!({"error": format!("{e:#}")})
    });
    if mesh {
        v["tunnel_connections"] = tunnels;
        v["tunneled_connections"] = (c.counter(0, "proxy", "outbound_tunneled") - tunneled_before).into();
    }
    v
}

/// Runs the L4 bench; returns the targets it missed.
pub fn run(json_out: &Path, opts: &Opts) -> anyhow::Result<Vec<String>> {
    let (seconds, max_seconds) = (opts.seconds, opts.max_seconds);
    let repeats = opts.repeats.max(1);
    let ztunnel = opts.ztunnel.as_ref().filter(|p| {
        let ok = p.is_file();
        if !ok {
            println!("bench l4: no ztunnel at {}: the ztunnel pair is skipped", p.display());
        }
        ok
    });
    if opts.ztunnel.is_none() {
        println!("bench l4: no --ztunnel PATH given: the ztunnel pair is skipped (see ../shared/reference/FACTS.md to build one)");
    }
    // Both clusters at once (they share nothing but the machine), so the plaintext and mTLS
    // runs follow each other closely and drift in the machine's load affects both alike.
    eprintln!("bench: building two simulated nodes with mTLS between them, and two with plaintext tunnels...");
    let c = SimCluster::start(spec(true, ztunnel.is_some()))?;
    start_servers(&c)?;
    let plain = SimCluster::start(spec(false, false))?;
    start_servers(&plain)?;
    let mesh = mesh_groups(&c);
    let mut paths = vec![
        Path4 { name: "direct, same node", client: "client-direct", target: format!("{}:7000", c.pod("srv-a").ip), mesh: false, groups: vec![] },
        Path4 { name: "mesh, same node", client: "client-mesh", target: "10.96.1.1:80".into(), mesh: true, groups: mesh.clone() },
        Path4 { name: "direct, cross node", client: "client-direct", target: format!("{}:7000", c.pod("srv-b").ip), mesh: false, groups: vec![] },
        Path4 { name: "mesh, cross node", client: "client-mesh", target: CROSS_NODE_TARGET.into(), mesh: true, groups: mesh.clone() },
    ];
    if let Some(zt) = ztunnel {
        let pids = start_ztunnels(&c, zt)?;
        paths.push(Path4 {
            name: "ztunnel, cross node",
            client: "client-zt",
            target: format!("{ZT_VIP}:80"),
            mesh: false,
            groups: c.nodes.iter().zip(&pids).map(|(n, p)| (n.name.clone(), vec![*p])).collect(),
        });
    }
    // Latency (and bulk) runs of every path, `repeats` times interleaved.
    let mut runs: Vec<Vec<Value>> = Vec::new();
    for rep in 0..repeats {
        eprintln!("bench l4: repeat {}/{repeats}", rep + 1);
        let mut rows = Vec::new();
        for p in &paths {
            rows.push(measure(&c, p, seconds)?);
        }
        runs.push(rows);
    }
    let rows = runs[0].clone();
    eprintln!("bench: the same cross-node paths with plaintext tunnels");
    let plain_mesh_groups = mesh_groups(&plain);
    let mut plain_direct = measure(&plain, &paths[2].with_target(format!("{}:7000", plain.pod("srv-b").ip), vec![]), seconds)?;
    let mut plain_mesh = measure(&plain, &paths[3].with_target("10.96.1.2:80".into(), plain_mesh_groups), seconds)?;
    // Overload runs after every latency run, plaintext and mTLS alternating.
    let (mut mtls_direct, mut mtls_mesh) = (rows[2].clone(), rows[3].clone());
    mtls_direct["max"] = max_rps(&c, false, max_seconds);
    plain_direct["max"] = max_rps(&plain, false, max_seconds);
    mtls_mesh["max"] = max_rps(&c, true, max_seconds);
    plain_mesh["max"] = max_rps(&plain, true, max_seconds);
    let pair = |tunnel: &str, direct: Value, mesh: Value| json!({"tunnel": tunnel, "seconds": seconds, "max_seconds": max_seconds, "direct": direct, "mesh": mesh});
    let mtls_pair = pair("mTLS", mtls_direct, mtls_mesh);
    let plain_pair = pair("plaintext", plain_direct, plain_mesh);
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    let plain_stats: Vec<Value> = (0..2).filter_map(|i| plain.stats(i).ok()).collect();
    drop(plain);
    drop(c);

    println!("\n1 KiB rr at {RATE} rps over 4 conns for {seconds} s (latency from the scheduled start), {repeats} interleaved repeat(s): median [min-max]");
    println!(
        "{:<22} {:>22} {:>22} {:>22} {:>18} {:>20} {:>20} {:>9} {:>6}",
        "path", "p50 ms", "p99 ms", "bulk Gbit/s", "proxy vCPU-s/1k", "node vCPU-s/1k", "memory MiB", "procs", "late"
    );
    let col = |i: usize, k: &str| -> Vec<f64> { runs.iter().map(|rows| rows[i][k].as_f64().unwrap_or(f64::NAN)).collect() };
    let mut table = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let mem: Vec<f64> = runs.iter().map(|rows| rows[i]["memory"]["node_accounted_mib"].as_f64().unwrap_or(f64::NAN)).collect();
        let late: u64 = runs.iter().map(|rows| rows[i]["late_starts"].as_u64().unwrap_or(0)).sum();
        let procs: usize = p.groups.iter().map(|g| g.1.len()).sum();
        println!(
            "{:<22} {:>22} {:>22} {:>22} {:>18} {:>20} {:>20} {:>9} {:>6}",
            p.name,
            spread(&col(i, "p50_ms")).show(3),
            spread(&col(i, "p99_ms")).show(3),
            spread(&col(i, "bulk_gbit_s")).show(2),
            spread(&col(i, "vcpu_s_per_1k_requests")).show(3),
            spread(&col(i, "node_vcpu_s_per_1k_requests")).show(3),
            spread(&mem).show(1),
            procs,
            late
        );
        table.push(json!({
            "path": p.name,
            "p50_ms": spread(&col(i, "p50_ms")).to_json(),
            "p99_ms": spread(&col(i, "p99_ms")).to_json(),
            "bulk_gbit_s": spread(&col(i, "bulk_gbit_s")).to_json(),
            "vcpu_s_per_1k_requests": spread(&col(i, "vcpu_s_per_1k_requests")).to_json(),
            "node_vcpu_s_per_1k_requests": spread(&col(i, "node_vcpu_s_per_1k_requests")).to_json(),
            "memory_node_accounted_mib": spread(&mem).to_json(),
            "late_starts": late,
        }));
    }
    println!("(cross node: the nodes' tunnels are mTLS; proxy vCPU-s: the path's proxies, the mesh CA included; node vCPU-s: the whole VM's CPU time not idle (/proc/stat); memory: per-node accounting of the path's processes, CA included)");
    let diff = |a: usize, b: usize, k: &str| -> Vec<f64> { col(a, k).iter().zip(col(b, k)).map(|(x, y)| x - y).collect() };
    let ratio = |a: usize, b: usize, k: &str| -> Vec<f64> { col(a, k).iter().zip(col(b, k)).map(|(x, y)| x / y.max(1e-9)).collect() };
    let same_added = diff(1, 0, "p50_ms");
    let cross_added = diff(3, 2, "p50_ms");
    let cross_added_p99 = diff(3, 2, "p99_ms");
    let cross_tput = ratio(3, 2, "bulk_gbit_s");
    let same_tput = ratio(1, 0, "bulk_gbit_s");
    println!(
        "\nmesh adds p50: same node {} ms, cross node {} ms; keeps bulk throughput: same node {}, cross node {} (ratios to direct)",
        spread(&same_added).show(3),
        spread(&cross_added).show(3),
        spread(&same_tput).show(2),
        spread(&cross_tput).show(2)
    );

    let (mtls, mut targets) = mtls_report(seconds, max_seconds, &plain_pair, &mtls_pair, plain_stats);
    targets.insert(0, Target { key: "cross_node_added_p50_ms", what: "mesh (mTLS) adds p50 over direct, cross node".into(), values: cross_added.clone(), limit: TARGET_CROSS_ADDED_P50_MS, at_most: true, unit: " ms", digits: 3 });
    targets.insert(1, Target { key: "cross_node_added_p99_ms", what: "mesh (mTLS) adds p99 over direct, cross node".into(), values: cross_added_p99, limit: TARGET_MTLS_ADDED_P99_MS, at_most: true, unit: " ms", digits: 3 });
    targets.insert(2, Target { key: "cross_node_bulk_ratio", what: "bulk throughput with mTLS, mesh / direct, cross node".into(), values: cross_tput.clone(), limit: TARGET_BULK_RATIO, at_most: false, unit: "", digits: 2 });
    if paths.len() > 4 {
        // The mesh pair against the ztunnel pair, per repeat, each over the same direct run.
        let zt_p50 = diff(4, 2, "p50_ms");
        let zt_p99 = diff(4, 2, "p99_ms");
        let vs = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        println!("ztunnel pair adds p50 {} ms, p99 {} ms over direct", spread(&zt_p50).show(3), spread(&zt_p99).show(3));
        targets.push(Target { key: "vs_ztunnel_added_p50_ms", what: "mesh minus ztunnel pair, added p50".into(), values: vs(cross_added.clone(), zt_p50), limit: 0.0, at_most: true, unit: " ms", digits: 3 });
        targets.push(Target { key: "vs_ztunnel_added_p99_ms", what: "mesh minus ztunnel pair, added p99".into(), values: vs(diff(3, 2, "p99_ms"), zt_p99), limit: 0.0, at_most: true, unit: " ms", digits: 3 });
        targets.push(Target {
            key: "vs_ztunnel_vcpu_s_per_1k",
            what: "mesh minus ztunnel pair, proxy vCPU-s per 1k requests".into(),
            values: vs(col(3, "vcpu_s_per_1k_requests"), col(4, "vcpu_s_per_1k_requests")),
            limit: 0.0,
            at_most: true,
            unit: "",
            digits: 3,
        });
    } else {
        println!("(no ztunnel pair in this run: the targets against it are not measured)");
    }
    let (targets_json, missed) = report_targets("l4", &targets);
    let report = json!({
        "repeats": repeats,
        "rows": rows,
        "runs": runs,
        "table": table,
        "cross_node_added_p50_ms": spread(&cross_added).to_json(),
        "same_node_added_p50_ms": spread(&same_added).to_json(),
        "cross_node_throughput_ratio": spread(&cross_tput).to_json(),
        "same_node_throughput_ratio": spread(&same_tput).to_json(),
        "ztunnel": ztunnel.map(|p| p.display().to_string()),
        "targets": targets_json,
        "node_stats": stats,
        "mtls": mtls,
    });
    write_json(json_out, &report)?;
    Ok(missed)
}

/// The ztunnel pair (dedicated mode, as FACTS.md's recipe runs it without istiod): one in
/// `client-zt`, whose connections to the pair's Service address an iptables rule redirects to
/// its port 15001, one in `srv-zt`, taking HBONE on 15008 and handing it to the server on
/// :7000. Both get their certificates from ztunnel's FAKE_CA. Returns their pids. Run against
/// ztunnel built from istio/ztunnel's main (FACTS.md's recipe), 2026-12-06.
fn start_ztunnels(c: &SimCluster, ztunnel: &Path) -> anyhow::Result<Vec<u32>> {
    // Inside the cluster's own directory, which goes with it.
    let dir = c.config_dir.parent().unwrap_or(&c.config_dir).join("ztunnel");
    std::fs::create_dir_all(&dir)?;
    let (client_ip, srv_ip) = (c.pod("client-zt").ip, c.pod("srv-zt").ip);
    let state = format!(
        r#"workloads:
- uid: cluster1//v1/Pod/{ZT_NS}/client-zt
  name: client-zt
  namespace: {ZT_NS}
  serviceAccount: default
  workloadIps: ["{client_ip}"]
  protocol: HBONE
  node: {node_a}
  services: {{}}
- uid: cluster1//v1/Pod/{ZT_NS}/srv-zt
  name: srv-zt
  namespace: {ZT_NS}
  serviceAccount: default
  workloadIps: ["{srv_ip}"]
  protocol: HBONE
  node: {node_b}
  services:
    "{ZT_NS}/srv-zt.{ZT_NS}.svc.cluster.local":
      80: 7000
services:
- name: srv-zt
  namespace: {ZT_NS}
  hostname: srv-zt.{ZT_NS}.svc.cluster.local
  vips: ["/{ZT_VIP}"]
  ports:
    80: 7000
"#,
        node_a = c.nodes[0].name,
        node_b = c.nodes[1].name,
    );
    let state_path = dir.join("state.yaml");
    std::fs::write(&state_path, state)?;
    let mut pids = Vec::new();
    let probe = bins::path("mesh-probe");
    for (pod, node, wait) in [("client-zt", 0, "127.0.0.1:15001".to_string()), ("srv-zt", 1, format!("{srv_ip}:15008"))] {
        let env: Vec<String> = vec![
            "FAKE_CA=true".into(),
            "XDS_ADDRESS=".into(),
            format!("LOCAL_XDS_PATH={}", state_path.display()),
            "PROXY_MODE=dedicated".into(),
            format!("PROXY_WORKLOAD_INFO={ZT_NS}/{pod}/default"),
            format!("NODE_NAME={}", c.nodes[node].name),
            "ENABLE_ORIG_SRC=false".into(),
            "ZTUNNEL_WORKER_THREADS=2".into(),
        ];
        let mut args: Vec<&str> = env.iter().map(String::as_str).collect();
        let zt = ztunnel.to_str().context("ztunnel path is not UTF-8")?;
        args.extend([zt, "proxy"]);
        let log = dir.join(format!("{pod}.log"));
        let pid = c.spawn_in_pod_pid(pod, Path::new("env"), &args, Some(&log))?;
        if !c.run_in_pod(pod, &probe, &["wait", &wait, "--timeout-ms", "20000"], Duration::from_secs(30))?.status.success() {
            bail!("ztunnel in {pod} did not listen on {wait}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        pids.push(pid);
    }
    let o = c.run_in_pod("client-zt", Path::new("iptables"), &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ZT_VIP, "-j", "REDIRECT", "--to-ports", "15001"], Duration::from_secs(10))?;
    if !o.status.success() {
        bail!("iptables in client-zt: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(pids)
}

impl Path4 {
    fn with_target(&self, target: String, groups: Vec<(String, Vec<u32>)>) -> Path4 {
        Path4 { name: self.name, client: self.client, target, mesh: self.mesh, groups }
    }
}

/// Prints the plaintext-vs-mTLS rows (first repeat; one run each of the plaintext cluster and
/// of max rps); returns the JSON "mtls" section and its single-run targets.
fn mtls_report(seconds: u64, max_seconds: u64, plain: &Value, mtls: &Value, plain_stats: Vec<Value>) -> (Value, Vec<Target>) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let opt = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    println!(
        "\nL4 cross node, plaintext vs mTLS tunnels: 1 KiB rr at {RATE} rps over 4 conns for {seconds} s; max rps = h2load HTTP/1.1 -c16 -m1, 1 KiB answers, {max_seconds} s, behind a tcp- port"
    );
    println!(
        "{:<10} {:<20} {:>8} {:>8} {:>8} {:>12} {:>9} {:>12} {:>16} {:>14}",
        "tunnels", "path", "p50 ms", "p90 ms", "p99 ms", "bulk Gbit/s", "max rps", "vCPU-s/1k rq", "tunnel conns rr", "tunnels max"
    );
    for pair in [plain, mtls] {
        let tunnel = pair["tunnel"].as_str().unwrap_or("");
        for side in ["direct", "mesh"] {
            let r = &pair[side];
            let cpu = r["vcpu_s_per_1k_requests"].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
            let max = r["max"]["ok_rps"].as_f64().map_or("err".to_string(), |v| format!("{v:.0}"));
            let (conns, conns_max) = if side == "mesh" {
                let t = &r["tunnel_connections"];
                let m = &r["max"]["tunnel_connections"];
                (format!("{} / ss {}", opt(&t["stats_max"]), opt(&t["ss_max"])), format!("{} / ss {}", opt(&m["stats_max"]), opt(&m["ss_max"])))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "{:<10} {:<20} {:>8.3} {:>8.3} {:>8.3} {:>12.2} {:>9} {:>12} {:>16} {:>14}",
                tunnel,
                r["path"].as_str().unwrap_or(""),
                f(r, "p50_ms"),
                f(r, "p90_ms"),
                f(r, "p99_ms"),
                f(r, "bulk_gbit_s"),
                max,
                cpu,
                conns,
                conns_max
            );
        }
    }
    println!("(tunnel conns: node-a's tunnel_connections counter / established node-a -> node-b:{TUNNEL_PORT} in `ss`, max of samples during and right after the run; 'tunnels max' during the h2load run)");

    let added = |pair: &Value, k: &str| f(&pair["mesh"], k) - f(&pair["direct"], k);
    let max_rps = |pair: &Value, side: &str| pair[side]["max"]["ok_rps"].as_f64().unwrap_or(0.0);
    let (plain_p50, plain_p99) = (added(plain, "p50_ms"), added(plain, "p99_ms"));
    let (mtls_p50, mtls_p99) = (added(mtls, "p50_ms"), added(mtls, "p99_ms"));
    let mtls_max = max_rps(mtls, "mesh");
    let tunnels = |pair: &Value| -> Option<u64> {
        let t = &pair["mesh"]["tunnel_connections"];
        let (a, b) = (t["stats_max"].as_u64(), t["ss_max"].as_u64());
        a.into_iter().chain(b).max()
    };
    let mtls_tunnels = tunnels(mtls);
    let tunnels_ok = mtls_tunnels.is_some_and(|n| n <= TARGET_MAX_TUNNELS);
    let bulk_ratio = f(&mtls["mesh"], "bulk_gbit_s") / f(&plain["mesh"], "bulk_gbit_s").max(1e-9);
    let rps_ratio = mtls_max / max_rps(plain, "mesh").max(1e-9);
    let cpu_plain = f(&plain["mesh"], "vcpu_s_per_1k_requests");
    let cpu_mtls = f(&mtls["mesh"], "vcpu_s_per_1k_requests");

    println!("\nmesh adds over direct (cross node): plaintext p50 {plain_p50:+.3} ms, p99 {plain_p99:+.3} ms; mTLS p50 {mtls_p50:+.3} ms, p99 {mtls_p99:+.3} ms");
    println!(
        "mTLS vs plaintext tunnels: p50 {:+.3} ms, p99 {:+.3} ms, bulk {:.0}%, max rps {:.0}%, proxy CPU {cpu_mtls:.3} vs {cpu_plain:.3} vCPU-s per 1k requests",
        f(&mtls["mesh"], "p50_ms") - f(&plain["mesh"], "p50_ms"),
        f(&mtls["mesh"], "p99_ms") - f(&plain["mesh"], "p99_ms"),
        bulk_ratio * 100.0,
        rps_ratio * 100.0
    );
    println!(
        "with mTLS, mesh adds p50 {mtls_p50:+.3} ms (target <= +{TARGET_MTLS_ADDED_P50_MS:.2}: {}), p99 {mtls_p99:+.3} ms (target <= +{TARGET_MTLS_ADDED_P99_MS:.2}: {})",
        verdict(mtls_p50 <= TARGET_MTLS_ADDED_P50_MS),
        verdict(mtls_p99 <= TARGET_MTLS_ADDED_P99_MS)
    );
    println!(
        "with mTLS, max rps over 16 conns {mtls_max:.0} (target >= {TARGET_MTLS_MAX_RPS:.0}: {}); direct {:.0}, plaintext tunnels {:.0}",
        verdict(mtls_max >= TARGET_MTLS_MAX_RPS),
        max_rps(mtls, "direct"),
        max_rps(plain, "mesh")
    );
    println!(
        "TLS connections node-a -> node-b at {RATE} rps: {} (target <= {TARGET_MAX_TUNNELS}: {})",
        mtls_tunnels.map_or("not measured".to_string(), |n| n.to_string()),
        verdict(tunnels_ok)
    );

    let targets = vec![
        Target { key: "mtls_max_rps", what: "max rps over 16 conns through the mesh, mTLS (one run)".into(), values: vec![mtls_max], limit: TARGET_MTLS_MAX_RPS, at_most: false, unit: "", digits: 0 },
        Target {
            key: "tunnel_connections",
            what: format!("TLS connections node-a -> node-b at {RATE} rps (one run)"),
            values: vec![mtls_tunnels.map_or(f64::NAN, |n| n as f64)],
            limit: TARGET_MAX_TUNNELS as f64,
            at_most: true,
            unit: "",
            digits: 0,
        },
    ];
    let section = json!({
        "rate_rps": RATE, "conns": 4, "size_bytes": 1024, "bulk_bytes": BULK_BYTES,
        "max_rps_load": format!("h2load -c16 -m1 --h1, GET, {HTTP_BODY} B answers, {max_seconds} s after 1 s warm-up; Service port tcp-http (L4)"),
        "plaintext": plain,
        "mtls": mtls,
        "summary": {
            "plaintext_added_p50_ms": plain_p50, "plaintext_added_p99_ms": plain_p99,
            "mtls_added_p50_ms": mtls_p50, "mtls_added_p99_ms": mtls_p99,
            "mtls_over_plaintext_p50_ms": f(&mtls["mesh"], "p50_ms") - f(&plain["mesh"], "p50_ms"),
            "mtls_over_plaintext_p99_ms": f(&mtls["mesh"], "p99_ms") - f(&plain["mesh"], "p99_ms"),
            "mtls_bulk_ratio_to_plaintext": bulk_ratio,
            "mtls_max_rps_ratio_to_plaintext": rps_ratio,
            "mtls_max_rps": mtls_max,
            "plaintext_max_rps": max_rps(plain, "mesh"),
            "direct_max_rps": max_rps(mtls, "direct"),
            "mtls_vcpu_s_per_1k_requests": cpu_mtls,
            "plaintext_vcpu_s_per_1k_requests": cpu_plain,
            "mtls_tunnel_connections_at_1000_rps": mtls_tunnels,
            "met": {
                "added_p50": mtls_p50 <= TARGET_MTLS_ADDED_P50_MS,
                "added_p99": mtls_p99 <= TARGET_MTLS_ADDED_P99_MS,
                "max_rps": mtls_max >= TARGET_MTLS_MAX_RPS,
                "tunnel_connections": tunnels_ok,
            },
        },
        "targets": {
            "mtls_added_p50_ms_max": TARGET_MTLS_ADDED_P50_MS,
            "mtls_added_p99_ms_max": TARGET_MTLS_ADDED_P99_MS,
            "mtls_max_rps_min": TARGET_MTLS_MAX_RPS,
            "tunnel_connections_max": TARGET_MAX_TUNNELS,
        },
        "plaintext_node_stats": plain_stats,
    });
    (section, targets)
}
