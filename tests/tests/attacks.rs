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

// ---- ipBlocks source / open connections ----
//
// `ipBlocks` judge the real calling pod, also across nodes (the address the tunnel carries,
// believed only for the verified identity's pods on the source node), and a policy change
// reaches connections already open: pooled HTTP connections and L4 pipes the new policy denies
// are closed within a second, and counted.
mod ipblocks_source_and_open_connections {
    use std::{
        io::{BufRead as _, BufReader},
        path::{Path, PathBuf},
        process::Child,
        sync::mpsc,
        time::{Duration, Instant, SystemTime, UNIX_EPOCH},
    };

    use mesh_e2e::{ClusterSpec, SimCluster, bins, wait_until};
    use serde_json::Value;

    const T: Duration = Duration::from_secs(30);
    const SERVER_VIP: &str = "10.96.0.80:80";

    fn json(out: &str) -> Value {
        let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    fn logs(c: &SimCluster) -> String {
        format!("node-a log:\n{}\nnode-b log:\n{}", c.proxy_log_plain(0), c.proxy_log_plain(1))
    }

    /// One `connect` attempt (WHO) from a pod.
    fn who(c: &SimCluster, from: &str, addr: &str) -> Value {
        let out = c.probe(from, &["connect", addr, "--timeout-ms", "2000"], T).unwrap_or_else(|e| panic!("{e}\n{}", logs(c)));
        json(&out)
    }

    fn reached(v: &Value) -> bool {
        v["result"] == "ok" && v["answer"].as_str().unwrap_or("").starts_with("server ")
    }

    fn policy(name: &str, action: &str, source: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  rules:\n  - from:\n    - source: {source}\n"
        )
    }

    /// `server` on node-b behind Service `server` (10.96.0.80:80 -> 7000); the callers are
    /// ServiceAccount `client`: `client` on node-a (10.244.0.0/24), `client-b` on node-b.
    fn cluster() -> SimCluster {
        let spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod("server", "demo", 1, "server", 7000)
            .pod("client", "demo", 0, "client", 9000)
            .pod("client-b", "demo", 1, "client", 9000)
            .service_account("client-b", "client")
            .service("server", "demo", [10, 96, 0, 80], "server", 80, 7000);
        let c = SimCluster::start(spec).expect("simulated cluster");
        c.serve_in_pod("server", &bins::path("mesh-probe"), &["serve", "--name", "server", "--port", "7000"], 7000).expect("server");
        c
    }

