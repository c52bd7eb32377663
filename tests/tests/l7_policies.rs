//! End to end: Istio DestinationRule and VirtualService semantics applied per request by the
//! node proxies, with real HTTP/1.1, HTTP/2 and gRPC clients and servers in simulated pods.
//! Needs root; run through `cargo xtask test`.
use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{ClusterSpec, SimCluster, bins, tools};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.50";

/// `count` pods of app `web` spread over both nodes, serving HTTP on 8080 behind Service `web`
/// (port name `http`, port 80), plus a `client` pod on node-a.
fn http_cluster(pods: &[(&str, &[(&str, &str)])]) -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace("demo", true).pod("client", "demo", 0, "client", 9000);
    for (i, (name, labels)) in pods.iter().enumerate() {
        spec = spec.pod_labelled(name, "demo", i % 2, "web", labels, "http", 8080);
    }
    spec.service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080)
}

fn start_http(spec: ClusterSpec, server_args: &[(&str, &[&str])]) -> SimCluster {
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    let names: Vec<String> = c.pods.iter().filter(|p| p.spec.name != "client").map(|p| p.spec.name.clone()).collect();
    for name in &names {
        let extra = server_args.iter().find(|(n, _)| n == name).map(|(_, a)| *a).unwrap_or(&[]);
        let mut args = vec!["http-serve", "--name", name, "--port", "8080"];
        args.extend_from_slice(extra);
        c.serve_in_pod(name, &probe, &args, 8080).expect("http server");
    }
    c
}

fn http(c: &SimCluster, path: &str, args: &[&str]) -> Value {
    let url = format!("http://{VIP}{path}");
    let mut full = vec!["http", url.as_str()];
    full.extend_from_slice(args);
    let out = c.probe("client", &full, T).unwrap_or_else(|e| panic!("{e}\nnode-a log:\n{}", c.proxy_log(0)));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn by_pod(v: &Value) -> BTreeMap<String, u64> {
    v["by_pod"].as_object().map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

fn status_count(v: &Value, status: &str) -> u64 {
    v["by_status"][status].as_u64().unwrap_or(0)
}

fn policy(c: &SimCluster, yaml: &str) {
    c.apply_config("policy.yaml", yaml).unwrap();
}

#[test]
fn http1_and_http2_requests_are_balanced_per_request_over_one_connection() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[]), ("web-3", &[])]), &[]);
    policy(&c, "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n");
    for h2 in [false, true] {
        let mut args = vec!["--count", "30", "--conns", "1"];
        if h2 {
            args.push("--h2");
        }
        let v = http(&c, "/", &args);
        assert_eq!(status_count(&v, "200"), 30, "{v}");
        assert_eq!(v["connections_opened"], 1, "one client connection: {v}");
        assert_eq!(by_pod(&v), BTreeMap::from([("web-1".into(), 10), ("web-2".into(), 10), ("web-3".into(), 10)]), "h2={h2}: {v}");
    }
    assert!(c.counter(0, "proxy", "http_requests") >= 60);
}

#[test]
fn grpc_over_one_long_lived_connection_spreads_over_all_pods() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("rank-1", "demo", 0, "rank", &[], "grpc", 50051)
        .pod_labelled("rank-2", "demo", 1, "rank", &[], "grpc", 50051)
        .pod_labelled("rank-3", "demo", 1, "rank", &[], "grpc", 50051)
        .service_named("rank", "demo", [10, 96, 0, 60], "rank", "grpc", 50051, 50051);
    let c = SimCluster::start(spec).unwrap();
    let python = tools::python();
    let server = tools::grpc_script("probe_server.py");
    for pod in ["rank-1", "rank-2", "rank-3"] {
        c.serve_in_pod(pod, &python, &[server.to_str().unwrap(), "--name", pod, "--port", "50051"], 50051).unwrap();
    }
    // Istio's default policy (LEAST_REQUEST), no DestinationRule at all.
    let client = tools::grpc_script("probe_client.py");
    let out = c
        .run_in_pod("client", &python, &[client.to_str().unwrap(), "--target", "10.96.0.60:50051", "--count", "90"], T)
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["by_code"]["OK"], 90, "{v}");
    let pods = by_pod(&v);
    assert_eq!(pods.len(), 3, "every pod answered: {v}");
    assert!(pods.values().all(|n| *n >= 10), "spread over all pods: {v}");
}

#[test]
fn weighted_subsets_and_header_match_for_canary() {
    let c = start_http(http_cluster(&[("web-v1a", &[("version", "v1")]), ("web-v1b", &[("version", "v1")]), ("web-v2", &[("version", "v2")])]), &[]);
    policy(
        &c,
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: demo
spec:
  host: web
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: demo
spec:
  hosts: [web]
  http:
  - match:
    - headers:
        x-canary:
          exact: "true"
    route:
    - destination: {host: web, subset: v2}
      weight: 100
  - route:
    - destination: {host: web, subset: v1}
      weight: 90
    - destination: {host: web, subset: v2}
      weight: 10
"#,
    );
    let v = http(&c, "/", &["--count", "2000", "--conns", "2"]);
    assert_eq!(status_count(&v, "200"), 2000, "{v}");
    let pods = by_pod(&v);
    let v2 = *pods.get("web-v2").unwrap_or(&0) as f64 / 2000.0;
    assert!((0.07..=0.13).contains(&v2), "v2 share {v2}: {v}");
    let canary = http(&c, "/", &["--count", "50", "--header", "x-canary: true"]);
    assert_eq!(by_pod(&canary), BTreeMap::from([("web-v2".into(), 50)]), "{canary}");
}
