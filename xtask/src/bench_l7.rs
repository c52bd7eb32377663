//! `cargo xtask bench --only l7`: per-request (L7) proxying cost, in one run on one cluster:
//! direct pod-to-pod, through the mesh (two node proxies, cross node, with the failure
//! scenario's DestinationRule/VirtualService applied) and through a real Envoy sidecar pair
//! (Envoy 1.40, one in the client pod, one in the server pod, built as the overhead bench's
//! sidecars: istio-init's iptables rules, `original_dst`, mTLS requiring the server's SPIFFE
//! identity, the same policies in static config).
//!
//! For HTTP/1.1 (POST, 1 KiB request and response bodies) and gRPC-shaped h2c (5-byte prefix +
//! 1 KiB message each way, `grpc-status: 0` trailers): p50/p90/p99 at a fixed 1000 rps over 4
//! connections (from each request's scheduled start), `--repeats` times interleaved, proxy CPU
//! per 1000 requests (utime+stime of the proxy processes, the mesh CA included) beside the
//! node's (`/proc/stat`), memory with per-node accounting, and max rps over 16 connections with
//! h2load. Last, what telemetry costs the mesh
//! path (`bench_telemetry`: proxy CPU per 1000 requests, telemetry on vs off).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::{
    bench_account::{Accounting, CpuMeter, Target as BenchTarget, report_targets, spread},
    bench_overhead::{MeshService, ROUTE_POLICY_NO_TIMEOUT, SidecarShape, mesh_groups, set_mode, start_sidecars},
    bench_util::{h2load, ms, ok_count, path_str, probe_json, write_json},
};

const RATE: u64 = 1000;
pub(crate) const BODY: usize = 1024;
pub(crate) const HTTP_VIP: &str = "10.96.3.1";
pub(crate) const GRPC_VIP: &str = "10.96.3.2";
/// The Envoy pair's Services (static in its sidecars' config; not mesh Services): the server
/// pod `srv-envoy`, outside the mesh, so its sidecar's iptables rules do not touch the direct
/// and mesh paths to `srv`.
const ENVOY_HTTP_VIP: &str = "10.96.3.11";
const ENVOY_GRPC_VIP: &str = "10.96.3.12";
pub(crate) const APP_PORT: u16 = 8080;
const TARGET_ADDED_P50_MS: f64 = 0.15;
const TARGET_ADDED_P99_MS: f64 = 0.40;
const TARGET_VCPU_PER_1K: f64 = 0.15;

pub(crate) fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("mesh", true)
        .namespace("plain", false)
        .pod("client-mesh", "mesh", 0, "client-mesh", 9000)
        .pod("client-direct", "plain", 0, "client-direct", 9000)
        .pod("client-envoy", "plain", 0, "client-envoy", 9000)
        .pod_labelled("srv", "mesh", 1, "srv", &[], "http", APP_PORT)
        .pod_labelled("srv-envoy", "plain", 1, "srv-envoy", &[], "http", APP_PORT)
        .service_named("srv", "mesh", [10, 96, 3, 1], "srv", "http", 80, APP_PORT)
        .service_named("srv-grpc", "mesh", [10, 96, 3, 2], "srv", "grpc", 50051, APP_PORT)
}

/// The failure scenario's policies (outlier detection, retries) for both Services.
pub(crate) fn policies() -> String {
    ["srv", "srv-grpc"].iter().map(|host| crate::bench_util::seed_policies(host, "mesh")).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Http1,
    Grpc,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http1 => "HTTP/1.1",
            Proto::Grpc => "gRPC h2c",
        }
    }
    fn path(self) -> &'static str {
        match self {
            Proto::Http1 => "/",
            Proto::Grpc => "/grpc",
        }
    }
}

struct Target {
    path: &'static str,
    client: &'static str,
    /// host:port for each protocol
    http_addr: String,
    grpc_addr: String,
    /// (node or control plane, pids): the processes of this path's data plane.
    groups: Vec<(String, Vec<u32>)>,
}

impl Target {
    fn pids(&self) -> Vec<u32> {
        self.groups.iter().flat_map(|g| g.1.iter().copied()).collect()
    }
}

pub struct Opts {
    pub seconds: u64,
    pub max_seconds: u64,
    /// Fixed-rate runs of every path, interleaved.
    pub repeats: usize,
}