    #[test]
    fn ip_blocks_deny_on_a_pod_cidr_refuses_callers_on_the_other_node() {
        let c = cluster();
        let c = &c;
        for from in ["client", "client-b"] {
            assert!(reached(&who(c, from, SERVER_VIP)), "{from} reaches the server without a policy\n{}", logs(c));
        }
        let denied_before = c.counter(1, "proxy", "inbound_denied");
        // node-a's pod CIDR: the caller on node-a must be refused by node-b's inbound side.
        c.apply_config("authz.yaml", &policy("deny-node-a-pods", "DENY", "{ipBlocks: [10.244.0.0/24]}")).unwrap();
        let v = who(c, "client", SERVER_VIP);
        assert!(!reached(&v), "client on node-a (10.244.0.0/24) got through the DENY: {v}\n{}", logs(c));
        // Allowed control: the same identity from node-b's CIDR.
        let v = who(c, "client-b", SERVER_VIP);
        assert!(reached(&v), "client-b (10.244.1.0/24) is outside the DENY: {v}\n{}", logs(c));
        assert!(wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_denied") > denied_before), "node-b counts the refusal");
        let client_ip = c.pod("client").ip.to_string();
        let log = c.proxy_log_plain(1);
        assert!(
            log.lines().any(|l| l.contains("authorization:") && l.contains("deny-node-a-pods") && l.contains(&format!("source={client_ip}"))),
            "node-b judged the real caller {client_ip}:\n{log}"
        );
        assert_eq!(c.counter(1, "proxy", "inbound_forwarded_unverified"), 0, "honest tunnels check out\n{log}");

        // A policy that does not match the caller leaves it alone.
        c.apply_config("authz.yaml", &policy("deny-elsewhere", "DENY", "{ipBlocks: [10.244.9.0/24]}")).unwrap();
        let v = who(c, "client", SERVER_VIP);
        assert!(reached(&v), "a DENY on another CIDR does not refuse client: {v}\n{}", logs(c));
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("UTF-8 path")
    }

    /// A certificate for demo/client signed by the mesh's root: what a compromised node proxy
    /// (or anyone holding that identity's key) can present.
    fn client_certificate(c: &SimCluster) -> (PathBuf, PathBuf) {
        let dir = c.ca_dir.parent().expect("cluster dir").join("attack-certs");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let (cert, key) = (dir.join("client.pem"), dir.join("client-key.pem"));
        let (root, root_key) = (c.ca_root_cert(), c.ca_dir.join("state/root-key.pem"));
        let args = [
            "mkcert",
            "--spiffe",
            "spiffe://cluster.local/ns/demo/sa/client",
            "--cert-out",
            s(&cert),
            "--key-out",
            s(&key),
            "--ca-cert",
            s(&root),
            "--ca-key",
            s(&root_key),
        ];
        let out = std::process::Command::new(bins::path("mesh-probe")).args(args).output().expect("mkcert");
        assert!(out.status.success(), "mkcert: {}", String::from_utf8_lossy(&out.stderr));
        (cert, key)
    }

    /// A tunnel to the server pod from node `from`'s namespace (so from that node's InternalIP)
    /// as `client`, claiming `forwarded` as the source; the CONNECT status and the pod's answer.
    fn tunnel(c: &SimCluster, from: usize, cert: &(PathBuf, PathBuf), forwarded: &str) -> Value {
        let addr = format!("{}:15008", c.node(1).ip);
        let target = format!("{}:7000", c.pod("server").ip);
        let args = [
            "tls-connect", "--addr", &addr, "--sni", "server.demo.identity.mesh", "--cert-pem", s(&cert.0), "--key-pem", s(&cert.1),
            "--connect", &target, "--send", "WHO", "--forwarded", forwarded,
        ];
        let out = c.run_in_netns(&c.node(from).netns, &bins::path("mesh-probe"), &args, T).expect("tls-connect");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "tls-connect: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        json(&stdout)
    }

    #[test]
    fn a_forged_forwarded_source_is_not_believed() {
        let c = cluster();
        let c = &c;
        let cert = client_certificate(c);
        let (client_a, client_b) = (c.pod("client").ip, c.pod("client-b").ip);
        let claim = |ip: std::net::Ipv4Addr| format!("for={ip}");

        // Only node-b's pods may call the server.
        c.apply_config("authz.yaml", &policy("allow-node-b-pods", "ALLOW", "{ipBlocks: [10.244.1.0/24]}")).unwrap();
        // Allowed control: node-b speaking for its own pod of that identity.
        let v = tunnel(c, 1, &cert, &claim(client_b));
        assert_eq!(v["connect_status"], 200, "node-b's tunnel for client-b is believed: {v}\n{}", logs(c));
        assert!(v["answer"].as_str().unwrap_or("").starts_with("server "), "{v}");
        assert!(reached(&who(c, "client-b", SERVER_VIP)), "the real client-b gets through\n{}", logs(c));
        assert!(!reached(&who(c, "client", SERVER_VIP)), "the real client on node-a does not\n{}", logs(c));

        // The attack: from node-a, with a valid certificate of the identity, claiming to be
        // client-b (a pod of that identity, but on node-b).
        let unverified_before = c.counter(1, "proxy", "inbound_forwarded_unverified");
        let v = tunnel(c, 0, &cert, &claim(client_b));
        assert_eq!(v["connect_status"], 403, "a node-a tunnel cannot speak for node-b's pod: {v}\n{}", logs(c));
        assert!(v.get("answer").is_none(), "{v}");
        assert!(
            wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_forwarded_unverified") > unverified_before),
            "node-b counts the claim it did not believe"
        );
        assert!(c.proxy_log_plain(1).contains("not on the source node node-a"), "node-b says why:\n{}", c.proxy_log_plain(1));

        // Under a DENY on node-a's pods, an unbelieved claim is judged fail-closed: node-a's
        // proxy address (outside the CIDR) must not stand in for the caller.
        c.apply_config("authz.yaml", &policy("deny-node-a-pods", "DENY", "{ipBlocks: [10.244.0.0/24]}")).unwrap();
        let v = tunnel(c, 0, &cert, &claim(client_b));
        assert_eq!(v["connect_status"], 403, "the forged claim escapes the DENY: {v}\n{}", logs(c));
        // And the honest claim from node-a is denied as it should be, from node-b allowed.
        assert_eq!(tunnel(c, 0, &cert, &claim(client_a))["connect_status"], 403);
        let v = tunnel(c, 1, &cert, &claim(client_b));
        assert_eq!(v["connect_status"], 200, "allowed control under the DENY: {v}\n{}", logs(c));
    }

    pub(super) fn now_ms() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }

    /// `mesh-probe hold` in a pod: one connection used every 200 ms for 8 s, never reopened.
    pub(super) struct Hold {
        pub(super) what: String,
        child: Child,
        lines: mpsc::Receiver<Value>,
        seen: Vec<Value>,
    }

    impl Hold {
        pub(super) fn start(c: &SimCluster, pod: &str, mode: &str, addr: &str) -> Hold {
            let args = ["hold", mode, addr, "--count", "40", "--interval-ms", "200", "--timeout-ms", "1500"];
            let mut child = c.spawn_piped(pod, &bins::path("mesh-probe"), &args).expect("hold");
            let out = child.stdout.take().expect("piped stdout");
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        let _ = tx.send(v);
                    }
                }
            });
            Hold { what: format!("{pod} {mode}"), child, lines, seen: Vec::new() }
        }

        /// Waits for the first use; it must have worked.
        pub(super) fn first_ok(&mut self) {
            let v = self.lines.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| panic!("{}: no first use: {e}", self.what));
            assert_eq!(v["result"], "ok", "{}: the connection works before the policy: {v}", self.what);
            self.seen.push(v);
        }

        /// Every use, once the probe is done.
        pub(super) fn finish(mut self) -> Vec<Value> {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match self.lines.recv_timeout(Duration::from_millis(500)) {
                    Ok(v) => self.seen.push(v),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
            std::mem::take(&mut self.seen)
        }
    }

    impl Drop for Hold {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_new_deny_closes_open_connections_within_a_second() {
        let spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
            .pod("echo", "demo", 1, "echo", 7000)
            .pod("client", "demo", 0, "client", 9000)
            .pod("client-b", "demo", 1, "client", 9000)
            .service_account("client-b", "client")
            .pod("friend", "demo", 0, "friend", 9000)
            .service_named("web", "demo", [10, 96, 0, 81], "web", "http", 80, 8080)
            .service("echo", "demo", [10, 96, 0, 82], "echo", 7000, 7000);
        let c = SimCluster::start(spec).expect("simulated cluster");
        let c = &c;
        let probe = bins::path("mesh-probe");
        c.serve_in_pod("web", &probe, &["http-serve", "--name", "web", "--port", "8080"], 8080).unwrap();
        c.serve_in_pod("echo", &probe, &["serve", "--name", "echo", "--port", "7000"], 7000).unwrap();

        // Denied: `client` across nodes (tunnel streams) and `client-b` on the servers' node
        // (direct connections), over a pooled HTTP connection and an L4 pipe each. Allowed
        // control: `friend`, not covered by the DENY.
        let denied = [("client", "http"), ("client", "tcp"), ("client-b", "http"), ("client-b", "tcp")];
        let allowed = [("friend", "http"), ("friend", "tcp")];
        let addr = |mode: &str| if mode == "http" { "10.96.0.81:80" } else { "10.96.0.82:7000" };
        let mut holds: Vec<(Hold, bool)> = denied
            .iter()
            .map(|(p, m)| (Hold::start(c, p, m, addr(m)), true))
            .chain(allowed.iter().map(|(p, m)| (Hold::start(c, p, m, addr(m)), false)))
            .collect();
        for (h, _) in &mut holds {
            h.first_ok();
        }
        let closed_before = c.counter(1, "proxy", "policy_closed_connections");
        let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-client, namespace: demo}\n\
                    spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]}\n";
        c.apply_config("authz.yaml", deny).unwrap();
        let applied = now_ms();

        for (h, is_denied) in holds {
            let what = h.what.clone();
            let uses = h.finish();
            let after: Vec<&Value> = uses.iter().filter(|v| v["at_ms"].as_u64().unwrap_or(0) >= applied + 1000).collect();
            assert!(after.len() >= 3, "{what}: the probe kept using its connection after the policy: {uses:?}");
            if is_denied {
                let through: Vec<&&Value> = after.iter().filter(|v| v["result"] == "ok").collect();
                assert!(through.is_empty(), "{what}: the open connection still works 1 s after the DENY: {through:?}\n{}", logs(c));
            } else {
                let failed: Vec<&Value> = uses.iter().filter(|v| v["result"] != "ok").collect();
                assert!(failed.is_empty(), "{what}: the allowed caller lost its connection: {failed:?}\n{}", logs(c));
            }
            eprintln!("{what}: {} uses, last {}", uses.len(), uses.last().map(|v| v.to_string()).unwrap_or_default());
        }
        // One per connection node-b closed: the two tunnel streams, the two direct connections.
        let closed = c.counter(1, "proxy", "policy_closed_connections") - closed_before;
        assert!(closed >= 4, "node-b counts the connections it closed: {closed}\n{}", logs(c));
        let out = c.meshctl(1, &["stats"]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("policy_closed_connections"), "meshctl stats shows the counter");
    }
}

