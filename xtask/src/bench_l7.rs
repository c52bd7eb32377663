//! `cargo xtask bench --only l7`: per-request (L7) proxying cost, in one run on one cluster:
//! direct pod-to-pod, through the mesh (two node proxies, cross node, with the failure
//! scenario's DestinationRule/VirtualService applied) and through a real Envoy sidecar pair
//! (Envoy 1.40, one in the client pod, one in the server pod, same policies in static config,
//! mTLS between them with a throw-away CA made by openssl).
//!
//! For HTTP/1.1 (POST, 1 KiB request and response bodies) and gRPC-shaped h2c (5-byte prefix +
//! 1 KiB message each way, `grpc-status: 0` trailers): p50/p90/p99 at a fixed 1000 rps over 4
//! connections, proxy CPU per 1000 requests (utime+stime of the proxy processes over that run),
//! proxy RSS, and max rps over 16 connections with h2load. Last, what telemetry costs the mesh
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

use crate::bench_util::{path_str, cpu_seconds, h2load, ms, ok_count, probe_json, rss_mib, verdict, write_json};

const RATE: u64 = 1000;
const BODY: usize = 1024;
const HTTP_VIP: &str = "10.96.3.1";
const GRPC_VIP: &str = "10.96.3.2";
const ENVOY_OUT: u16 = 15001;
const ENVOY_IN: u16 = 15006;
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
        .pod_labelled("srv", "mesh", 1, "srv", &[], "http", 8080)
        .service_named("srv", "mesh", [10, 96, 3, 1], "srv", "http", 80, 8080)
        .service_named("srv-grpc", "mesh", [10, 96, 3, 2], "srv", "grpc", 50051, 8080)
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
    proxies: Vec<u32>,
}

pub struct Opts {
    pub seconds: u64,
    pub max_seconds: u64,
    pub envoy_plaintext: bool,
}

pub fn run(json_out: &Path, opts: &Opts) -> anyhow::Result<()> {
    crate::bench_util::with_envoy_workdir("l7", |envoy, work| run_in(json_out, opts, envoy, work))
}