/// Runs the bench; returns the targets it missed.
pub fn run(json_out: &Path, opts: &Opts) -> anyhow::Result<Vec<String>> {
    crate::bench_util::with_envoy_workdir("l7", |envoy, work| run_in(json_out, opts, envoy, work))
}

/// The Envoy pair's two Services as the sidecars see them: the seed's policies (LEAST_REQUEST,
/// outlier detection 5 / 5s / 30s / 50%, 2 retries of 1s on 5xx,reset,connect-failure, no
/// route timeout), one endpoint each: `srv-envoy`.
fn envoy_services(server_ip: &str) -> Vec<MeshService> {
    [("srv", ENVOY_HTTP_VIP, 80, false), ("srv-grpc", ENVOY_GRPC_VIP, 50051, true)]
        .into_iter()
        .map(|(name, vip, port, grpc)| MeshService {
            name: name.into(),
            vip: vip.into(),
            port,
            grpc,
            clusters: vec![(String::new(), vec![server_ip.to_string()])],
            routes: format!("              - match: {{prefix: \"/\"}}\n                route: {{cluster: outbound|{name}|, {ROUTE_POLICY_NO_TIMEOUT}}}\n"),
            outlier_interval: "5s",
        })
        .collect()
}

fn run_in(json_out: &Path, opts: &Opts, envoy: &Path, work: &Path) -> anyhow::Result<Vec<String>> {
    eprintln!("bench l7: building two simulated nodes...");
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    for pod in ["srv", "srv-envoy"] {
        c.serve_in_pod(pod, &probe, &["http-serve", "--name", pod, "--port", &APP_PORT.to_string(), "--body-bytes", &BODY.to_string()], APP_PORT)?;
    }
    c.apply_config("policy.yaml", &policies())?;

    // Request bodies for h2load.
    let body_h1 = work.join("body-1k");
    fs::write(&body_h1, vec![b'x'; BODY])?;
    let body_grpc = work.join("body-grpc");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(BODY as u32).to_be_bytes());
    frame.resize(5 + BODY, b'x');
    fs::write(&body_grpc, frame)?;

    // The Envoy pair as the overhead bench's sidecars: istio-init's iptables rules, original_dst,
    // mTLS requiring the server's SPIFFE identity, run as uid 1337 (which must read these files).
    let certs = make_certs(work).context("certificates for the Envoy pair's mTLS")?;
    for f in fs::read_dir(work)? {
        set_mode(&f?.path(), 0o644)?;
    }
    set_mode(work, 0o755)?;
    let services = envoy_services(&c.pod("srv-envoy").ip.to_string());
    let shape = SidecarShape { namespace: "plain", app_port: APP_PORT, services: &services };
    let envoy_pids = start_sidecars(&c, envoy, work, &certs, &shape, &["client-envoy", "srv-envoy"])?;

    let srv_ip = c.pod("srv").ip;
    let targets = [
        Target { path: "direct", client: "client-direct", http_addr: format!("{srv_ip}:{APP_PORT}"), grpc_addr: format!("{srv_ip}:{APP_PORT}"), groups: vec![] },
        Target { path: "mesh", client: "client-mesh", http_addr: format!("{HTTP_VIP}:80"), grpc_addr: format!("{GRPC_VIP}:50051"), groups: mesh_groups(&c) },
        Target {
            path: "envoy sidecar pair (mTLS)",
            client: "client-envoy",
            http_addr: format!("{ENVOY_HTTP_VIP}:80"),
            grpc_addr: format!("{ENVOY_GRPC_VIP}:50051"),
            groups: c.nodes.iter().zip(&envoy_pids).map(|(n, pid)| (n.name.clone(), vec![*pid])).collect(),
        },
    ];
    let timeout = Duration::from_secs(opts.seconds + 60);
    let mut cases = Vec::new();
    for proto in [Proto::Http1, Proto::Grpc] {
        for t in &targets {
            let addr = if proto == Proto::Grpc { &t.grpc_addr } else { &t.http_addr };
            cases.push((proto, t, format!("http://{addr}{}", proto.path())));
        }
    }
    // First every fixed-rate run (all cases, then again: interleaved repeats), then every
    // max-rps run, so no overload run disturbs a latency measurement.
    let mut runs: Vec<Value> = Vec::new();
    for rep in 0..opts.repeats.max(1) {
        for (proto, t, url) in &cases {
            eprintln!("bench l7: {} {} at {RATE} rps ({} -> {url}), repeat {}/{}", t.path, proto.name(), t.client, rep + 1, opts.repeats.max(1));
            let body = BODY.to_string();
            let mut base = vec!["http", url.as_str(), "--conns", "4", "--timeout-ms", "5000", "--body-bytes", &body];
            match proto {
                Proto::Http1 => base.extend(["--method", "POST"]),
                Proto::Grpc => base.extend(["--h2", "--grpc"]),
            }
            let with = |extra: &[&str]| -> anyhow::Result<Value> {
                let mut a = base.clone();
                a.extend_from_slice(extra);
                probe_json(&c, t.client, &a, timeout)
            };
            // Warm up connections and caches.
            with(&["--rate", "500", "--count", "500"])?;
            let count = (RATE * opts.seconds).to_string();
            let meter = CpuMeter::start_in(&t.pids(), Some(&c.root_cgroup));
            let lat = with(&["--rate", &RATE.to_string(), "--count", &count])?;
            let cpu = meter.stop();
            let requests = lat["requests"].as_u64().unwrap_or(0).max(1);
            let memory = Accounting::take(&t.groups);
            runs.push(json!({
                "repeat": rep + 1,
                "path": t.path,
                "proto": proto.name(),
                "rate_rps": RATE,
                "requests": requests,
                "ok": ok_count(&lat),
                "errors": lat["errors"],
                "achieved_rps": lat["achieved_rps"],
                "latency_from": lat["latency_from"],
                "late_starts": lat["late_starts"],
                "max_start_lag_us": lat["max_start_lag_us"],
                "p50_ms": ms(&lat, "p50_us"),
                "p90_ms": ms(&lat, "p90_us"),
                "p99_ms": ms(&lat, "p99_us"),
                "cpu": cpu.to_json(),
                "vcpu_per_1k_rps": if t.groups.is_empty() { Value::Null } else { (cpu.proc_cpu_s * 1000.0 / requests as f64).into() },
                "node_vcpu_s_per_1k_requests": cpu.node_vcpu * cpu.wall_s * 1000.0 / requests as f64,
                "memory": memory.to_json(),
            }));
        }
    }
    let mut maxes = Vec::new();
    for (proto, t, url) in &cases {
        eprintln!("bench l7: {} {} max rps, 16 conns ({url})", t.path, proto.name());
        let max = match proto {
            Proto::Http1 => h2load(&c, t.client, &["-c16", "-m1", "--h1", "-d", path_str(&body_h1), url], opts.max_seconds),
            Proto::Grpc => h2load(
                &c,
                t.client,
                &["-c16", "-m10", "-d", path_str(&body_grpc), "-H", "content-type: application/grpc", "-H", "te: trailers", url],
                opts.max_seconds,
            ),
        };
        let mut max = max.unwrap_or_else(|e| {
            eprintln!("bench l7: h2load failed: {e:#}");
            json!({"error": format!("{e:#}")})
        });
        max["path"] = t.path.into();
        max["proto"] = proto.name().into();
        max["memory_after"] = Accounting::take(&t.groups).to_json();
        maxes.push(max);
    }
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    // Telemetry on vs off restarts the proxies, so it runs last on this cluster.
    if let Err(e) = crate::bench_telemetry::run(&c, opts.seconds, &json_out.with_file_name("telemetry.json")) {
        eprintln!("bench telemetry: {e:#}");
    }
    drop(c);
    report(json_out, opts, &runs, &maxes, stats)
}