// ---- inbound enforcement / STRICT without holes ----
//
// Every connection attempt to a mesh pod is judged, however it arrives (item 1): a plaintext
// caller from outside the mesh meets the pod's AuthorizationPolicies as a peer without identity,
// with its real source address. STRICT exempts nothing but the node proxy's own connections and
// the kubelet's probes of the ports the Pod spec declares (item 2): not a host process on the
// node (hostNetwork pods, anything SNATed to the node), not IPv6.
mod inbound {
    use std::time::Duration;

    use mesh_e2e::{ClusterSpec, SimCluster, bins};
    use serde_json::Value;

    const T: Duration = Duration::from_secs(30);
    /// Long enough for an answer on this machine, short enough for a dropped SYN (the kernel
    /// retries after 1 s) to be seen as one.
    const CONNECT_MS: &str = "1500";

    fn json(s: &str) -> Value {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    fn connect(c: &SimCluster, pod: &str, addr: &str) -> Value {
        json(&c.probe(pod, &["connect", addr, "--timeout-ms", CONNECT_MS], T).unwrap())
    }

    fn connect_from_node(c: &SimCluster, node: usize, addr: &str) -> Value {
        let out = c.run_in_netns(&c.node(node).netns, &bins::path("mesh-probe"), &["connect", addr, "--timeout-ms", CONNECT_MS], T).unwrap();
        json(&String::from_utf8_lossy(&out.stdout))
    }

    fn connect_as_kubelet(c: &SimCluster, node: usize, addr: &str) -> Value {
        let out = c.run_as_kubelet(node, &bins::path("mesh-probe"), &["connect", addr, "--timeout-ms", CONNECT_MS], T).unwrap();
        json(&String::from_utf8_lossy(&out.stdout))
    }

    fn ok(r: &Value) -> bool {
        r["result"] == "ok"
    }

    fn apply(c: &SimCluster, name: &str, yaml: &str) {
        c.apply_config(name, yaml).unwrap();
    }

    /// `mesh` (enrolled): bff on node-a, recall on node-b (7000, and 7100 where its kubelet
    /// probe is declared); `legacy` (not enrolled): `outsider` on node-a, `neighbour` on node-b.
    fn cluster() -> SimCluster {
        let spec = ClusterSpec::new(2)
            .namespace("mesh", true)
            .namespace("legacy", false)
            .pod("bff", "mesh", 0, "bff", 9000)
            .pod("recall", "mesh", 1, "recall", 7000)
            .extra_port("recall", "health", 7100)
            .probe("recall", 7100)
            .pod("rank", "mesh", 1, "rank", 7200)
            .pod("outsider", "legacy", 0, "outsider", 9100)
            .pod("neighbour", "legacy", 1, "neighbour", 9200);
        let c = SimCluster::start(spec).expect("simulated cluster");
        c.start_servers().expect("servers");
        c
    }

    /// The plaintext connections node-b's metrics report for recall, by `connection_security_policy="none"`
    /// from an unknown source.
    fn plaintext_opened(c: &SimCluster) -> u64 {
        let metrics = c.metrics(1).unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .filter(|l| l.contains("reporter=\"destination\"") && l.contains("destination_workload=\"recall\"") && l.contains("source_workload=\"unknown\"") && l.contains("connection_security_policy=\"none\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn denied_metric(c: &SimCluster, reason: &str) -> u64 {
        let metrics = c.metrics(1).unwrap();
        metrics
            .lines()
            .filter(|l| l.starts_with("mesh_inbound_plaintext_denied_total{") && l.contains("destination_workload=\"recall\"") && l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    const ONLY_BFF: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-bff, namespace: mesh}
spec:
  selector: {matchLabels: {app: recall}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/mesh/sa/bff]}}]
";

    #[test]
    fn a_plaintext_caller_from_outside_the_mesh_meets_allow_principals() {
        let c = cluster();
        let recall = format!("{}:7000", c.pod("recall").ip);
        // Before any policy: PERMISSIVE lets plaintext in, and it is counted.
        assert!(ok(&connect(&c, "outsider", &recall)), "no policy yet");

        apply(&c, "only-bff.yaml", ONLY_BFF);
        // Control: bff, through the mesh with its identity.
        let r = connect(&c, "bff", &recall);
        assert!(ok(&r), "bff is allowed: {r}");
        // The attack: straight at the pod IP from outside the mesh, from the other node and from
        // recall's own node. Before the fix both were answered: no proxy saw them.
        let denied = c.counter(1, "capture", "authz_denied");
        let r = connect(&c, "outsider", &recall);
        assert!(!ok(&r), "a caller without identity passed ALLOW principals: {r}");
        let r = connect(&c, "neighbour", &recall);
        assert!(!ok(&r), "a same-node caller without identity passed ALLOW principals: {r}");
        assert!(c.counter(1, "capture", "authz_denied") >= denied + 2, "refusals counted");
        assert!(mesh_e2e::wait_until(Duration::from_secs(5), || denied_metric(&c, "authz") >= 2), "refusals reported per workload");

        // Its real source address is what a rule sees: an ipBlocks rule for the outsider
        // admits it, and only it.
        let by_ip = format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: outsider-ip, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: recall}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: [{}/32]}}}}]
    to: [{{operation: {{ports: ['7000']}}}}]
