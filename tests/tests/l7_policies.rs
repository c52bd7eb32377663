//! End to end: Istio DestinationRule and VirtualService semantics applied per request by the
//! node proxies, with real HTTP/1.1, HTTP/2 and gRPC clients and servers in simulated pods.
//! Needs root; run through `cargo xtask test`.
use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{
    ClusterSpec, SimCluster, bins,
    report::{self, by_pod, status_count},
    tools,
};
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
    report::http(c, "client", &format!("http://{VIP}{path}"), args, T)
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

fn dr(traffic_policy: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  host: web\n  trafficPolicy:\n{traffic_policy}")
}

fn vs(http_route: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  hosts: [web]\n  http:\n{http_route}")
}

#[test]
fn consistent_hash_keeps_keys_on_one_pod_and_adding_a_pod_moves_few() {
    let mut c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[]), ("web-3", &[]), ("web-4", &[("parked", "yes")])]), &[]);
    // web-4 runs but is not selected yet: app=other.
    c.set_pod_labels("web-4", &[("app", "other")]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    policy(&c, &dr("    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user-id\n"));
    let users: Vec<String> = (0..120).map(|i| format!("user-{i}")).collect();
    let owner = |c: &SimCluster, user: &str| -> String {
        let v = http(c, "/", &["--count", "3", "--header", &format!("x-user-id: {user}")]);
        let pods = by_pod(&v);
        assert_eq!(pods.len(), 1, "{user} stuck to one pod: {v}");
        pods.into_keys().next().unwrap()
    };
    let before: Vec<String> = users.iter().map(|u| owner(&c, u)).collect();
    let distinct: std::collections::BTreeSet<_> = before.iter().collect();
    assert_eq!(distinct.len(), 3, "keys spread over the three pods: {before:?}");

    c.set_pod_labels("web-4", &[("app", "web")]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let after: Vec<String> = users.iter().map(|u| owner(&c, u)).collect();
    let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert!(moved.iter().all(|(_, a)| a.as_str() == "web-4"), "keys only move to the new pod: {moved:?}");
    let share = moved.len() as f64 / users.len() as f64;
    assert!(share > 0.08 && share < 0.40, "about 1/4 of keys move, got {share}");
}

#[test]
fn least_request_favours_the_fast_pod() {
    let c = start_http(http_cluster(&[("fast", &[]), ("slow", &[])]), &[("slow", &["--delay-ms", "40"])]);
    policy(&c, &dr("    loadBalancer:\n      simple: LEAST_REQUEST\n"));
    let v = http(&c, "/", &["--count", "300", "--concurrency", "8", "--h2"]);
    assert_eq!(status_count(&v, "200"), 300, "{v}");
    let pods = by_pod(&v);
    let fast = *pods.get("fast").unwrap_or(&0) as f64 / 300.0;
    assert!(fast > 0.75, "fast pod share {fast}: {v}");

    // The same load round robin: an even split, so the difference is the policy's doing.
    policy(&c, &dr("    loadBalancer:\n      simple: ROUND_ROBIN\n"));
    let v = http(&c, "/", &["--count", "100", "--concurrency", "8", "--h2"]);
    let fast_rr = *by_pod(&v).get("fast").unwrap_or(&0) as f64 / 100.0;
    assert!((0.4..=0.6).contains(&fast_rr), "round robin share {fast_rr}: {v}");
}

const OUTLIER: &str = "    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      consecutive5xxErrors: 5\n      interval: 1s\n      baseEjectionTime: 4s\n";

#[test]
fn a_failing_pod_is_ejected_then_returns() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[]), ("web-3", &[])]), &[]);
    policy(&c, &dr(&format!("{OUTLIER}      maxEjectionPercent: 100\n")));
    // web-2 answers 503 to every request carrying this header: 15 requests round robin give it
    // five in a row. Istio's default retry policy (no VirtualService) retries each 503 on
    // another pod, so the client sees none of them.
    let v = http(&c, "/", &["--count", "15", "--header", "x-fail-pods: web-2"]);
    assert_eq!(status_count(&v, "200"), 15, "{v}");
    assert_eq!(by_pod(&v).get("web-2"), None, "{v}");
    let ejected_at = std::time::Instant::now();
    let v = http(&c, "/", &["--count", "60"]);
    assert!(ejected_at.elapsed() < Duration::from_secs(3), "the check must run inside the ejection window");
    assert_eq!(by_pod(&v).get("web-2"), None, "ejected pod receives nothing: {v}");
    assert_eq!(status_count(&v, "200"), 60, "{v}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(ejected_at.elapsed()));
    let v = http(&c, "/", &["--count", "30"]);
    assert!(by_pod(&v).get("web-2").is_some_and(|n| *n >= 5), "back after baseEjectionTime: {v}");
}

