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

use mesh_e2e::{ClusterSpec, SimCluster, bins};
use serde_json::{Value, json};

use crate::bench_util::{cpu_seconds, h2load, verdict, write_json};

const RATE: u64 = 1000;
const BULK_BYTES: u64 = 1 << 30;
/// The HTTP server (1 KiB answers) behind a `tcp-` Service port, for the max-rps runs.
const HTTP_POD: &str = "http-b";
const HTTP_PORT: u16 = 8080;
const HTTP_VIP: &str = "10.96.1.3";
const HTTP_BODY: usize = 1024;
/// Node proxies' inbound tunnel port.
const TUNNEL_PORT: u16 = 15008;
const TARGET_MTLS_ADDED_P50_MS: f64 = 0.15;
const TARGET_MTLS_ADDED_P99_MS: f64 = 0.40;
const TARGET_MTLS_MAX_RPS: f64 = 20_000.0;
const TARGET_MAX_TUNNELS: u64 = 4;

fn spec(mtls: bool) -> ClusterSpec {
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
    spec.mtls = mtls;
    spec
}

/// `mesh-probe serve` in every pod, except the HTTP server in `http-b`.
fn start_servers(c: &SimCluster) -> anyhow::Result<()> {
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

struct Path4 {
    name: &'static str,
    client: &'static str,
    target: String,
    /// Through the proxies (their CPU is sampled).
    mesh: bool,
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
fn measure(c: &SimCluster, p: &Path4, seconds: u64) -> anyhow::Result<Value> {
    eprintln!("bench: {} ({} -> {})", p.name, p.client, p.target);
    let timeout = Duration::from_secs(seconds + 60);
    // Warm up connections and caches, then measure.
    c.probe(p.client, &["rr", &p.target, "--rate", "500", "--seconds", "1", "--conns", "4"], timeout)?;
    let proxies = if p.mesh { c.proxy_pids() } else { Vec::new() };
    let tunneled_before = c.counter(0, "proxy", "outbound_tunneled");
    let cpu_before = cpu_seconds(&proxies);
    let (rr, tunnels) = with_tunnel_samples(c, seconds, || {
        c.probe(p.client, &["rr", &p.target, "--rate", &RATE.to_string(), "--seconds", &seconds.to_string(), "--conns", "4", "--size", "1024"], timeout)
    });
    let cpu = cpu_seconds(&proxies) - cpu_before;
    let rr: Value = serde_json::from_str(rr?.trim())?;
    let tunneled = c.counter(0, "proxy", "outbound_tunneled") - tunneled_before;
    let bulk: Value = serde_json::from_str(c.probe(p.client, &["bulk", &p.target, "--bytes", &BULK_BYTES.to_string()], timeout)?.trim())?;
    let requests = rr["requests"].as_u64().unwrap_or(0);
    Ok(json!({
        "path": p.name,
        "rate_rps": RATE,
        "requests": rr["requests"],
        "errors": rr["errors"],
        "p50_ms": rr["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p90_ms": rr["p90_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "p99_ms": rr["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        "bulk_gbit_s": bulk["mbit_per_s"].as_f64().unwrap_or(0.0) / 1000.0,
        "proxy_cpu_s": if p.mesh { cpu.into() } else { Value::Null },
        "vcpu_s_per_1k_requests": if p.mesh { (cpu * 1000.0 / requests.max(1) as f64).into() } else { Value::Null },
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

pub fn run(json_out: &Path, seconds: u64, max_seconds: u64) -> anyhow::Result<()> {
    // Both clusters at once (they share nothing but the machine), so the plaintext and mTLS
    // runs follow each other closely and drift in the machine's load affects both alike.
    eprintln!("bench: building two simulated nodes with mTLS between them, and two with plaintext tunnels...");
    let c = SimCluster::start(spec(true))?;
    start_servers(&c)?;
    let plain = SimCluster::start(spec(false))?;
    start_servers(&plain)?;
    let paths = [
        Path4 { name: "direct, same node", client: "client-direct", target: format!("{}:7000", c.pod("srv-a").ip), mesh: false },
        Path4 { name: "mesh, same node", client: "client-mesh", target: "10.96.1.1:80".into(), mesh: true },
        Path4 { name: "direct, cross node", client: "client-direct", target: format!("{}:7000", c.pod("srv-b").ip), mesh: false },
        Path4 { name: "mesh, cross node", client: "client-mesh", target: "10.96.1.2:80".into(), mesh: true },
    ];
    let mut rows = Vec::new();
    for p in &paths {
        rows.push(measure(&c, p, seconds)?);
    }
    eprintln!("bench: the same cross-node paths with plaintext tunnels");
    let mut plain_direct = measure(&plain, &paths[2].with_target(format!("{}:7000", plain.pod("srv-b").ip)), seconds)?;
    let mut plain_mesh = measure(&plain, &paths[3].with_target("10.96.1.2:80".into()), seconds)?;
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
    println!("(cross node: the nodes' tunnels are mTLS)");
    println!("\nmesh adds p50: same node {same_added:+.3} ms, cross node {cross_added:+.3} ms (target: cross node <= 0.100 ms)");
    println!("mesh keeps bulk throughput: same node {:.0}%, cross node {:.0}% (target: cross node >= 50%)", same_tput * 100.0, cross_tput * 100.0);

    let mtls = mtls_report(seconds, max_seconds, &plain_pair, &mtls_pair, plain_stats);
    let report = json!({
        "rows": rows,
        "cross_node_added_p50_ms": cross_added,
        "same_node_added_p50_ms": same_added,
        "cross_node_throughput_ratio": cross_tput,
        "same_node_throughput_ratio": same_tput,
        "targets": {"cross_node_added_p50_ms_max": 0.1, "cross_node_throughput_ratio_min": 0.5},
        "node_stats": stats,
        "mtls": mtls,
    });
    write_json(json_out, &report)
}

impl Path4 {
    fn with_target(&self, target: String) -> Path4 {
        Path4 { name: self.name, client: self.client, target, mesh: self.mesh }
    }
}

/// Prints the plaintext-vs-mTLS rows and the targets; returns the JSON "mtls" section.
fn mtls_report(seconds: u64, max_seconds: u64, plain: &Value, mtls: &Value, plain_stats: Vec<Value>) -> Value {
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

    json!({
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
    })
}
