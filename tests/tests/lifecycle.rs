//! End to end: pods come and go as kubelet and the controllers drive them, under load. A pod's
//! readiness probe fails and recovers; a rollout brings a new pod up and deletes an old one
//! (terminating, finishing what it has during its grace period, then gone); the Service scales
//! 3 -> 1 -> 4. Meanwhile gRPC over one channel and HTTP/1.1 over keep-alive connections run at
//! 500 requests a second through the mesh (mutual TLS between the nodes), and:
//! - no request fails;
//! - once the node proxies have the change, no new request reaches a pod that is not Ready or
//!   is terminating (counted by the servers themselves), and new Ready pods get their share.
//!
//! Needs root (CI runs as root); run through `cargo xtask test`.
use std::{
    collections::BTreeMap,
    path::Path,
    process::Child,
    time::{Duration, Instant},
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, cluster::PodSpec};

const PORT: u16 = 8080;
/// How long the load runs: the whole scenario must fit in it (checked).
const LOAD_SECS: u64 = 45;
const RATE_EACH: u64 = 250;
/// Requests the proxies dispatched just before they loaded a change may still be on the wire.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a pod must see no new request to count as out of rotation.
const WATCH: Duration = Duration::from_millis(1500);

fn echo(name: &str, node: usize) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "demo".into(),
        node,
        labels: [("app".to_string(), "echo".to_string())].into(),
        ports: vec![("http".into(), PORT)],
        service_account: None,
        probe_ports: Vec::new(),
    }
}

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace("demo", true).pod("client", "demo", 0, "client", 9000);
    spec.pods.extend([echo("echo-1", 0), echo("echo-2", 1), echo("echo-3", 1)]);
    spec.service_named("echo-grpc", "demo", [10, 96, 0, 11], "echo", "grpc", 50051, PORT)
        .service_named("echo-http", "demo", [10, 96, 0, 12], "echo", "http", 80, PORT)
}

fn serve(c: &SimCluster, pod: &str) {
    // Each answer takes 20 ms, so a pod always has requests in flight when it is deleted.
    c.serve_in_pod(pod, &bins::path("mesh-probe"), &["http-serve", "--name", pod, "--port", &PORT.to_string(), "--delay-ms", "20"], PORT)
        .unwrap_or_else(|e| panic!("server in {pod}: {e:#}"));
}

/// Requests a pod's server has received, asked from its node (not captured, not counted).
fn served(c: &SimCluster, pod: &str) -> u64 {
    let p = c.pod(pod);
    let url = format!("http://{}:{PORT}/count", p.ip);
    let out = c.run_in_netns(&c.node(p.spec.node).netns, Path::new("curl"), &["-s", "-m", "5", &url], Duration::from_secs(10)).expect("curl runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{pod} /count: {e}: {out:?}"));
    v["requests"].as_u64().expect("a count")
}

/// After a change the proxies have loaded: the pods in `out` receive nothing new for a while,
/// while the load goes on (it must: the pods in `in_` receive).
fn assert_rotation(c: &SimCluster, step: &str, out: &[&str], in_: &[&str]) {
    std::thread::sleep(SETTLE);
    let before: BTreeMap<&str, u64> = out.iter().chain(in_).map(|p| (*p, served(c, p))).collect();
    std::thread::sleep(WATCH);
    for pod in out {
        let now = served(c, pod);
        assert_eq!(now, before[pod], "{step}: {pod} got {} new requests while out of rotation", now - before[pod]);
    }
    for pod in in_ {
        assert!(served(c, pod) > before[pod], "{step}: {pod} got no requests while in rotation");
    }
    eprintln!("{step}: ok ({})", out.iter().chain(in_).map(|p| format!("{p}={}", served(c, p))).collect::<Vec<_>>().join(" "));
}

fn failures(v: &serde_json::Value) -> u64 {
    let errors: u64 = v["errors"].as_object().map(|o| o.values().filter_map(|n| n.as_u64()).sum()).unwrap_or(0);
    let not_2xx: u64 = v["by_status"].as_object().map(|o| o.iter().filter(|(s, _)| !s.starts_with('2')).filter_map(|(_, n)| n.as_u64()).sum()).unwrap_or(0);
    let grpc: u64 = v["by_grpc_status"].as_object().map(|o| o.iter().filter(|(s, _)| *s != "0").filter_map(|(_, n)| n.as_u64()).sum()).unwrap_or(0);
    errors + not_2xx + grpc
}

fn finish(mut child: Child, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECS + 30);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "{what} load did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out).expect("report");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{what} report is not JSON ({e}): {out}"))
}