#[test]
fn max_ejection_percent_caps_ejections_and_the_panic_threshold_spreads_load() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[]), ("web-3", &[])]), &[]);
    // 34% of 3 hosts: one host may be ejected, not two.
    policy(&c, &dr(&format!("{OUTLIER}      maxEjectionPercent: 34\n")));
    http(&c, "/", &["--count", "30", "--header", "x-fail-pods: web-2,web-3"]);
    let v = http(&c, "/", &["--count", "30"]);
    let pods = by_pod(&v);
    let failing_served: Vec<_> = ["web-2", "web-3"].iter().filter(|p| pods.contains_key(**p)).collect();
    assert_eq!(failing_served.len(), 1, "exactly one of the two failing pods ejected: {v}");

    // Two of three ejected, min health 50%: below it Envoy ignores ejections (panic mode).
    policy(&c, &dr(&format!("{OUTLIER}      maxEjectionPercent: 100\n      minHealthPercent: 50\n")));
    std::thread::sleep(Duration::from_secs(5));
    http(&c, "/", &["--count", "30", "--header", "x-fail-pods: web-2,web-3"]);
    let v = http(&c, "/", &["--count", "30"]);
    assert_eq!(by_pod(&v).len(), 3, "panic mode balances over all hosts: {v}");

    // Without a panic threshold and every host ejected: 503 no healthy upstream.
    policy(&c, &dr(&format!("{OUTLIER}      maxEjectionPercent: 100\n")));
    std::thread::sleep(Duration::from_secs(5));
    http(&c, "/", &["--count", "30", "--header", "x-fail-pods: web-1,web-2,web-3"]);
    let v = http(&c, "/", &["--count", "5"]);
    assert_eq!(status_count(&v, "503"), 5, "{v}");
    assert!(c.counter(0, "proxy", "flag_uh") >= 5);
}

#[test]
fn retries_hide_a_flaky_pod_and_per_try_timeouts_move_on() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("flaky", &[])]), &[("flaky", &["--fail-every", "2"])]);
    policy(&c, &format!("{}---\n{}", dr("    loadBalancer:\n      simple: ROUND_ROBIN\n"), vs("  - retries:\n      attempts: 0\n    route:\n    - destination: {host: web}\n")));
    let v = http(&c, "/", &["--count", "40"]);
    assert!(status_count(&v, "503") >= 5, "without retries the flaky pod shows: {v}");

    policy(&c, &format!("{}---\n{}", dr("    loadBalancer:\n      simple: ROUND_ROBIN\n"), vs("  - retries:\n      attempts: 3\n      retryOn: 5xx\n    route:\n    - destination: {host: web}\n")));
    let v = http(&c, "/", &["--count", "100"]);
    assert_eq!(status_count(&v, "200"), 100, "retries turn failures into success: {v}");
    assert!(c.counter(0, "proxy", "http_retries") >= 10);

    // A pod that takes 2s: the 200ms per-try timeout moves the request to the other pod.
    policy(&c, &format!("{}---\n{}", dr("    loadBalancer:\n      simple: ROUND_ROBIN\n"), vs("  - retries:\n      attempts: 2\n      perTryTimeout: 200ms\n      retryOn: 5xx,reset\n    route:\n    - destination: {host: web}\n")));
    let v = http(&c, "/", &["--count", "10", "--header", "x-delay-pods: flaky=2000"]);
    assert_eq!(status_count(&v, "200"), 10, "{v}");
    assert_eq!(by_pod(&v).get("flaky"), None, "{v}");
    assert!(v["p99_us"].as_f64().unwrap() < 1_000_000.0, "{v}");
}

#[test]
fn route_timeout_answers_504_and_pool_overflow_answers_503() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[])]), &[]);
    policy(&c, &vs("  - timeout: 300ms\n    route:\n    - destination: {host: web}\n"));
    let v = http(&c, "/", &["--count", "3", "--header", "x-delay-ms: 1500"]);
    assert_eq!(status_count(&v, "504"), 3, "{v}");
    assert!(c.counter(0, "proxy", "flag_ut") >= 3);

    policy(&c, &dr("    connectionPool:\n      http:\n        http2MaxRequests: 2\n"));
    let v = http(&c, "/", &["--count", "40", "--concurrency", "10", "--h2", "--header", "x-delay-ms: 100"]);
    // Two requests fit; the other eight in flight are refused at once, not queued.
    assert!(status_count(&v, "503") >= 10, "overflow answered 503: {v}");
    assert!(status_count(&v, "200") >= 2, "{v}");
    assert!(v["p50_us"].as_f64().unwrap() < 50_000.0, "refusals are immediate: {v}");
    assert!(c.counter(0, "proxy", "flag_uo") >= 10);
}

