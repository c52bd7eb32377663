//! End to end: Istio's defaults and Envoy's gRPC handling, with a real gRPC stack (grpcio) and
//! the mesh-probe HTTP server in simulated pods.
//! - A gRPC pod failing every call with INTERNAL is ejected by `consecutive5xxErrors`, whether it
//!   answers trailers-only (grpc-status in the response headers) or with headers then trailers,
//!   and then receives nothing, counted by the server itself; a pod failing with NOT_FOUND (404
//!   in Envoy's mapping) is not.
//! - UNAVAILABLE maps to 503 for `consecutiveGatewayErrors`; INTERNAL (500) does not count there.
//! - A route with no retry policy gets Istio's default: a 503 from a pod failing every second
//!   request is retried into 100% success, and gRPC UNAVAILABLE is retried when trailers-only
//!   (not after response headers, as Envoy); `retries: {attempts: 0}` shows the failures.
//!
//! Needs root; run through `cargo xtask test`.
use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{
    ClusterSpec, SimCluster, bins,
    report::{self, by_pod, status_count},
    tools,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const GRPC_VIP: &str = "10.96.0.60";
const RANKS: [&str; 3] = ["rank-1", "rank-2", "rank-3"];

/// Pods rank-1..3 of app `rank` running the grpcio probe server on 50051 behind Service `rank`
/// (port name `grpc`), and a `client` pod on node-a. `flaky`: a pod whose every second Who call
/// fails with UNAVAILABLE.
fn start_grpc(flaky: Option<&str>) -> SimCluster {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("rank-1", "demo", 0, "rank", &[], "grpc", 50051)
        .pod_labelled("rank-2", "demo", 1, "rank", &[], "grpc", 50051)
        .pod_labelled("rank-3", "demo", 1, "rank", &[], "grpc", 50051)
        .service_named("rank", "demo", [10, 96, 0, 60], "rank", "grpc", 50051, 50051);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let python = tools::python();
    let server = tools::grpc_script("probe_server.py");
    for pod in RANKS {
        let mut args = vec![server.to_str().unwrap(), "--name", pod, "--port", "50051"];
        if flaky == Some(pod) {
            args.extend(["--fail-every", "2"]);
        }
        c.serve_in_pod(pod, &python, &args, 50051).expect("grpc server");
    }
    c
}

/// `count` sequential unary calls over one channel from `pod` to `target`; the client's report.
fn grpc_from(c: &SimCluster, pod: &str, target: &str, method: &str, count: u32, metadata: &[&str]) -> Value {
    let python = tools::python();
    let client = tools::grpc_script("probe_client.py");
    let count = count.to_string();
    let mut args = vec![client.to_str().unwrap(), "--target", target, "--method", method, "--count", &count];
    for m in metadata {
        args.extend(["--metadata", m]);
    }
    let out = c.run_in_pod(pod, &python, &args, T).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}\nnode-a log:\n{}", String::from_utf8_lossy(&out.stderr), c.proxy_log(0));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Calls from the client pod through the mesh to Service `rank`.
fn grpc(c: &SimCluster, method: &str, count: u32, metadata: &[&str]) -> Value {
    grpc_from(c, "client", &format!("{GRPC_VIP}:50051"), method, count, metadata)
}

fn code_count(v: &Value, code: &str) -> u64 {
    v["by_code"][code].as_u64().unwrap_or(0)
}

/// Calls a pod's server has received (Who and Fail), asked from inside the pod over loopback:
/// not captured, not counted.
fn served(c: &SimCluster, pod: &str) -> u64 {
    let v = grpc_from(c, pod, "127.0.0.1:50051", "Count", 1, &[]);
    v["last_reply"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{pod}: no count in {v}"))
}

fn served_all(c: &SimCluster) -> BTreeMap<&'static str, u64> {
    RANKS.iter().map(|p| (*p, served(c, p))).collect()
}

fn dr(host: &str, traffic_policy: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {host}\n  namespace: demo\nspec:\n  host: {host}\n  trafficPolicy:\n{traffic_policy}")
}

#[test]
fn a_grpc_pod_failing_with_internal_is_ejected_in_both_response_forms_and_then_receives_nothing() {
    let c = start_grpc(None);
    // Ejections last a minute: everything below runs inside that window.
    let outlier = "    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      consecutive5xxErrors: 5\n      interval: 1s\n      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n";
    c.apply_config("policy.yaml", &dr("rank", outlier)).unwrap();

    // Control: NOT_FOUND is a 404 in Envoy's mapping, not a 5xx: five of them in a row eject
    // nothing, the pod keeps its share.
    let v = grpc(&c, "Fail", 15, &["x-fail-pods=rank-2", "x-grpc-status=NOT_FOUND"]);
    assert_eq!(code_count(&v, "NOT_FOUND"), 5, "round robin gave rank-2 five calls: {v}");
    let before = served(&c, "rank-2");
    let v = grpc(&c, "Who", 30, &[]);
    assert_eq!(code_count(&v, "OK"), 30, "{v}");
    assert_eq!(by_pod(&v).get("rank-2"), Some(&10), "NOT_FOUND does not eject: {v}");
    assert_eq!(served(&c, "rank-2"), before + 10, "the server saw its share");

    // Headers first (the server sends its initial metadata), grpc-status 13 in the trailers.
    let v = grpc(&c, "Fail", 15, &["x-fail-pods=rank-2", "x-grpc-status=INTERNAL"]);
    assert_eq!(code_count(&v, "INTERNAL"), 5, "{v}");
    let ejected = served_all(&c);
    let v = grpc(&c, "Who", 30, &[]);
    assert_eq!(code_count(&v, "OK"), 30, "{v}");
    assert_eq!(by_pod(&v).get("rank-2"), None, "ejected after five INTERNAL in trailers: {v}");
    let now = served_all(&c);
    assert_eq!(now["rank-2"], ejected["rank-2"], "the ejected server received nothing: {ejected:?} -> {now:?}");
    assert_eq!(now["rank-1"] + now["rank-3"], ejected["rank-1"] + ejected["rank-3"] + 30, "{ejected:?} -> {now:?}");

    // Trailers-only: grpc-status 13 in the one HEADERS frame of the response.
    let v = grpc(&c, "Fail", 10, &["x-fail-pods=rank-3", "x-grpc-status=INTERNAL", "x-initial-metadata=no"]);
    assert_eq!(code_count(&v, "INTERNAL"), 5, "rank-1 and rank-3 left, rank-3 got five calls: {v}");
    let ejected = served_all(&c);
    let v = grpc(&c, "Who", 20, &[]);
    assert_eq!(code_count(&v, "OK"), 20, "{v}");
    assert_eq!(by_pod(&v), BTreeMap::from([("rank-1".into(), 20)]), "rank-3 ejected too: {v}");
    let now = served_all(&c);
    assert_eq!((now["rank-2"], now["rank-3"]), (ejected["rank-2"], ejected["rank-3"]), "{ejected:?} -> {now:?}");
    assert_eq!(now["rank-1"], ejected["rank-1"] + 20);
}

#[test]
fn grpc_unavailable_counts_as_a_gateway_error_and_internal_does_not() {
    let c = start_grpc(None);
    let gateway = "    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      consecutive5xxErrors: 0\n      consecutiveGatewayErrors: 3\n      interval: 1s\n      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n";
    c.apply_config("policy.yaml", &dr("rank", gateway)).unwrap();

    // Control: INTERNAL (500) is no gateway error; with consecutive5xxErrors off nothing ejects.
    let v = grpc(&c, "Fail", 12, &["x-fail-pods=rank-2", "x-grpc-status=INTERNAL"]);
    assert_eq!(code_count(&v, "INTERNAL"), 4, "{v}");
    let v = grpc(&c, "Who", 30, &[]);
    assert_eq!(by_pod(&v).get("rank-2"), Some(&10), "INTERNAL does not count as a gateway error: {v}");

    // UNAVAILABLE after headers (not retried, see below): 503 for outlier detection.
    let v = grpc(&c, "Fail", 9, &["x-fail-pods=rank-2", "x-grpc-status=UNAVAILABLE"]);
    assert_eq!(code_count(&v, "UNAVAILABLE"), 3, "{v}");
    let ejected = served(&c, "rank-2");
    let v = grpc(&c, "Who", 30, &[]);
    assert_eq!(code_count(&v, "OK"), 30, "{v}");
    assert_eq!(by_pod(&v).get("rank-2"), None, "ejected after three UNAVAILABLE: {v}");
    assert_eq!(served(&c, "rank-2"), ejected, "the ejected server received nothing");
}

#[test]
fn the_default_retry_policy_retries_grpc_unavailable_when_trailers_only() {
    // Every second Who call rank-2 receives fails with UNAVAILABLE.
    let c = start_grpc(Some("rank-2"));
    c.apply_config("policy.yaml", &dr("rank", "    loadBalancer:\n      simple: ROUND_ROBIN\n")).unwrap();

    // Trailers-only UNAVAILABLE: Istio's default retryOn `unavailable` retries it.
    let retries = c.counter(0, "proxy", "http_retries");
    let v = grpc(&c, "Who", 60, &["x-initial-metadata=no"]);
    assert_eq!(code_count(&v, "OK"), 60, "no retry policy set, every call succeeds: {v}");
    let retried = c.counter(0, "proxy", "http_retries") - retries;
    assert!(retried >= 5, "the failures were there and retried: {retried}");
    let total: u64 = served_all(&c).values().sum();
    assert_eq!(total, 60 + retried, "each retry is one more call a server saw");

    // After response headers, the status comes in trailers: Envoy no longer retries (the
    // response has started), nor does the mesh; the client sees the failures.
    let v = grpc(&c, "Who", 40, &[]);
    assert!(code_count(&v, "UNAVAILABLE") >= 5, "{v}");

    // Control: retries disabled on the route, trailers-only failures are seen too.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: rank\n  namespace: demo\nspec:\n  hosts: [rank]\n  http:\n  - retries:\n      attempts: 0\n    route:\n    - destination: {host: rank}\n";
    c.apply_config("vs.yaml", vs).unwrap();
    let v = grpc(&c, "Who", 40, &["x-initial-metadata=no"]);
    assert!(code_count(&v, "UNAVAILABLE") >= 5, "attempts: 0 shows the failures: {v}");
}

const WEB_VIP: &str = "10.96.0.50";

#[test]
fn a_route_without_retry_policy_retries_a_503_into_success() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web-1", "demo", 0, "web", &[], "http", 8080)
        .pod_labelled("flaky", "demo", 1, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    c.serve_in_pod("web-1", &probe, &["http-serve", "--name", "web-1", "--port", "8080"], 8080).unwrap();
    // flaky answers 503 to every second request it receives.
    c.serve_in_pod("flaky", &probe, &["http-serve", "--name", "flaky", "--port", "8080", "--fail-every", "2"], 8080).unwrap();
    let http = |args: &[&str]| report::http(&c, "client", &format!("http://{WEB_VIP}/"), args, T);
    let rr = dr("web", "    loadBalancer:\n      simple: ROUND_ROBIN\n");
    let vs = |retries: &str| format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  hosts: [web]\n  http:\n  - {retries}\n    route:\n    - destination: {{host: web}}\n");

    // Control: retries disabled, the flaky pod's 503s reach the client.
    c.apply_config("policy.yaml", &format!("{rr}---\n{}", vs("retries:\n      attempts: 0"))).unwrap();
    let v = http(&["--count", "40"]);
    assert!(status_count(&v, "503") >= 5, "without retries the 503s show: {v}");

    // An explicit retryOn without 503 replaces the default conditions: the 503s show too.
    c.apply_config("policy.yaml", &format!("{rr}---\n{}", vs("retries:\n      attempts: 2\n      retryOn: connect-failure,refused-stream"))).unwrap();
    let v = http(&["--count", "40"]);
    assert!(status_count(&v, "503") >= 5, "retryOn without 503: {v}");

    // No retry policy at all (no VirtualService): Istio's default retries the 503.
    c.apply_config("policy.yaml", &rr).unwrap();
    let retries = c.counter(0, "proxy", "http_retries");
    let v = http(&["--count", "100"]);
    assert_eq!(status_count(&v, "200"), 100, "Istio's default retry policy hides the flaky pod: {v}");
    assert!(c.counter(0, "proxy", "http_retries") - retries >= 10, "and it did retry");

    // A retries block with attempts but no retryOn keeps the default conditions, 503 included.
    c.apply_config("policy.yaml", &format!("{rr}---\n{}", vs("retries:\n      attempts: 3"))).unwrap();
    let v = http(&["--count", "100", "--h2"]);
    assert_eq!(status_count(&v, "200"), 100, "{v}");
}