",
            c.pod("outsider").ip
        );
        apply(&c, "outsider-ip.yaml", &by_ip);
        let opened = plaintext_opened(&c);
        let r = connect(&c, "outsider", &recall);
        assert!(ok(&r), "the outsider's address is allowed on 7000: {r}");
        assert!(!ok(&connect(&c, "outsider", &format!("{}:7100", c.pod("recall").ip))), "but only on 7000");
        assert!(!ok(&connect(&c, "neighbour", &recall)), "the neighbour's address is not allowed");
        assert!(ok(&connect(&c, "bff", &recall)), "bff still is");
        assert!(mesh_e2e::wait_until(Duration::from_secs(5), || plaintext_opened(&c) > opened), "the allowed plaintext connection is reported");
    }

    /// Item 5 for connections no proxy carries: an open plaintext connection the pod's policy
    /// allowed is cut within a second of a policy that denies it (its packets are dropped).
    #[test]
    fn an_open_plaintext_connection_is_cut_when_a_policy_denies_it() {
        use super::ipblocks_source_and_open_connections::{Hold, now_ms};
        let c = cluster();
        let recall = format!("{}:7000", c.pod("recall").ip);
        let rank = format!("{}:7200", c.pod("rank").ip);
        let mut denied = [Hold::start(&c, "outsider", "tcp", &recall), Hold::start(&c, "neighbour", "tcp", &recall)];
        // Control: the same kind of caller to a pod the new policy does not select.
        let mut allowed = Hold::start(&c, "outsider", "tcp", &rank);
        for h in denied.iter_mut().chain([&mut allowed]) {
            h.first_ok();
        }
        let cut = c.counter(1, "proxy", "policy_closed_connections");
        apply(&c, "only-bff.yaml", ONLY_BFF);
        let applied = now_ms();
        for h in denied {
            let what = h.what.clone();
            let uses = h.finish();
            let after: Vec<&Value> = uses.iter().filter(|v| v["at_ms"].as_u64().unwrap_or(0) >= applied + 1000).collect();
            assert!(!after.is_empty(), "{what}: the probe kept trying after the policy: {uses:?}");
            assert!(after.iter().all(|v| v["result"] != "ok"), "{what}: the open plaintext connection still works 1 s after the policy: {after:?}");
        }
        let uses = allowed.finish();
        assert!(uses.iter().all(|v| v["result"] == "ok"), "the control lost its connection: {uses:?}");
        assert!(c.counter(1, "proxy", "policy_closed_connections") >= cut + 2, "both cut connections counted");
        assert!(c.counter(1, "capture", "revoked_drops") > 0, "their packets were dropped");
        // New ones are refused at the SYN as before, and bff still gets through.
        assert!(!ok(&connect(&c, "outsider", &recall)));
        assert!(ok(&connect(&c, "bff", &recall)));
    }

    #[test]
    fn strict_refuses_host_processes_and_ipv6_and_lets_only_declared_probes_through() {
        let c = cluster();
        let recall = c.pod("recall");
        let (app, health) = (format!("{}:7000", recall.ip), format!("{}:7100", recall.ip));
        let app6 = format!("[{}]:7000", recall.ip6);
        // Before STRICT the node and IPv6 reach the pod: the paths work.
        assert!(ok(&connect_from_node(&c, 1, &app)), "node -> pod works");
        assert!(ok(&connect_from_node(&c, 1, &app6)), "node -> pod over IPv6 works");

        apply(&c, "strict.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n");
        assert!(mesh_e2e::wait_until(Duration::from_secs(5), || !ok(&connect_from_node(&c, 1, &app))), "STRICT applies");
        // Control: the mesh caller, through both proxies (node-b's proxy is trusted by its cgroup).
        let r = connect(&c, "bff", &app);
        assert!(ok(&r), "bff through the mesh: {r}");
        // The attacks. A process on recall's node (a hostNetwork pod), from the node's address:
        // before the fix every packet from a node address was exempt.
        let strict = c.counter(1, "capture", "strict_denied");
        assert!(!ok(&connect_from_node(&c, 1, &app)), "a host process reached a STRICT pod in plaintext");
        assert!(!ok(&connect_from_node(&c, 1, &health)), "a host process is no kubelet, even on the probe port");
        // IPv6, which the STRICT program never looked at.
        let r = connect_from_node(&c, 1, &app6);
        assert!(!ok(&r), "IPv6 reached a STRICT pod in plaintext: {r}");
        // Plaintext from outside the mesh, same node and other node.
        assert!(!ok(&connect(&c, "neighbour", &app)), "a same-node pod outside the mesh");
        assert!(!ok(&connect(&c, "outsider", &app)), "another node's pod outside the mesh");
        assert!(c.counter(1, "capture", "strict_denied") >= strict + 5, "each refusal counted");
        // The kubelet: its probe of the declared port passes; anything else it tries does not.
        let probes = c.counter(1, "capture", "probes");
        let r = connect_as_kubelet(&c, 1, &health);
        assert!(ok(&r), "the kubelet's probe of the declared port: {r}");
        assert!(c.counter(1, "capture", "probes") > probes);
        assert!(!ok(&connect_as_kubelet(&c, 1, &app)), "the kubelet on an undeclared port");
        // The other node's kubelet is a plain node process here.
        assert!(!ok(&connect_as_kubelet(&c, 0, &health)), "another node's kubelet");
        // IPv6 still works for pods outside the mesh.
        assert!(ok(&connect_from_node(&c, 1, &format!("[{}]:9200", c.pod("neighbour").ip6))), "IPv6 to a pod outside the mesh");
    }
}

