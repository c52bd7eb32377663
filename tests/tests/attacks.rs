//! End to end: the ways around the mesh's security that issue 13 lists, each reproduced
//! against a simulated cluster, with its allowed control. Sections belong to their topics;
//! helpers are local to a section or prefixed with it. Needs root; run through
//! `cargo xtask test`.

// ---- fail closed ----
//
// An AuthorizationPolicy with fields the proxy cannot check at L4 (HTTP attributes) used to be
// a validation error: the reload was rejected and a new policy left its workload open. It is
// now applied in its most restrictive reading, as ztunnel does: an ALLOW rule naming an HTTP
// attribute matches nothing, a DENY rule keeps its L4 fields and ignores the rest. (The
// Kubernetes-mode cases, a new policy that cannot be read at all, are unit tests against the
// fake API server: `mesh-node/src/discovery/tests.rs`,
// `new_policies_the_proxy_cannot_apply_in_full_fail_closed`.)

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