fn run_in(json_out: &Path, opts: &Opts, envoy: &Path, work: &Path) -> anyhow::Result<()> {
    eprintln!("bench l7: building two simulated nodes...");
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    c.serve_in_pod("srv", &probe, &["http-serve", "--name", "srv", "--port", "8080", "--body-bytes", &BODY.to_string()], 8080)?;
    c.apply_config("policy.yaml", &policies())?;

    // Request bodies for h2load.
    let body_h1 = work.join("body-1k");
    fs::write(&body_h1, vec![b'x'; BODY])?;
    let body_grpc = work.join("body-grpc");
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(BODY as u32).to_be_bytes());
    frame.resize(5 + BODY, b'x');
    fs::write(&body_grpc, frame)?;

    let srv_ip = c.pod("srv").ip;
    let tls = if opts.envoy_plaintext {
        None
    } else {
        match make_certs(work) {
            Ok(certs) => Some(certs),
            Err(e) => {
                eprintln!("bench l7: warning: no certificates for Envoy mTLS ({e:#}); Envoys talk plaintext HTTP");
                None
            }
        }
    };
    let envoy_pids = start_envoys(&c, envoy, work, &srv_ip.to_string(), tls.as_ref())?;

    let targets = [
        Target { path: "direct", client: "client-direct", http_addr: format!("{srv_ip}:8080"), grpc_addr: format!("{srv_ip}:8080"), proxies: vec![] },
        Target { path: "mesh", client: "client-mesh", http_addr: format!("{HTTP_VIP}:80"), grpc_addr: format!("{GRPC_VIP}:50051"), proxies: c.proxy_pids() },
        Target {
            path: if tls.is_some() { "envoy pair (mTLS)" } else { "envoy pair (plaintext)" },
            client: "client-envoy",
            http_addr: format!("127.0.0.1:{ENVOY_OUT}"),
            grpc_addr: format!("127.0.0.1:{ENVOY_OUT}"),
            proxies: envoy_pids.clone(),
        },
    ];
    let timeout = Duration::from_secs(opts.seconds + 60);
    let mut rows = Vec::new();
    let mut cases = Vec::new();
    for proto in [Proto::Http1, Proto::Grpc] {
        for t in &targets {
            let addr = if proto == Proto::Grpc { &t.grpc_addr } else { &t.http_addr };
            cases.push((proto, t, format!("http://{addr}{}", proto.path())));
        }
    }
    // First every fixed-rate run, then every max-rps run, so no overload run disturbs a
    // latency measurement.
    for (proto, t, url) in &cases {
        eprintln!("bench l7: {} {} at {RATE} rps ({} -> {url})", t.path, proto.name(), t.client);
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
        let cpu_before = cpu_seconds(&t.proxies);
        let lat = with(&["--rate", &RATE.to_string(), "--count", &count])?;
        let cpu = cpu_seconds(&t.proxies) - cpu_before;
        let requests = lat["requests"].as_u64().unwrap_or(0).max(1);
        let rss: Vec<f64> = t.proxies.iter().map(|p| rss_mib(*p)).collect();
        rows.push(json!({
            "path": t.path,
            "proto": proto.name(),
            "rate_rps": RATE,
            "requests": requests,
            "ok": ok_count(&lat),
            "errors": lat["errors"],
            "achieved_rps": lat["achieved_rps"],
            "late_starts": lat["late_starts"],
            "max_start_lag_us": lat["max_start_lag_us"],
            "p50_ms": ms(&lat, "p50_us"),
            "p90_ms": ms(&lat, "p90_us"),
            "p99_ms": ms(&lat, "p99_us"),
            "proxy_cpu_s": cpu,
            "vcpu_per_1k_rps": if t.proxies.is_empty() { Value::Null } else { (cpu * 1000.0 / requests as f64).into() },
            "proxy_rss_mib": rss,
        }));
    }
    for ((proto, t, url), row) in cases.iter().zip(rows.iter_mut()) {
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
        row["max"] = max.unwrap_or_else(|e| {
            eprintln!("bench l7: h2load failed: {e:#}");
            json!({"error": format!("{e:#}")})
        });
        row["proxy_rss_mib_after_max"] = t.proxies.iter().map(|p| rss_mib(*p)).collect::<Vec<f64>>().into();
    }
    let stats: Vec<Value> = (0..2).filter_map(|i| c.stats(i).ok()).collect();
    // Telemetry on vs off restarts the proxies, so it runs last on this cluster.
    if let Err(e) = crate::bench_telemetry::run(&c, opts.seconds, &json_out.with_file_name("telemetry.json")) {
        eprintln!("bench telemetry: {e:#}");
    }
    drop(c);
    report(json_out, opts, &rows, tls.is_some(), stats)
}