// ---- the seed's policies, for every kind of caller ----
mod seed_policies {
    use std::time::Duration;

    use mesh_e2e::{ClusterSpec, SimCluster, bins};
    use serde_json::Value;

    const T: Duration = Duration::from_secs(30);

    fn seed(file: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lemo-dev").join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn ok(out: &str) -> bool {
        serde_json::from_str::<Value>(out.trim()).map(|v| v["result"] == "ok").unwrap_or(false)
    }

    /// deploy/examples/lemo-dev's PeerAuthentication (STRICT in lemo-dev) and AuthorizationPolicy
    /// (recall answers only bff's identity), applied unchanged, as its comments promise: "any
    /// other caller (or a plaintext client outside the mesh) is refused".
    #[test]
    fn recall_answers_bff_only_whoever_else_calls() {
        let spec = ClusterSpec::new(2)
            .namespace("lemo-dev", true)
            .namespace("legacy", false)
            .pod("bff", "lemo-dev", 0, "bff", 8080)
            .pod("rank", "lemo-dev", 0, "rank", 8082)
            .pod("recall", "lemo-dev", 1, "recall", 8081)
            .extra_port("recall", "health", 8091)
            .probe("recall", 8091)
            .pod("outsider", "legacy", 0, "outsider", 9100);
        let c = SimCluster::start(spec).expect("simulated cluster");
        c.start_servers().expect("servers");
        c.apply_config("peer-authentication.yaml", &seed("peer-authentication.yaml")).unwrap();
        c.apply_config("authorization-policy.yaml", &seed("authorization-policy.yaml")).unwrap();
        let recall = format!("{}:8081", c.pod("recall").ip);
        let connect = |pod: &str, addr: &str| c.probe(pod, &["connect", addr, "--timeout-ms", "1500"], T).unwrap();
        let probe = bins::path("mesh-probe");
        let from_node = |i: usize, addr: &str| String::from_utf8_lossy(&c.run_in_netns(&c.node(i).netns, &probe, &["connect", addr, "--timeout-ms", "1500"], T).unwrap().stdout).into_owned();
        let kubelet = |i: usize, addr: &str| String::from_utf8_lossy(&c.run_as_kubelet(i, &probe, &["connect", addr, "--timeout-ms", "1500"], T).unwrap().stdout).into_owned();

        assert!(ok(&connect("bff", &recall)), "bff, mTLS with its identity");
        assert!(!ok(&connect("rank", &recall)), "rank: in the mesh, not bff");
        assert!(!ok(&connect("outsider", &recall)), "plaintext from outside the mesh");
        assert!(!ok(&from_node(1, &recall)), "a process on recall's node");
        assert!(!ok(&from_node(0, &recall)), "a process on the other node");
        assert!(ok(&kubelet(1, &format!("{}:8091", c.pod("recall").ip))), "the kubelet's declared probe");
        // STRICT alone (no AuthorizationPolicy on rank): every mesh caller, no plaintext one.
        let rank = format!("{}:8082", c.pod("rank").ip);
        assert!(ok(&connect("bff", &rank)), "bff -> rank through the mesh");
        assert!(!ok(&connect("outsider", &rank)), "plaintext to rank");
    }
}

