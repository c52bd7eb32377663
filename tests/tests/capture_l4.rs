//! End to end: real eBPF capture and real node proxies on a simulated two-node cluster.
//! Needs root (CI runs as root); run through `cargo xtask test`.
use std::{collections::BTreeMap, process::Command, time::Duration};

use mesh_e2e::{ClusterSpec, SimCluster, bins};

const T: Duration = Duration::from_secs(30);

/// Namespace `demo` is in the mesh, `plain` is not. `echo` has three pods over both nodes,
/// `solo` one pod on node-b, `local` one pod on node-a, `lonely` none.
fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("plain", false)
        .pod("client", "demo", 0, "client", 9000)
        .pod("echo-1", "demo", 1, "echo", 7000)
        .pod("echo-2", "demo", 0, "echo", 7000)
        .pod("echo-3", "demo", 1, "echo", 7000)
        .pod("solo-1", "demo", 1, "solo", 7100)
        .pod("local-1", "demo", 0, "local", 7200)
        .pod("outsider", "plain", 0, "outsider", 9000)
        .service("echo", "demo", [10, 96, 0, 10], "echo", 80, 7000)
        .service("solo", "demo", [10, 96, 0, 11], "solo", 80, 7100)
        .service("local", "demo", [10, 96, 0, 12], "local", 80, 7200)
        .service("lonely", "demo", [10, 96, 0, 13], "nobody", 80, 7000)
}