#[test]
fn readiness_rollout_and_scaling_under_load_lose_nothing() {
    let mut c = SimCluster::start(spec()).expect("simulated cluster");
    for pod in ["echo-1", "echo-2", "echo-3"] {
        serve(&c, pod);
    }
    let probe = bins::path("mesh-probe");
    let count = (RATE_EACH * LOAD_SECS).to_string();
    let rate = RATE_EACH.to_string();
    let grpc = c
        .spawn_piped("client", &probe, &["http", "http://10.96.0.11:50051/grpc", "--h2", "--grpc", "--conns", "1", "--concurrency", "16", "--rate", &rate, "--count", &count, "--body-bytes", "64"])
        .expect("grpc load");
    let http = c
        .spawn_piped("client", &probe, &["http", "http://10.96.0.12:80/", "--conns", "8", "--rate", &rate, "--count", &count])
        .expect("http load");
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_rotation(&c, "steady", &[], &["echo-1", "echo-2", "echo-3"]);

    // A readiness probe fails, then passes again.
    c.set_pod_ready("echo-2", false).unwrap();
    assert_rotation(&c, "echo-2 NotReady", &["echo-2"], &["echo-1", "echo-3"]);
    c.set_pod_ready("echo-2", true).unwrap();
    assert_rotation(&c, "echo-2 Ready again", &[], &["echo-1", "echo-2", "echo-3"]);

    // Rollout: the new pod is scheduled (not Ready: no traffic), starts, turns Ready; the old
    // one is deleted, finishes its in-flight requests, and is gone after its grace period.
    c.add_pod(echo("echo-4", 0)).unwrap();
    serve(&c, "echo-4");
    assert_rotation(&c, "echo-4 started, not Ready", &["echo-4"], &["echo-1", "echo-2", "echo-3"]);
    c.set_pod_ready("echo-4", true).unwrap();
    c.terminate_pod("echo-1").unwrap();
    assert_rotation(&c, "rollout: echo-1 terminating", &["echo-1"], &["echo-2", "echo-3", "echo-4"]);
    c.remove_pod("echo-1").unwrap();

    // Scale 3 -> 1.
    c.terminate_pod("echo-3").unwrap();
    c.terminate_pod("echo-4").unwrap();
    assert_rotation(&c, "scaled to 1", &["echo-3", "echo-4"], &["echo-2"]);
    c.remove_pod("echo-3").unwrap();
    c.remove_pod("echo-4").unwrap();

    // Scale 1 -> 4: pods join as their probes pass.
    for (name, node) in [("echo-5", 0), ("echo-6", 1), ("echo-7", 0)] {
        c.add_pod(echo(name, node)).unwrap();
        serve(&c, name);
    }
    assert_rotation(&c, "scaling up, not Ready yet", &["echo-5", "echo-6", "echo-7"], &["echo-2"]);
    for name in ["echo-5", "echo-6", "echo-7"] {
        c.set_pod_ready(name, true).unwrap();
    }
    assert_rotation(&c, "scaled to 4", &[], &["echo-2", "echo-5", "echo-6", "echo-7"]);
    let scenario = started.elapsed();
    assert!(scenario < Duration::from_secs(LOAD_SECS - 2), "the scenario ({scenario:?}) outlasted the load");

    let grpc = finish(grpc, "gRPC");
    let http = finish(http, "HTTP");
    for (what, v) in [("gRPC", &grpc), ("HTTP/1.1", &http)] {
        eprintln!("{what}: {} requests, {} failed, by pod {}, p99 {:.1} ms", v["requests"], failures(v), v["by_pod"], v["p99_us"].as_f64().unwrap_or(0.0) / 1e3);
        assert_eq!(v["requests"].as_u64(), Some(RATE_EACH * LOAD_SECS), "{what}: {v}");
        assert_eq!(failures(v), 0, "{what}: failed requests: {v}\nnode-a:\n{}", c.proxy_log(0));
    }
    assert_eq!(grpc["connections_opened"].as_u64(), Some(1), "gRPC over one channel: {grpc}");
}

/// L4: a TCP connection open to a pod that starts terminating runs to completion, while new
/// connections go to the ready pod; once no pod is ready, a serving terminating pod takes new
/// connections (kube-proxy's fallback) rather than none.
#[test]
fn open_tcp_connections_to_a_terminating_pod_run_to_completion() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod("tcp-1", "demo", 1, "tcp", 7000)
        .service("tcp", "demo", [10, 96, 0, 21], "tcp", 80, 7000);
    let mut c = SimCluster::start(spec).expect("simulated cluster");
    c.start_servers().expect("servers");
    let probe = bins::path("mesh-probe");
    // 50 round trips a second on one connection for 6 s: it lands on tcp-1, the only pod.
    let rr = c.spawn_piped("client", &probe, &["rr", "10.96.0.21:80", "--rate", "50", "--seconds", "6", "--conns", "1", "--size", "64"]).expect("rr");
    std::thread::sleep(Duration::from_millis(500));

    let mut tcp2 = echo("tcp-2", 0);
    tcp2.labels = [("app".to_string(), "tcp".to_string())].into();
    tcp2.ports = vec![("tcp".into(), 7000)];
    c.add_pod(tcp2).unwrap();
    c.serve_in_pod("tcp-2", &probe, &["serve", "--name", "tcp-2", "--port", "7000"], 7000).unwrap();
    c.set_pod_ready("tcp-2", true).unwrap();
    c.terminate_pod("tcp-1").unwrap();
    let who = c.probe("client", &["who", "10.96.0.21:80", "--count", "10"], Duration::from_secs(30)).unwrap();
    let answered: Vec<&str> = who.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    assert_eq!(answered, vec!["tcp-2"; 10], "new connections only to the ready pod");

    let report = finish(rr, "rr");
    assert_eq!(report["errors"], 0, "the open connection to the terminating pod was cut: {report}");
    assert_eq!(report["requests"], 300, "{report}");

    // Now the ready pod goes too: the terminating one still serves, so it takes new work.
    c.set_pod_ready("tcp-2", false).unwrap();
    let who = c.probe("client", &["who", "10.96.0.21:80", "--count", "3"], Duration::from_secs(30)).unwrap();
    assert!(who.lines().all(|l| l.starts_with("tcp-1")), "serving-terminating fallback: {who}");
    c.remove_pod("tcp-1").unwrap();
    // tcp-2 is NotReady and not terminating: it gets nothing, even with nothing else left.
    let out = c.probe("client", &["connect", "10.96.0.21:80", "--timeout-ms", "3000"], Duration::from_secs(30)).unwrap_or_else(|e| e.to_string());
    assert!(["\"reset\"", "\"refused\"", "\"eof\""].iter().any(|r| out.contains(r)), "no pod to serve: refused at once, not hung: {out}");
}