fn report(json_out: &Path, opts: &Opts, rows: &[Value], mtls: bool, stats: Vec<Value>) -> anyhow::Result<()> {
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "\nL7, cross node, 1 KiB bodies each way; latency at {RATE} rps over 4 conns for {} s, max rps over 16 conns for {} s (h2load){}",
        opts.seconds,
        opts.max_seconds,
        if mtls { "; Envoys talk mTLS" } else { "; Envoys talk plaintext HTTP (FACTS.md's Envoy numbers are mTLS)" }
    );
    println!(
        "{:<24} {:<9} {:>8} {:>8} {:>8} {:>9} {:>11} {:>10} {:>14} {:>6}",
        "path", "proto", "p50 ms", "p90 ms", "p99 ms", "ok %", "vCPU/1k rps", "max rps", "RSS MiB", "late"
    );
    for r in rows {
        let rss: Vec<String> = r["proxy_rss_mib_after_max"].as_array().map(|a| a.iter().map(|v| format!("{:.1}", v.as_f64().unwrap_or(0.0))).collect()).unwrap_or_default();
        let vcpu = r["vcpu_per_1k_rps"].as_f64().map_or("-".to_string(), |v| format!("{v:.3}"));
        let max = r["max"]["ok_rps"].as_f64().map_or("err".to_string(), |v| format!("{v:.0}"));
        println!(
            "{:<24} {:<9} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>11} {:>10} {:>14} {:>6}",
            r["path"].as_str().unwrap_or(""),
            r["proto"].as_str().unwrap_or(""),
            f(r, "p50_ms"),
            f(r, "p90_ms"),
            f(r, "p99_ms"),
            f(r, "ok") / f(r, "requests").max(1.0) * 100.0,
            vcpu,
            max,
            if rss.is_empty() { "-".into() } else { rss.join(" + ") },
            r["late_starts"].as_u64().unwrap_or(0)
        );
    }
    let mut summary = Vec::new();
    println!();
    for proto in [Proto::Http1, Proto::Grpc] {
        let find = |path: &str| rows.iter().find(|r| r["proto"] == proto.name() && r["path"].as_str().is_some_and(|p| p.starts_with(path)));
        let (Some(direct), Some(mesh), Some(envoy)) = (find("direct"), find("mesh"), find("envoy")) else { continue };
        let added_p50 = f(mesh, "p50_ms") - f(direct, "p50_ms");
        let added_p99 = f(mesh, "p99_ms") - f(direct, "p99_ms");
        let envoy_p50 = f(envoy, "p50_ms") - f(direct, "p50_ms");
        let envoy_p99 = f(envoy, "p99_ms") - f(direct, "p99_ms");
        let vcpu = f(mesh, "vcpu_per_1k_rps");
        let envoy_vcpu = f(envoy, "vcpu_per_1k_rps");
        println!(
            "{:<9} mesh adds p50 {added_p50:+.3} ms (target <= +{TARGET_ADDED_P50_MS:.2}: {}), p99 {added_p99:+.3} ms (target <= +{TARGET_ADDED_P99_MS:.2}: {}); envoy pair adds p50 {envoy_p50:+.3}, p99 {envoy_p99:+.3}",
            proto.name(),
            verdict(added_p50 <= TARGET_ADDED_P50_MS),
            verdict(added_p99 <= TARGET_ADDED_P99_MS),
        );
        println!(
            "{:<9} mesh pair {vcpu:.3} vCPU per 1k rps (target <= {TARGET_VCPU_PER_1K:.2}: {}); envoy pair {envoy_vcpu:.3}; max rps mesh {:.0} vs envoy {:.0} vs direct {:.0}",
            proto.name(),
            verdict(vcpu <= TARGET_VCPU_PER_1K),
            mesh["max"]["ok_rps"].as_f64().unwrap_or(0.0),
            envoy["max"]["ok_rps"].as_f64().unwrap_or(0.0),
            direct["max"]["ok_rps"].as_f64().unwrap_or(0.0),
        );
        summary.push(json!({
            "proto": proto.name(),
            "mesh_added_p50_ms": added_p50, "mesh_added_p99_ms": added_p99,
            "envoy_added_p50_ms": envoy_p50, "envoy_added_p99_ms": envoy_p99,
            "mesh_vcpu_per_1k_rps": vcpu, "envoy_vcpu_per_1k_rps": envoy_vcpu,
            "met": {
                "added_p50": added_p50 <= TARGET_ADDED_P50_MS,
                "added_p99": added_p99 <= TARGET_ADDED_P99_MS,
                "vcpu_per_1k_rps": vcpu <= TARGET_VCPU_PER_1K,
            },
        }));
    }
    if rows.iter().any(|r| r["late_starts"].as_u64().unwrap_or(0) > r["requests"].as_u64().unwrap_or(0) / 100) {
        println!("note: 'late' counts requests the client started over 1 ms behind schedule (closed-loop workers waiting on slow answers); above 1% the fixed rate did not hold evenly and latency is understated");
    }
    write_json(
        json_out,
        &json!({
            "rate_rps": RATE, "conns": 4, "body_bytes": BODY, "seconds": opts.seconds, "max_seconds": opts.max_seconds,
            "envoy_mtls": mtls,
            "policies": policies(),
            "rows": rows,
            "summary": summary,
            "targets": {"added_p50_ms_max": TARGET_ADDED_P50_MS, "added_p99_ms_max": TARGET_ADDED_P99_MS, "mesh_vcpu_per_1k_rps_max": TARGET_VCPU_PER_1K},
            "node_stats": stats,
        }),
    )
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

