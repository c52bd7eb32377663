//! End to end: the mesh's own DestinationRule annotations — latency-aware balancing
//! (`mesh.io/load-balancer: peak-ewma`), local rate limits (`mesh.io/rate-limit`) and adaptive
//! concurrency (`mesh.io/adaptive-concurrency`) — applied
//! by the node proxy with real HTTP/1.1 and gRPC-shaped HTTP/2 clients in simulated pods.
//! Needs root; run through `cargo xtask test`.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use mesh_e2e::{
    ClusterSpec, SimCluster, bins,
    report::{self, by_pod},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const VIP: &str = "10.96.0.50";

/// Pods web-1..3 of app `web` over both nodes behind Service `web` (port 80 -> 8080), and a
/// `client` pod on node-a.
fn start_web() -> SimCluster {
    let mut spec = ClusterSpec::new(2).namespace("demo", true).pod("client", "demo", 0, "client", 9000);
    for (i, name) in ["web-1", "web-2", "web-3"].iter().enumerate() {
        spec = spec.pod_labelled(name, "demo", i % 2, "web", &[], "http", 8080);
    }
    let spec = spec.service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    for name in ["web-1", "web-2", "web-3"] {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080"], 8080).expect("http server");
    }
    c
}

fn http(c: &SimCluster, args: &[&str]) -> Value {
    http_path(c, "/", args)
}

fn http_path(c: &SimCluster, path: &str, args: &[&str]) -> Value {
    report::http(c, "client", &format!("http://{VIP}{path}"), args, T)
}


/// web-3's fraction of the requests the pods answered.
fn slow_share(v: &Value) -> f64 {
    let pods = by_pod(v);
    let total: u64 = pods.values().sum();
    assert!(total > 0, "{v}");
    *pods.get("web-3").unwrap_or(&0) as f64 / total as f64
}

fn count(v: &Value, group: &str, key: &str) -> u64 {
    v[group][key].as_u64().unwrap_or(0)
}

fn destination_rule(annotations: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: web\n  namespace: demo\n  annotations:\n{annotations}spec:\n  host: web\n")
}

#[test]
fn peak_ewma_sends_a_slow_pod_less_than_least_request_and_recovers() {
    let c = start_web();
    let slow = ["--count", "1500", "--concurrency", "4", "--header", "x-delay-pods: web-3=30", "--expect-all-ok"];

    // Istio's default, LEAST_REQUEST: in-flight counts already favour the fast pods somewhat.
    c.apply_config("policy.yaml", &destination_rule("    example.com/unrelated: \"yes\"\n")).unwrap();
    let lr = http(&c, &slow);
    let lr_share = slow_share(&lr);

    c.apply_config("policy.yaml", &destination_rule("    mesh.io/load-balancer: peak-ewma\n")).unwrap();
    let ewma = http(&c, &slow);
    let ewma_share = slow_share(&ewma);
    eprintln!("slow pod share: LEAST_REQUEST {lr_share:.3}, peak-ewma {ewma_share:.3}");
    assert!(by_pod(&lr).get("web-3").copied().unwrap_or(0) >= 10, "LEAST_REQUEST still sends the slow pod some traffic: {lr}");
    // Typically a third to a half of LEAST_REQUEST's share; on a loaded 2-core VM the shares
    // are noisy (0.055 vs 0.102 seen with builds running), so the bar is 60%.
    assert!(ewma_share < lr_share * 0.6, "peak-ewma {ewma_share:.3} vs LEAST_REQUEST {lr_share:.3}\n{ewma}\n{lr}");

    let clusters = c.meshctl(0, &["-o", "json", "clusters"]).unwrap();
    let clusters: Value = serde_json::from_slice(&clusters.stdout).unwrap();
    let cluster = &clusters["outbound|80||web.demo.svc.cluster.local"];
    assert_eq!(cluster["policy"], "PEAK_EWMA", "{clusters}");
    let estimate = |pod: &str| {
        cluster["endpoints"].as_array().unwrap().iter().find(|e| e["pod"] == pod).and_then(|e| e["latency_estimate_ms"].as_f64()).unwrap()
    };
    assert!(estimate("demo/web-3") > estimate("demo/web-1"), "{cluster}");

    // Fast again: the slow pod's estimate decays (tau 10 s) until it is tried and measured fast.
    let start = Instant::now();
    loop {
        let v = http(&c, &["--count", "200", "--concurrency", "4", "--expect-all-ok"]);
        let share = slow_share(&v);
        if share >= 0.15 {
            eprintln!("recovered after {:.1} s (share {share:.3})", start.elapsed().as_secs_f64());
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "web-3 did not get its share back within 60 s: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn rate_limit_admits_rate_plus_burst_and_answers_the_rest_at_once() {
    let c = start_web();
    c.apply_config("policy.yaml", &destination_rule("    mesh.io/rate-limit: 50/s\n    mesh.io/rate-limit-burst: \"10\"\n")).unwrap();

    // ~200 req/s offered for 3 s.
    let v = http(&c, &["--count", "600", "--rate", "200", "--concurrency", "32"]);
    let ok = count(&v, "by_status", "200");
    let limited = count(&v, "by_status", "429");
    let elapsed_s = v["elapsed_ms"].as_f64().unwrap() / 1e3;
    let expected = 50.0 * elapsed_s + 10.0;
    eprintln!("admitted {ok} (expected ~{expected:.0}) of 600 in {elapsed_s:.2} s, {limited} answered 429");
    assert_eq!(ok + limited, 600, "only 200 or 429: {v}");
    assert!((ok as f64 - expected).abs() <= 0.25 * expected, "admitted {ok}, expected {expected:.0} ±25%: {v}");
    // Most answers are 429s made by the proxy without any upstream: the median is one of them.
    assert!(v["p50_us"].as_f64().unwrap() < 20_000.0, "429s are immediate: {v}");
    assert!(elapsed_s < 4.5, "the client kept its pace, nothing queued: {v}");
    assert!(c.counter(0, "proxy", "flag_rl") >= limited, "RL counted");

    // The admin endpoint shows the bucket.
    let clusters = c.meshctl(0, &["-o", "json", "clusters"]).unwrap();
    let clusters: Value = serde_json::from_slice(&clusters.stdout).unwrap();
    let bucket = &clusters["outbound|80||web.demo.svc.cluster.local"]["rate_limit"];
    assert_eq!(bucket["burst"], 10, "{clusters}");
    assert_eq!(bucket["rate_per_second"], 50.0, "{clusters}");

    // Metrics carry the RL flag on the 429s.
    let out = c.run_in_netns(&c.node(0).netns, Path::new("curl"), &["-s", "http://127.0.0.1:15020/metrics"], Duration::from_secs(10)).unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"429\"") && l.contains("response_flags=\"RL\"")),
        "{metrics}"
    );

    // gRPC clients get RESOURCE_EXHAUSTED in a trailers-only answer.
    let g = http_path(&c, "/grpc", &["--count", "100", "--concurrency", "10", "--h2", "--grpc"]);
    assert!(count(&g, "by_grpc_status", "8") >= 50, "{g}");
    assert!(count(&g, "by_grpc_status", "0") >= 1, "the burst still goes through: {g}");
    assert_eq!(count(&g, "by_status", "200"), 100, "gRPC errors travel as HTTP 200: {g}");
}

