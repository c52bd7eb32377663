//! End to end: the bypasses a security review found (issue 13), each reproduced as an attack
//! that must fail, next to its allowed control (the legitimate caller still succeeds).
//! Needs root; run through `cargo xtask test`.
//!
//! Sections are separate so they merge apart: each has its own helpers.

// ---- capture escape / plaintext ----
//
// A pod that sets the proxy's SO_MARK (0x539) on its sockets, which CAP_NET_RAW allows, is
// still captured (item 7); a node without a CA does not start unless plaintext is asked for,
// and then its tunnel port serves only other nodes and STRICT or identity-based policy is
// invalid config (item 6).
mod escape {
    use std::{path::Path, process::Command, time::Duration};

    use mesh_e2e::{ClusterSpec, SimCluster, bins, cluster::run_with_timeout, sys::EnterExt as _, wait_until};
    use serde_json::Value;

    const T: Duration = Duration::from_secs(30);
    /// The node proxy's own mark (`mesh_common::PROXY_MARK`).
    const PROXY_MARK: &str = "0x539";

    fn json(s: &str) -> Value {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    /// `mesh-probe connect ADDR` from `pod`, as a process of the pod holding only CAP_NET_RAW
    /// (what a root container keeps from the runtime's default set that matters here) and
    /// marking its socket with the proxy's mark.
    fn connect_marked(c: &SimCluster, pod: &str, addr: &str) -> Value {
        let probe = bins::path("mesh-probe").to_string_lossy().into_owned();
        let caps = "-all,+net_raw";
        let args: [&str; 14] = [
            "--bounding-set",
            caps,
            "--inh-caps",
            caps,
            "--ambient-caps",
            caps,
            "--",
            probe.as_str(),
            "connect",
            addr,
            "--timeout-ms",
            "2000",
            "--mark",
            PROXY_MARK,
        ];
        let out = c.run_in_pod(pod, Path::new("setpriv"), &args, T).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json(&String::from_utf8_lossy(&out.stdout))
    }

    fn connect(c: &SimCluster, pod: &str, addr: &str) -> Value {
        json(&c.probe(pod, &["connect", addr, "--timeout-ms", "2000"], T).unwrap())
    }

    /// The `WHO` answer's caller address (`<server name> <caller ip>`).
    fn caller(answer: &Value) -> String {
        answer["answer"].as_str().unwrap_or_default().split_whitespace().nth(1).unwrap_or_default().to_string()
    }

    fn capture_counter(c: &SimCluster, node: usize, name: &str) -> u64 {
        c.counter(node, "capture", name)
    }

    /// node-a: `client` (may call `server`), `attacker` (may not) and `local`; node-b: `server`,
    /// which only `client`'s identity may call.
    fn mark_cluster() -> SimCluster {
        let spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod("client", "demo", 0, "client", 9000)
            .pod("attacker", "demo", 0, "attacker", 9000)
            .pod("local", "demo", 0, "local", 7200)
            .pod("server", "demo", 1, "server", 7000);
        let c = SimCluster::start(spec).expect("simulated cluster");
        c.start_servers().expect("servers");
        let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-client\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n";
        c.apply_config("authz.yaml", policy).unwrap();
        c
    }

    #[test]
    fn a_pod_setting_the_proxy_mark_is_still_captured() {
        let c = mark_cluster();
        let server = format!("{}:7000", c.pod("server").ip);
        let attacker_ip = c.pod("attacker").ip.to_string();

        // Control: the allowed caller reaches the server through both proxies.
        let r = connect(&c, "client", &server);
        assert_eq!(r["result"], "ok", "{r}");
        assert_ne!(caller(&r), c.pod("client").ip.to_string(), "the server sees node-b's proxy, not the client: {r}");
        // The attacker without the mark: captured, denied by the policy.
        let r = connect(&c, "attacker", &server);
        assert_ne!(r["result"], "ok", "{r}");

        // The attack: the proxy's mark on the socket. Before the fix the capture skipped it and
        // the attacker reached the server directly, from its own address, past the policy.
        let r = connect_marked(&c, "attacker", &server);
        assert_ne!(r["result"], "ok", "a marked socket escaped the capture and the policy: {r}");

        // Where nothing forbids it, the marked connection works, through node-a's proxy: the
        // answering pod sees the proxy as its peer, and the capture counted it.
        let (captured, tracked) = (capture_counter(&c, 0, "captured"), capture_counter(&c, 0, "tracked"));
        let accepted = c.counter(0, "proxy", "outbound_accepted");
        let r = connect_marked(&c, "attacker", &format!("{}:7200", c.pod("local").ip));
        assert_eq!(r["result"], "ok", "the mark was set (CAP_NET_RAW suffices) and the call went through: {r}");
        assert_ne!(caller(&r), attacker_ip, "the local pod saw the attacker itself: not captured: {r}");
        assert_eq!(capture_counter(&c, 0, "captured"), captured + 1);
        assert_eq!(capture_counter(&c, 0, "tracked"), tracked + 1);
        assert_eq!(c.counter(0, "proxy", "outbound_accepted"), accepted + 1);
        // The proxy's own marked connections are still never captured (loop avoidance): every
        // accepted connection had its original destination.
        assert_eq!(c.counter(0, "proxy", "outbound_no_orig_dst"), 0);
        assert!(capture_counter(&c, 0, "proxy_skipped") >= 1, "the proxy's own connects are counted apart");
    }

    /// Two nodes without a CA; `server` on node-b, `client` on node-a, `neighbour` beside the
    /// server, `outsider` outside the mesh on node-a.
    fn plaintext_spec(start_proxies: bool) -> ClusterSpec {
        let mut spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .namespace("plain", false)
            .pod("client", "demo", 0, "client", 9000)
            .pod("outsider", "plain", 0, "outsider", 9000)
            .pod("server", "demo", 1, "server", 7000)
            .pod("neighbour", "demo", 1, "neighbour", 9000);
        spec.mtls = false;
        spec.start_proxies = start_proxies;
        spec
    }

    /// A plaintext HBONE CONNECT from `pod` to node-b's tunnel port, for the server.
    fn h2c_connect(c: &SimCluster, pod: &str) -> Value {
        let tunnel_port = format!("{}:15008", c.node(1).ip);
        let target = format!("{}:7000", c.pod("server").ip);
        json(&c.probe(pod, &["h2c-connect", "--addr", &tunnel_port, "--connect", &target, "--send", "WHO", "--timeout-ms", "3000"], T).unwrap())
    }

    #[test]
    fn without_a_ca_the_daemon_refuses_to_start_unless_plaintext_is_asked_for() {
        let c = SimCluster::start(plaintext_spec(false)).expect("simulated cluster");
        c.start_servers().unwrap();
        let node = c.node(1);
        std::fs::create_dir_all(c.node_bpffs(1)).unwrap();
        // What a DaemonSet missing its CA settings would run: no --ca-address, no flag.
        let mut cmd = Command::new(bins::path("mesh-node"));
        cmd.args(["run", "--node", node.name.as_str(), "--config"])
            .arg(&c.config_dir)
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpf-pin-dir")
            .arg(c.node_bpffs(1).join("mesh"))
            .enter(Some(&node.netns), None)
            .unwrap();
        let out = run_with_timeout(cmd, Duration::from_secs(15)).expect("mesh-node run without a CA must exit, not serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("--insecure-plaintext-tunnels"), "the error names the flag: {stderr}");
        assert!(stderr.contains("refusing to start"), "{stderr}");
        // So nothing serves plaintext tunnels on node-b.
        let r = h2c_connect(&c, "client");
        assert!(r["connect_status"].is_null(), "{r}");

        // Allowed control: asked for by name, plaintext starts (the harness passes the flag
        // when mtls is off) and node-to-node traffic flows.
        c.start_proxy(0).unwrap();
        c.start_proxy(1).unwrap();
        let r = connect(&c, "client", &format!("{}:7000", c.pod("server").ip));
        assert_eq!(r["result"], "ok", "{r}");
    }

    #[test]
    fn plaintext_tunnels_are_served_to_other_nodes_only() {
        let c = SimCluster::start(plaintext_spec(true)).expect("simulated cluster");
        c.start_servers().unwrap();
        let server_ip = c.pod("server").ip.to_string();

        // Control: mesh traffic node-a -> node-b goes through the plaintext tunnel.
        let r = connect(&c, "client", &format!("{server_ip}:7000"));
        assert_eq!(r["result"], "ok", "{r}");
        assert_ne!(caller(&r), c.pod("client").ip.to_string(), "{r}");
        // And a CONNECT from node-a's address, as node-a's proxy sends it, is served.
        let probe = bins::path("mesh-probe");
        let tunnel_port = format!("{}:15008", c.node(1).ip);
        let target = format!("{server_ip}:7000");
        let out = c
            .run_in_netns(&c.node(0).netns, &probe, &["h2c-connect", "--addr", &tunnel_port, "--connect", &target, "--send", "WHO", "--timeout-ms", "3000"], T)
            .unwrap();
        let r = json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(r["connect_status"], 200, "node-to-node: {r}");
        assert!(r["answer"].as_str().unwrap_or_default().starts_with("server "), "{r}");

        // The attack: pods dial the tunnel port themselves, from another node and from the
        // server's own node, in and outside the mesh. Before the fix each got a relay to the
        // server.
        let refused_before = c.counter(1, "proxy", "inbound_not_a_node");
        for pod in ["client", "outsider", "neighbour"] {
            let r = h2c_connect(&c, pod);
            assert!(r["connect_status"].is_null(), "{pod} got a tunnel: {r}");
        }
        assert_eq!(c.counter(1, "proxy", "inbound_not_a_node"), refused_before + 3);
    }

    #[test]
    fn plaintext_nodes_reject_strict_and_identity_rules_as_invalid_config() {
        let c = SimCluster::start(plaintext_spec(true)).expect("simulated cluster");
        c.start_servers().unwrap();
        let server = format!("{}:7000", c.pod("server").ip);
        let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: demo\nspec:\n  mtls:\n    mode: STRICT\n";
        let reloads = c.counter(1, "proxy", "config_reloads");
        c.write_config_file("pa.yaml", strict).unwrap();

        // Reported with object and field, and not applied.
        let expected = "PeerAuthentication demo/strict: mtls.mode: STRICT cannot be enforced without mutual TLS";
        assert!(wait_until(Duration::from_secs(10), || c.proxy_log_plain(1).contains(expected)), "not reported:\n{}", c.proxy_log_plain(1));
        assert_eq!(c.counter(1, "proxy", "config_reloads"), reloads, "the change was rejected");
        let out = Command::new(bins::path("mesh-node")).args(["validate", "--insecure-plaintext-tunnels"]).arg(&c.config_dir).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(expected), "{}", String::from_utf8_lossy(&out.stderr));
        // The same directory is fine for nodes with a CA.
        let out = Command::new(bins::path("mesh-node")).arg("validate").arg(&c.config_dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The last good config (PERMISSIVE) stays live: plaintext from outside the mesh and
        // mesh traffic both still reach the server.
        assert_eq!(connect(&c, "outsider", &server)["result"], "ok");
        assert_eq!(connect(&c, "client", &server)["result"], "ok");

        // A rule on principals cannot be judged without identities either.
        c.write_config_file("pa.yaml", "").unwrap();
        let authz = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-client\n  namespace: demo\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/demo/sa/client\"]\n";
        c.write_config_file("authz.yaml", authz).unwrap();
        let expected = "AuthorizationPolicy demo/only-client: rules[0].from[0].source.principals: cannot be enforced without mutual TLS";
        assert!(wait_until(Duration::from_secs(10), || c.proxy_log_plain(1).contains(expected)), "not reported:\n{}", c.proxy_log_plain(1));
        assert_eq!(connect(&c, "client", &server)["result"], "ok");
    }
}

// ---- fail closed ----
//
// An AuthorizationPolicy with fields the proxy cannot check at L4 (HTTP attributes) used to be
// a validation error: the reload was rejected and a new policy left its workload open. It is
// now applied in its most restrictive reading, as ztunnel does: an ALLOW rule naming an HTTP
// attribute matches nothing, a DENY rule keeps its L4 fields and ignores the rest. (The
// Kubernetes-mode cases, a new policy that cannot be read at all, are unit tests against the
// fake API server: `mesh-node/src/discovery/tests.rs`,
// `new_policies_the_proxy_cannot_apply_in_full_fail_closed`.)

mod fail_closed {
    use std::time::Duration;

    use mesh_e2e::{ClusterSpec, SimCluster};
    use serde_json::Value;

    const FAIL_CLOSED_T: Duration = Duration::from_secs(30);

    /// Two nodes; `server` and `other` on node-b behind their Services; `client` and `intruder`
    /// (service account = app) on node-a, `client-b` and `intruder-b` on node-b.
    fn fail_closed_cluster() -> SimCluster {
        let spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod("server", "demo", 1, "server", 7000)
            .pod("other", "demo", 1, "other", 7000)
            .pod("client", "demo", 0, "client", 9000)
            .pod("intruder", "demo", 0, "intruder", 9000)
            .pod("client-b", "demo", 1, "client", 9000)
            .pod("intruder-b", "demo", 1, "intruder", 9000)
            .service("server", "demo", [10, 96, 0, 80], "server", 80, 7000)
            .service("other", "demo", [10, 96, 0, 81], "other", 80, 7000);
        let c = SimCluster::start(spec).expect("cluster");
        c.start_servers().expect("servers");
        c
    }

    const FAIL_CLOSED_SERVER: &str = "10.96.0.80:80";
    const FAIL_CLOSED_OTHER: &str = "10.96.0.81:80";

    /// Whether `from` reaches the server behind `addr` (its answer names it).
    fn fail_closed_reaches(c: &SimCluster, from: &str, addr: &str, server: &str) -> bool {
        let out = c
            .probe(from, &["connect", addr, "--timeout-ms", "2000"], FAIL_CLOSED_T)
            .unwrap_or_else(|e| panic!("probe from {from}: {e}"));
        let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        let v: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        eprintln!("{from} -> {addr}: {v}");
        v["result"] == "ok" && v["answer"].as_str().unwrap_or("").starts_with(&format!("{server} "))
    }

    fn fail_closed_policy(name: &str, spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{namespace: demo, name: {name}}}\nspec:\n{spec}\n")
    }

    #[test]
    fn fail_closed_an_allow_rule_on_http_paths_only_refuses_every_connection() {
        let c = fail_closed_cluster();
        let c = &c;
        for from in ["client", "client-b"] {
            assert!(fail_closed_reaches(c, from, FAIL_CLOSED_SERVER, "server"), "no policy yet: {from} gets in");
        }
        // On main this reload was rejected (the server stayed open): `apply_config` waits for it.
        let spec = "  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]";
        c.apply_config("authz.yaml", &fail_closed_policy("admin-only", spec)).expect("the policy is applied");
        for from in ["client", "client-b"] {
            assert!(!fail_closed_reaches(c, from, FAIL_CLOSED_SERVER, "server"), "{from} must be refused at L4 (cross node and same node)\nnode-b:\n{}", c.proxy_log_plain(1));
            // The control: a pod the policy does not select still answers.
            assert!(fail_closed_reaches(c, from, FAIL_CLOSED_OTHER, "other"), "{from} -> other must still work");
        }
        // Reported, naming the object and field, where operators look.
        let out = c.meshctl(1, &["check"]).expect("meshctl check");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("AuthorizationPolicy demo/admin-only: rules[0].to[0].operation.paths: not enforceable at L4"),
            "meshctl check reports the warning:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            c.proxy_log_plain(1).contains("applied more restrictively than written: authz.yaml: AuthorizationPolicy demo/admin-only: rules[0].to[0].operation.paths"),
            "the reload logs it"
        );
    }