fn start() -> SimCluster {
    let cluster = SimCluster::start(spec()).expect("simulated cluster");
    cluster.start_servers().expect("servers");
    cluster
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn cross_node_service_carries_10mib_each_way_intact() {
    let c = start();
    let out = c.probe("client", &["echo", "10.96.0.11:80", "--bytes", &(10 * 1024 * 1024).to_string()], T).unwrap();
    let r = json(&out);
    assert_eq!(r["received"], 10 * 1024 * 1024, "{r}");
    assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    assert!(c.counter(0, "capture", "captured") >= 1);
    assert_eq!(c.counter(0, "proxy", "outbound_tunneled"), 1, "went through node-b's proxy");
    assert_eq!(c.counter(1, "proxy", "inbound_requests"), 1);
    // The server saw the connection come from node-b's proxy, not from the client pod.
    let who = c.probe("client", &["who", "10.96.0.11:80"], T).unwrap();
    assert_eq!(who.trim(), "solo-1 10.244.1.1");
    // Many connections, one multiplexed tunnel connection between the two nodes.
    let out = c.probe("client", &["who", "10.96.0.11:80", "--count", "20"], T).unwrap();
    assert_eq!(out.lines().count(), 20);
    assert_eq!(c.stats(0).unwrap()["tunnel_connections"], 1);
    assert_eq!(c.counter(1, "proxy", "inbound_requests"), 22);
}

#[test]
fn same_node_path_and_round_robin_over_endpoints() {
    let c = start();
    let out = c.probe("client", &["who", "10.96.0.12:80", "--count", "3"], T).unwrap();
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["local-1 10.244.0.1"; 3], "same node: the local proxy connects to the pod");
    assert_eq!(c.counter(0, "proxy", "outbound_direct"), 3);
    assert_eq!(c.counter(0, "proxy", "outbound_tunneled"), 0);

    // Istio's default is LEAST_REQUEST; ask for round robin as a user would.
    c.apply_config("dr.yaml", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n").unwrap();
    let out = c.probe("client", &["who", "10.96.0.10:80", "--count", "9"], T).unwrap();
    let mut answered: BTreeMap<&str, usize> = BTreeMap::new();
    for line in out.lines() {
        *answered.entry(line.split_whitespace().next().unwrap()).or_default() += 1;
    }
    assert_eq!(answered, BTreeMap::from([("echo-1", 3), ("echo-2", 3), ("echo-3", 3)]), "{out}");
    // Consecutive connections go to different pods.
    let order: Vec<_> = out.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
}

#[test]
fn pod_outside_enrolled_namespaces_is_not_captured() {
    let c = start();
    let before = c.stats(0).unwrap();
    // Straight to a pod IP on the other node: the server sees the client's own address.
    let out = c.probe("outsider", &["who", &format!("{}:7000", c.pod("echo-1").ip)], T).unwrap();
    assert_eq!(out.trim(), format!("echo-1 {}", c.pod("outsider").ip));
    let after = c.stats(0).unwrap();
    assert_eq!(after["capture"]["captured"], before["capture"]["captured"]);
    assert!(after["capture"]["not_enrolled"].as_u64() > before["capture"]["not_enrolled"].as_u64());

    // The same connect from an enrolled pod is captured: the server sees node-b's proxy.
    let out = c.probe("client", &["who", &format!("{}:7000", c.pod("echo-1").ip)], T).unwrap();
    assert_eq!(out.trim(), "echo-1 10.244.1.1");

    // An enrolled pod connecting to a destination outside the mesh (a pod of a namespace that
    // is not enrolled) is left alone too.
    let before = c.stats(0).unwrap();
    let out = c.probe("client", &["who", &format!("{}:9000", c.pod("outsider").ip)], T).unwrap();
    assert_eq!(out.trim(), format!("outsider {}", c.pod("client").ip));
    let after = c.stats(0).unwrap();
    assert_eq!(after["capture"]["captured"], before["capture"]["captured"]);
    assert_eq!(after["capture"]["passed"].as_u64().unwrap(), before["capture"]["passed"].as_u64().unwrap() + 1);
}

#[test]
fn proxy_upstream_connections_are_not_captured_again() {
    let c = start();
    // The proxy runs in a cgroup under the attach point, like a DaemonSet pod under kubepods:
    // its own connects pass through the capture program and must be skipped.
    let out = c.probe("client", &["who", "10.96.0.12:80", "--count", "5"], T).unwrap();
    assert_eq!(out.lines().count(), 5);
    let stats = c.stats(0).unwrap();
    assert_eq!(stats["capture"]["captured"], 5, "{stats}");
    assert_eq!(stats["capture"]["tracked"], 5, "{stats}");
    assert!(stats["capture"]["proxy_skipped"].as_u64().unwrap() >= 5, "{stats}");
    assert_eq!(stats["proxy"]["outbound_accepted"], 5, "no connection came back to the proxy: {stats}");
    assert_eq!(stats["proxy"]["outbound_no_orig_dst"], 0, "{stats}");
}

#[test]
fn service_without_endpoints_is_refused_promptly() {
    let c = start();
    for addr in ["10.96.0.13:80", "10.96.0.10:81"] {
        let r = json(&c.probe("client", &["connect", addr, "--timeout-ms", "3000"], T).unwrap());
        let result = r["result"].as_str().unwrap();
        assert!(["reset", "refused", "eof"].contains(&result), "{addr}: {r}");
        assert!(r["ms"].as_f64().unwrap() < 500.0, "{addr}: not prompt: {r}");
    }
}

#[test]
fn bad_config_is_reported_and_the_last_good_config_stays_live() {
    let c = start();
    let bad = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: echo\n  namespace: demo\nspec:\n  host: echo\n  trafficPolicy:\n    outlierDetection:\n      interval: ten\n";
    c.write_config_file("policy.yaml", bad).unwrap();

    let out = Command::new(bins::path("mesh-node")).arg("validate").arg(&c.config_dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DestinationRule demo/echo"), "{err}");
    assert!(err.contains("trafficPolicy.outlierDetection.interval"), "{err}");

    // The running proxies saw the bad file, said so, and kept serving with the old config.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.proxy_log(0).contains("outlierDetection.interval") {
        assert!(std::time::Instant::now() < deadline, "proxy never reported the bad file:\n{}", c.proxy_log(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = c.probe("client", &["who", "10.96.0.12:80"], T).unwrap();
    assert!(out.starts_with("local-1 "), "{out}");

    // Fixing the file and adding a Service: the new config goes live.
    let fixed = bad.replace("interval: ten", "interval: 10s");
    let extra = "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: solo2\n  namespace: demo\nspec:\n  clusterIP: 10.96.0.30\n  selector:\n    app: solo\n  ports:\n  - name: tcp\n    port: 8080\n    targetPort: 7100\n";
    c.write_config_file("policy.yaml", &format!("{fixed}{extra}")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = json(&c.probe("client", &["connect", "10.96.0.30:8080", "--timeout-ms", "2000"], T).unwrap());
        if r["result"] == "ok" {
            assert!(r["answer"].as_str().unwrap().starts_with("solo-1 "), "{r}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new Service never went live: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn after_a_clean_exit_nothing_stays_attached() {
    let c = start();
    let echo1 = format!("{}:7000", c.pod("echo-1").ip);
    assert_eq!(c.probe("client", &["who", &echo1], T).unwrap().trim(), "echo-1 10.244.1.1");
    let cgroup = c.node(0).cgroup.to_string_lossy().into_owned();
    let attached = Command::new("bpftool").args(["cgroup", "show", &cgroup]).output().unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).contains("connect4"), "capture should be attached while running");

    let status = c.stop_proxy(0).unwrap();
    assert!(status.success(), "mesh-node exit status {status}:\n{}", c.proxy_log(0));
    let attached = Command::new("bpftool").args(["cgroup", "show", &cgroup]).output().unwrap();
    let listing = String::from_utf8_lossy(&attached.stdout);
    assert!(!listing.contains("connect4") && !listing.contains("sock_ops"), "still attached:\n{listing}");
    // Pods now connect as without the mesh: the server sees the client's own address.
    let out = c.probe("client", &["who", &echo1], T).unwrap();
    assert_eq!(out.trim(), format!("echo-1 {}", c.pod("client").ip));
}

#[test]
fn without_privileges_the_daemon_says_what_is_missing() {
    // The seed's nodes and pods without its policies, which need identities (a CA).
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lemo-dev/cluster.yaml");
    let config = std::env::temp_dir().join(format!("mesh-e2e-noroot-{}", std::process::id()));
    std::fs::create_dir_all(&config).unwrap();
    std::fs::copy(&seed, config.join("cluster.yaml")).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bins::path("mesh-node"))
        // Without a CA the daemon would stop at that first (see attacks.rs).
        .args(["run", "--insecure-plaintext-tunnels", "--node", "node-a", "--cgroup", "/nonexistent", "--admin", "127.0.0.1:0", "--readiness", "127.0.0.1:0"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root"), "{err}");
}