// ---- budgets (issue 16) ----
mod budgets {
    use std::time::Duration;

    use mesh_e2e::{ClusterSpec, SimCluster};
    use serde_json::Value;

    use super::ipblocks_source_and_open_connections::Hold;

    /// One pod cannot take a node proxy's whole outbound listener: past its per-source cap its
    /// connections are refused at once (and counted) while another pod's still work, and a
    /// place freed is usable again.
    #[test]
    fn a_pod_over_its_connection_cap_is_refused_and_others_are_not() {
        let mut spec = ClusterSpec::new(2)
            .namespace("demo", true)
            .pod("greedy", "demo", 0, "greedy", 9000)
            .pod("polite", "demo", 0, "polite", 9000)
            .pod("echo", "demo", 1, "echo", 7000)
            .service("echo", "demo", [10, 96, 0, 90], "echo", 7000, 7000);
        spec.start_proxies = false;
        let c = SimCluster::start(spec).expect("simulated cluster");
        for i in 0..2 {
            c.start_proxy_with(i, &["--max-connections-per-source", "4"]).expect("proxy");
        }
        c.start_servers().expect("servers");
        let vip = "10.96.0.90:7000";
        let mut held: Vec<Hold> = (0..4).map(|_| Hold::start(&c, "greedy", "tcp", vip)).collect();
        for h in &mut held {
            h.first_ok();
        }
        let over = c.counter(0, "proxy", "outbound_over_cap");
        let connect = |pod: &str| -> Value {
            serde_json::from_str(c.probe(pod, &["connect", vip, "--timeout-ms", "2000"], Duration::from_secs(10)).unwrap().trim()).unwrap()
        };
        let r = connect("greedy");
        assert_ne!(r["result"], "ok", "a fifth connection from the same pod was served: {r}");
        assert_eq!(c.counter(0, "proxy", "outbound_over_cap"), over + 1, "the refusal is counted");
        let r = connect("polite");
        assert_eq!(r["result"], "ok", "another pod is not affected: {r}");
        drop(held.pop());
        let served = mesh_e2e::wait_until(Duration::from_secs(5), || connect("greedy")["result"] == "ok");
        assert!(served, "a freed place is usable again");
    }
}