    #[test]
    fn fail_closed_a_deny_rule_with_http_fields_denies_its_principal_at_l4() {
        let c = fail_closed_cluster();
        let c = &c;
        let spec = "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/intruder]}}]\n    to: [{operation: {methods: [POST], paths: [\"/admin\"]}}]";
        c.apply_config("authz.yaml", &fail_closed_policy("no-admin-post", spec)).expect("the policy is applied");
        // Denied whatever it would have sent; the other caller, and the other pod, unaffected.
        for (from, allowed) in [("intruder", false), ("intruder-b", false), ("client", true), ("client-b", true)] {
            assert_eq!(fail_closed_reaches(c, from, FAIL_CLOSED_SERVER, "server"), allowed, "{from}\nnode-b:\n{}", c.proxy_log_plain(1));
        }
        assert!(fail_closed_reaches(c, "intruder", FAIL_CLOSED_OTHER, "other"), "the policy selects only the server");
    }

    /// A node proxy does not serve (no listeners, no capture, no readiness) before it has loaded a
    /// complete config: a successor started while the config directory holds a policy that cannot
    /// be read exits without taking over, and the running proxy keeps enforcing its last good
    /// config. (Kubernetes mode waits for the first full sync the same way, see
    /// `discovery::tests::not_ready_until_every_kind_is_listed`.)
    #[test]
    fn fail_closed_a_proxy_never_starts_serving_an_incomplete_config() {
        let c = fail_closed_cluster();
        let c = &c;
        let allow = "  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]";
        c.apply_config("authz.yaml", &fail_closed_policy("client-only", allow)).expect("applied");
        let broken = "  selector: {matchLabels: {app: other}}\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]";
        c.write_config_file("broken.yaml", &fail_closed_policy("broken", broken)).expect("written");
        let mut successor = c.spawn_successor(1, &[]).expect("successor spawned");
        let status = successor.wait_timeout(FAIL_CLOSED_T).expect("the successor exits");
        assert!(!status.success(), "a proxy must not run on an incomplete config");
        // Its fatal error (`mesh-node: config DIR:` and the problems): the running proxy's watcher
        // logs the same problem, but never this line.
        let log = c.proxy_log_plain(1);
        let fatal = log.find("mesh-node: config ").unwrap_or_else(|| panic!("the successor says why it stops:\n{log}"));
        assert!(log[fatal..].contains("AuthorizationPolicy demo/broken: rules[0].from[0].source.ipBlocks[0]"), "{log}");
        // The running proxy still enforces its last good config.
        assert!(fail_closed_reaches(c, "client", FAIL_CLOSED_SERVER, "server"));
        assert!(!fail_closed_reaches(c, "intruder", FAIL_CLOSED_SERVER, "server"));
    }
}