#[test]
fn adaptive_concurrency_sheds_the_excess_quickly_and_bounds_admitted_latency() {
    // One pod that processes 2 requests at once, 20 ms each (100 req/s); the rest queue.
    let spec = ClusterSpec::new(1)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web-1", "demo", 0, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    c.serve_in_pod("web-1", &probe, &["http-serve", "--name", "web-1", "--port", "8080", "--capacity", "2", "--service-ms", "20"], 8080)
        .expect("http server");
    let unloaded = http(&c, &["--count", "20", "--expect-all-ok"]);
    let unloaded_p50 = unloaded["p50_us"].as_f64().unwrap();
    // 200 req/s offered (twice the capacity) with up to 16 in flight.
    let surge = ["--count", "600", "--rate", "200", "--concurrency", "16", "--timeout-ms", "10000"];

    // Without protection everything queues at the pod: ~16 / 2 * 20 ms.
    let open = http(&c, &surge);
    assert_eq!(count(&open, "by_status", "200"), 600, "{open}");
    let open_p99 = open["p99_us"].as_f64().unwrap();

    c.apply_config("policy.yaml", &destination_rule("    mesh.io/adaptive-concurrency: \"on\"\n")).unwrap();
    // A quiet spell lets the limiter see the latency without queueing.
    http(&c, &["--count", "40", "--expect-all-ok"]);
    let limited = http(&c, &surge);
    let ok = count(&limited, "by_status", "200");
    let shed = count(&limited, "by_status", "503");
    let ok_p99 = limited["ok_p99_us"].as_f64().unwrap();
    let shed_p50 = limited["not_ok_answers_p50_us"].as_f64().unwrap();
    eprintln!(
        "unloaded p50 {:.1} ms; without limit p99 {:.1} ms; adaptive: {ok} admitted (p99 {:.1} ms), {shed} shed (p50 {:.2} ms)",
        unloaded_p50 / 1e3,
        open_p99 / 1e3,
        ok_p99 / 1e3,
        shed_p50 / 1e3
    );
    assert_eq!(ok + shed, 600, "only 200 or 503: {limited}");
    assert!(ok >= 100 && shed >= 100, "{limited}");
    assert!(shed_p50 < 5_000.0, "sheds are immediate: {limited}");
    assert!(ok_p99 < 5.0 * unloaded_p50, "admitted p99 {ok_p99} vs unloaded p50 {unloaded_p50}: {limited}");
    assert!(open_p99 > 5.0 * unloaded_p50 && open_p99 > 2.0 * ok_p99, "without the limit requests queue: {open}");
    assert!(c.counter(0, "proxy", "flag_cl") >= shed, "CL counted");

    let clusters = c.meshctl(0, &["-o", "json", "clusters"]).unwrap();
    let clusters: Value = serde_json::from_slice(&clusters.stdout).unwrap();
    let limiter = &clusters["outbound|80||web.demo.svc.cluster.local"]["adaptive_concurrency"];
    assert!(limiter["limit"].as_u64().is_some_and(|l| (1..=10).contains(&l)), "{clusters}");
    assert!(limiter["min_rtt_ms"].as_f64().is_some_and(|ms| ms >= 20.0), "{clusters}");
    assert_eq!(limiter["max_limit"], 1000, "{clusters}");

    let out = c.run_in_netns(&c.node(0).netns, Path::new("curl"), &["-s", "http://127.0.0.1:15020/metrics"], Duration::from_secs(10)).unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"503\"") && l.contains("response_flags=\"CL\"")),
        "{metrics}"
    );
}