fn report(json_out: &Path, opts: &Opts, runs: &[Value], maxes: &[Value], stats: Vec<Value>) -> anyhow::Result<Vec<String>> {
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let repeats = opts.repeats.max(1);
    println!(
        "\nL7, cross node, 1 KiB bodies each way; latency (from the scheduled start) at {RATE} rps over 4 conns for {} s, {repeats} interleaved repeat(s), median [min-max]; max rps over 16 conns for {} s (h2load); the Envoy pair is steered by istio-init's iptables rules, original_dst, mTLS with SAN checks",
        opts.seconds, opts.max_seconds,
    );
    println!(
        "{:<26} {:<9} {:>22} {:>22} {:>20} {:>20} {:>9} {:>9} {:>9}",
        "path", "proto", "p50 ms", "p99 ms", "proxy vCPU/1k rps", "node vCPU-s/1k rq", "max rps", "mem MiB", "late"
    );
    let select = |proto: &str, path: &str| -> Vec<&Value> { runs.iter().filter(|r| r["proto"] == proto && r["path"].as_str().is_some_and(|p| p.starts_with(path))).collect() };
    let sp = |rs: &[&Value], k: &str| spread(&rs.iter().map(|r| f(r, k)).collect::<Vec<_>>());
    let mut rows = Vec::new();
    for r in maxes {
        let (proto, path) = (r["proto"].as_str().unwrap_or(""), r["path"].as_str().unwrap_or(""));
        let rs = select(proto, path);
        let node = spread(&rs.iter().map(|r| f(r, "node_vcpu_s_per_1k_requests")).collect::<Vec<_>>());
        let mem = spread(&rs.iter().map(|r| r["memory"]["node_accounted_mib"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>());
        let late: u64 = rs.iter().map(|r| r["late_starts"].as_u64().unwrap_or(0)).sum();
        println!(
            "{:<26} {:<9} {:>22} {:>22} {:>20} {:>20} {:>9} {:>9} {:>9}",
            path,
            proto,
            sp(&rs, "p50_ms").show(3),
            sp(&rs, "p99_ms").show(3),
            sp(&rs, "vcpu_per_1k_rps").show(3),
            node.show(3),
            r["ok_rps"].as_f64().map_or("err".to_string(), |v| format!("{v:.0}")),
            mem.show(1),
            late
        );
        rows.push(json!({
            "path": path, "proto": proto,
            "p50_ms": sp(&rs, "p50_ms").to_json(), "p90_ms": sp(&rs, "p90_ms").to_json(), "p99_ms": sp(&rs, "p99_ms").to_json(),
            "vcpu_per_1k_rps": sp(&rs, "vcpu_per_1k_rps").to_json(),
            "node_vcpu_s_per_1k_requests": node.to_json(),
            "memory_node_accounted_mib": mem.to_json(),
            "late_starts": late,
            "max": r,
        }));
    }
    println!("(memory: the path's processes, per-node accounting: private memory plus each binary's shared pages once per node, the mesh CA included; node vCPU-s: the whole VM's CPU time not idle over the run (/proc/stat), load generator and server included)");
    let mut targets = Vec::new();
    let mut summary = Vec::new();
    for proto in [Proto::Http1, Proto::Grpc] {
        let (direct, mesh, envoy) = (select(proto.name(), "direct"), select(proto.name(), "mesh"), select(proto.name(), "envoy"));
        // Per repeat: each path against the direct run of the same repeat.
        let added = |rs: &[&Value], k: &str| -> Vec<f64> { rs.iter().zip(&direct).map(|(r, d)| f(r, k) - f(d, k)).collect() };
        let (mesh_p50, mesh_p99, envoy_p50, envoy_p99) = (added(&mesh, "p50_ms"), added(&mesh, "p99_ms"), added(&envoy, "p50_ms"), added(&envoy, "p99_ms"));
        let mesh_vcpu: Vec<f64> = mesh.iter().map(|r| f(r, "vcpu_per_1k_rps")).collect();
        let envoy_vcpu: Vec<f64> = envoy.iter().map(|r| f(r, "vcpu_per_1k_rps")).collect();
        println!(
            "{:<9} added over direct: mesh p50 {} ms, p99 {} ms; envoy pair p50 {} ms, p99 {} ms; proxy vCPU per 1k rps: mesh {}, envoy pair {}",
            proto.name(),
            spread(&mesh_p50).show(3),
            spread(&mesh_p99).show(3),
            spread(&envoy_p50).show(3),
            spread(&envoy_p99).show(3),
            spread(&mesh_vcpu).show(3),
            spread(&envoy_vcpu).show(3),
        );
        summary.push(json!({
            "proto": proto.name(),
            "mesh_added_p50_ms": spread(&mesh_p50).to_json(), "mesh_added_p99_ms": spread(&mesh_p99).to_json(),
            "envoy_added_p50_ms": spread(&envoy_p50).to_json(), "envoy_added_p99_ms": spread(&envoy_p99).to_json(),
            "mesh_vcpu_per_1k_rps": spread(&mesh_vcpu).to_json(), "envoy_vcpu_per_1k_rps": spread(&envoy_vcpu).to_json(),
        }));
        let key = |k: &'static str, h: &'static str| if proto == Proto::Http1 { h } else { k };
        targets.push(BenchTarget { key: key("grpc_added_p50_ms", "http1_added_p50_ms"), what: format!("{} mesh pair adds p50", proto.name()), values: mesh_p50, limit: TARGET_ADDED_P50_MS, at_most: true, unit: " ms", digits: 3 });
        targets.push(BenchTarget { key: key("grpc_added_p99_ms", "http1_added_p99_ms"), what: format!("{} mesh pair adds p99", proto.name()), values: mesh_p99, limit: TARGET_ADDED_P99_MS, at_most: true, unit: " ms", digits: 3 });
        targets.push(BenchTarget { key: key("grpc_vcpu_per_1k_rps", "http1_vcpu_per_1k_rps"), what: format!("{} mesh pair proxy vCPU per 1k rps (proxies + CA)", proto.name()), values: mesh_vcpu, limit: TARGET_VCPU_PER_1K, at_most: true, unit: "", digits: 3 });
    }
    let (targets_json, missed) = report_targets("l7", &targets);
    if runs.iter().any(|r| r["late_starts"].as_u64().unwrap_or(0) > r["requests"].as_u64().unwrap_or(0) / 100) {
        println!("note: 'late' counts requests the client started over 1 ms behind schedule (all workers waiting on slow answers); their latency counts from the scheduled start, so the wait is included");
    }
    write_json(
        json_out,
        &json!({
            "rate_rps": RATE, "conns": 4, "body_bytes": BODY, "seconds": opts.seconds, "max_seconds": opts.max_seconds, "repeats": repeats,
            "envoy_mtls": true,
            "envoy_steering": "istio-init iptables (OUTPUT REDIRECT 15001 except uid 1337, PREROUTING REDIRECT 15006), original_dst, upstream SAN check",
            "policies": policies(),
            "rows": rows,
            "runs": runs,
            "summary": summary,
            "targets": targets_json,
            "node_stats": stats,
        }),
    )?;
    Ok(missed)
}

pub(crate) struct Certs {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// A throw-away CA and one workload certificate (SPIFFE URI SAN, client and server use) that
/// both Envoys present, made with openssl in `dir`.
pub(crate) fn make_certs(dir: &Path) -> anyhow::Result<Certs> {
    let d = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl").args(args).output().context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let p = |p: PathBuf| p.to_string_lossy().into_owned();
    let (ca_key, ca, key, csr, cert, ext) = (p(d("ca.key")), p(d("ca.crt")), p(d("leaf.key")), p(d("leaf.csr")), p(d("leaf.crt")), p(d("leaf.ext")));
    fs::write(
        &ext,
        "subjectAltName=URI:spiffe://cluster.local/ns/mesh/sa/default,DNS:srv\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(&[&["req", "-x509"][..], &ec, &["-keyout", &ca_key, "-out", &ca, "-days", "1", "-subj", "/O=mesh-bench/CN=bench-ca"]].concat())?;
    openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", "/O=mesh-bench/CN=srv"]].concat())?;
    openssl(&["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial", "-out", &cert, "-days", "1", "-extfile", &ext])?;
    Ok(Certs { ca: d("ca.crt"), cert: d("leaf.crt"), key: d("leaf.key") })
}

pub(crate) const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub(crate) const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
pub(crate) const HTTP_OPTS: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// An HTTP connection manager filter (a `filters:` list item, at a filter chain's indentation)
/// sending every request to `cluster` with no route timeout: a sidecar's inbound side.
pub(crate) fn hcm_to_cluster(stat_prefix: &str, cluster: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: {stat_prefix}
          codec_type: AUTO
          route_config:
            name: {cluster}
            virtual_hosts:
            - name: {cluster}
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster}, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
"#
    )
}