#[test]
fn fault_injection_and_header_rules_apply() {
    let c = start_http(http_cluster(&[("web-1", &[])]), &[]);
    policy(
        &c,
        &vs(r#"  - match:
    - uri:
        prefix: /abort
    fault:
      abort:
        httpStatus: 418
        percentage: {value: 100}
    route:
    - destination: {host: web}
  - match:
    - uri:
        prefix: /slow
    fault:
      delay:
        fixedDelay: 300ms
        percentage: {value: 100}
    rewrite:
      uri: /headers
    route:
    - destination: {host: web}
  - headers:
      request:
        set: {x-mesh: "yes"}
        remove: [x-secret]
      response:
        add: {x-served-by: mesh}
    route:
    - destination: {host: web}
"#),
    );
    let v = http(&c, "/abort", &["--count", "5"]);
    assert_eq!(status_count(&v, "418"), 5, "{v}");
    assert_eq!(by_pod(&v).len(), 0, "aborted before any pod: {v}");
    let v = http(&c, "/slow", &["--count", "2"]);
    assert_eq!(status_count(&v, "200"), 2, "{v}");
    assert!(v["p50_us"].as_f64().unwrap() >= 300_000.0, "delayed: {v}");
    let v = http(&c, "/headers", &["--count", "1", "--header", "x-secret: 1", "--print-body"]);
    let seen: Value = serde_json::from_str(v["last_body"].as_str().unwrap()).unwrap();
    assert_eq!(seen["x-mesh"], "yes", "{seen}");
    assert!(seen.get("x-secret").is_none(), "{seen}");
}

#[test]
fn websocket_upgrade_passes_through() {
    let c = start_http(http_cluster(&[("web-1", &[]), ("web-2", &[])]), &[]);
    let out = c.probe("client", &["ws", &format!("http://{VIP}/ws"), "--bytes", "1048576"], T).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["status"], 101, "{v}");
}

#[test]
fn an_invalid_policy_is_rejected_naming_the_field() {
    let dir = tempdir();
    std::fs::write(dir.join("vs.yaml"), vs("  - retries:\n      attempts: 2\n      retryOn: 5xx,sometimes\n    route:\n    - destination: {host: web}\n    mirrorPercent: 5\n")).unwrap();
    let out = std::process::Command::new(bins::path("mesh-node")).arg("validate").arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("VirtualService demo/web"), "{err}");
    assert!(err.contains("http[0]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-validate-{}-{}", std::process::id(), fastrand_u32()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
}

#[test]
fn unnamed_ports_are_sniffed_http_per_request_and_anything_else_as_tcp() {
    // Port named "web": not an Istio protocol prefix, so the proxy looks at the first bytes.
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web-1", "demo", 0, "web", &[], "web", 8080)
        .pod_labelled("web-2", "demo", 1, "web", &[], "web", 8080)
        .pod_labelled("raw-1", "demo", 1, "raw", &[], "raw", 7000)
        .service_named("web", "demo", [10, 96, 0, 50], "web", "web", 80, 8080)
        .service_named("raw", "demo", [10, 96, 0, 51], "raw", "raw", 80, 7000);
    let c = SimCluster::start(spec).unwrap();
    let probe = bins::path("mesh-probe");
    for pod in ["web-1", "web-2"] {
        c.serve_in_pod(pod, &probe, &["http-serve", "--name", pod, "--port", "8080"], 8080).unwrap();
    }
    c.serve_in_pod("raw-1", &probe, &["serve", "--name", "raw-1", "--port", "7000"], 7000).unwrap();
    policy(&c, &dr("    loadBalancer:\n      simple: ROUND_ROBIN\n"));
    let v = http(&c, "/", &["--count", "10", "--conns", "1"]);
    assert_eq!(by_pod(&v), BTreeMap::from([("web-1".into(), 5), ("web-2".into(), 5)]), "sniffed as HTTP, balanced per request: {v}");
    // A client-first non-HTTP protocol on an unnamed port is carried as TCP.
    let out = c.probe("client", &["who", "10.96.0.51:80"], T).unwrap();
    assert!(out.starts_with("raw-1 "), "{out}");
}

#[test]
fn tcp_routes_send_connections_by_weight_to_subsets() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("db-v1", "demo", 0, "db", &[("version", "v1")], "tcp", 7000)
        .pod_labelled("db-v2", "demo", 1, "db", &[("version", "v2")], "tcp", 7000)
        .service_named("db", "demo", [10, 96, 0, 52], "db", "tcp", 5432, 7000);
    let c = SimCluster::start(spec).unwrap();
    c.start_servers().unwrap();
    policy(
        &c,
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: demo}
spec:
  host: db
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: demo}
spec:
  hosts: [db]
  tcp:
  - match:
    - port: 5432
    route:
    - destination: {host: db, subset: v2}
      weight: 100
"#,
    );
    let out = c.probe("client", &["who", "10.96.0.52:5432", "--count", "10"], T).unwrap();
    assert!(out.lines().all(|l| l.starts_with("db-v2 ")), "{out}");
    assert_eq!(out.lines().count(), 10);
}