fn common_tls(c: &Certs) -> String {
    format!(
        "        common_tls_context:\n          tls_certificates:\n          - certificate_chain: {{filename: {:?}}}\n            private_key: {{filename: {:?}}}\n          validation_context:\n            trusted_ca: {{filename: {:?}}}\n",
        c.cert, c.key, c.ca
    )
}

/// Envoy A, the client's sidecar: outbound listener on 127.0.0.1:15001, the policies on the
/// route (retries) and cluster (LEAST_REQUEST, outlier detection), upstream = Envoy B.
fn envoy_a(server_ip: &str, tls: Option<&Certs>) -> String {
    let transport = tls.map_or(String::new(), |c| {
        format!(
            "    transport_socket:\n      name: envoy.transport_sockets.tls\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: srv\n{}",
            common_tls(c)
        )
    });
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {ENVOY_OUT}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: outbound
          codec_type: AUTO
          route_config:
            name: outbound
            virtual_hosts:
            - name: srv
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: srv
                  timeout: 0s
                  retry_policy:
                    retry_on: 5xx,reset,connect-failure
                    num_retries: 2
                    per_try_timeout: 1s
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 5
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
  clusters:
  - name: srv
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    outlier_detection:
      consecutive_5xx: 5
      interval: 5s
      base_ejection_time: 30s
      max_ejection_percent: 50
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {HTTP_OPTS}
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: srv
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {server_ip}, port_value: {ENVOY_IN}}}}}}}
{transport}"#
    )
}

/// Envoy B, the server's sidecar: inbound listener on :15006 (mTLS when `tls`), forwards to the
/// app on 127.0.0.1:8080 in the downstream's protocol.
fn envoy_b(tls: Option<&Certs>) -> String {
    let transport = tls.map_or(String::new(), |c| {
        format!(
            "      transport_socket:\n        name: envoy.transport_sockets.tls\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n          require_client_certificate: true\n{}",
            common_tls(c).lines().map(|l| format!("  {l}\n")).collect::<String>()
        )
    });
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: {ENVOY_IN}}}}}
    filter_chains:
    - filters:
{hcm}{transport}  clusters:
  - name: local
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {HTTP_OPTS}
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: local
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}
"#,
        hcm = hcm_to_cluster("inbound", "local"),
    )
}

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

/// Starts Envoy B in the server pod and Envoy A in the client pod (2 worker threads each, as
/// Istio's sidecar default), waits until both listen; returns their pids.
fn start_envoys(c: &SimCluster, envoy: &Path, work: &Path, server_ip: &str, tls: Option<&Certs>) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for (name, pod, port, config) in [("envoy-b", "srv", ENVOY_IN, envoy_b(tls)), ("envoy-a", "client-envoy", ENVOY_OUT, envoy_a(server_ip, tls))] {
        let cfg = work.join(format!("{name}.yaml"));
        fs::write(&cfg, &config)?;
        let log = work.join(format!("{name}.log"));
        let pid = c.spawn_in_pod_pid(
            pod,
            envoy,
            &["-c", path_str(&cfg), "--concurrency", "2", "--disable-hot-restart", "-l", "warning", "--service-node", name, "--service-cluster", "bench"],
            Some(&log),
        )?;
        let addr = format!("127.0.0.1:{port}");
        let ok = c.run_in_pod(pod, &bins::path("mesh-probe"), &["wait", &addr, "--timeout-ms", "20000"], Duration::from_secs(30))?.status.success();
        if !ok {
            bail!("{name} did not listen on {port}:\n{}", fs::read_to_string(&log).unwrap_or_default());
        }
        pids.push(pid);
    }
    Ok(pids)
}
