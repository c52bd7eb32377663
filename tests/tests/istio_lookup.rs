//! End to end: which Istio rule applies, as Istio decides it, from the client's namespace.
//! A tenant namespace's VirtualService for another namespace's host takes no traffic it is not
//! exported to; conflicting VirtualServices resolve to the oldest; a DestinationRule in the
//! client's namespace wins over the Service's. Also fields that act (useClientProtocol: true,
//! PeerAuthentication DISABLE) and kinds the mesh does not apply (`mesh-node validate
//! --strict`, `meshctl check`). Needs root; run through `cargo xtask test`.
use std::{collections::BTreeMap, time::Duration};

use mesh_e2e::{
    ClusterSpec, SimCluster, bins,
    report::{self, by_pod, status_count},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const RECALL: &str = "10.96.0.50";
const HOST: &str = "recall.lemo-dev.svc.cluster.local";

/// `recall` (v1 on node-b, v2 on node-a) in lemo-dev; the tenant's `evil` in aaa; one client
/// pod in aaa and one in bff, both on node-a; an `outsider` pod outside the mesh.
fn start() -> SimCluster {
    let spec = ClusterSpec::new(2)
        .namespace("lemo-dev", true)
        .namespace("aaa", true)
        .namespace("bff", true)
        .namespace("plain", false)
        .pod("client-aaa", "aaa", 0, "client-aaa", 9000)
        .pod("client-bff", "bff", 0, "client-bff", 9000)
        .pod("outsider", "plain", 0, "outsider", 9000)
        .pod_labelled("recall-v1", "lemo-dev", 1, "recall", &[("version", "v1")], "http", 8080)
        .pod_labelled("recall-v2", "lemo-dev", 0, "recall", &[("version", "v2")], "http", 8080)
        .pod_labelled("evil", "aaa", 1, "evil", &[], "http", 8080)
        .service_named("recall", "lemo-dev", [10, 96, 0, 50], "recall", "http", 80, 8080)
        .service_named("evil", "aaa", [10, 96, 0, 51], "evil", "http", 80, 8080);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    for name in ["recall-v1", "recall-v2", "evil"] {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080"], 8080).expect("http server");
    }
    c
}

/// `count` requests from `client` to recall's VIP: answers per pod (all must be 200).
fn ask(c: &SimCluster, client: &str, count: u32) -> BTreeMap<String, u64> {
    let n = count.to_string();
    let v = report::http(c, client, &format!("http://{RECALL}/"), &["--count", &n, "--conns", "2"], T);
    assert_eq!(status_count(&v, "200"), u64::from(count), "{client}: {v}");
    by_pod(&v)
}

fn only(pods: &BTreeMap<String, u64>, pod: &str) -> bool {
    pods.len() == 1 && pods.contains_key(pod)
}

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: recall}
spec:
  host: recall
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
";

/// The tenant's VirtualService in aaa, sending recall's traffic to its own `evil` Service.
fn hijack(export_to: &str, created: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{namespace: aaa, name: hijack, creationTimestamp: \"{created}\"}}
spec:
  hosts: [{HOST}]
{export_to}  http:
  - route:
    - destination: {{host: evil.aaa.svc.cluster.local}}
---
"
    )
}

/// The recall team's VirtualService: everything to v1.
fn owner(created: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{namespace: lemo-dev, name: recall, creationTimestamp: \"{created}\"}}
spec:
  hosts: [recall]
  http:
  - route:
    - destination: {{host: recall, subset: v1}}
---
"
    )
}

#[test]
fn tenant_virtual_service_needs_export_to_and_conflicts_resolve_to_the_oldest() {
    let c = start();
    // Exported only to its own namespace: it routes aaa's clients, nobody else's.
    c.apply_config("policy.yaml", &[DR, &hijack("  exportTo: [\".\"]\n", "2026-03-01T00:00:00Z")].concat()).unwrap();
    let bff = ask(&c, "client-bff", 40);
    assert!(!bff.contains_key("evil") && bff.values().sum::<u64>() == 40, "bff's requests stay with recall: {bff:?}");
    assert!(bff.contains_key("recall-v1") && bff.contains_key("recall-v2"), "plain balancing over recall: {bff:?}");
    assert!(only(&ask(&c, "client-aaa", 20), "evil"), "aaa's own clients follow their VirtualService");

    // Exported everywhere (the default): now it does take bff's traffic, as in Istio.
    c.apply_config("policy.yaml", &[DR, &hijack("", "2026-03-01T00:00:00Z")].concat()).unwrap();
    assert!(only(&ask(&c, "client-bff", 20), "evil"));

    // The recall team's VirtualService is older: it wins for every client that sees both,
    // although aaa/hijack sorts first by namespace/name.
    c.apply_config("policy.yaml", &[DR, &hijack("", "2026-03-01T00:00:00Z"), &owner("2026-01-01T00:00:00Z")].concat()).unwrap();
    for client in ["client-bff", "client-aaa"] {
        let pods = ask(&c, client, 20);
        assert!(only(&pods, "recall-v1"), "{client}: the oldest VirtualService (v1 only): {pods:?}");
    }
    // The shadowed one is reported on /config_errors.
    let errors = admin_get(&c, "/config_errors");
    let shadowed = errors["warnings"].as_array().into_iter().flatten().any(|w| {
        w["object"] == "VirtualService aaa/hijack" && w["message"].as_str().is_some_and(|m| m.starts_with("shadowed: VirtualService lemo-dev/recall is older"))
    });
    assert!(shadowed, "{errors}");

    // Swap the ages: the tenant's is the oldest now, and wins.
    c.apply_config("policy.yaml", &[DR, &hijack("", "2025-01-01T00:00:00Z"), &owner("2026-01-01T00:00:00Z")].concat()).unwrap();
    assert!(only(&ask(&c, "client-bff", 20), "evil"));
}

#[test]
fn a_destination_rule_in_the_clients_namespace_wins_over_the_services() {
    let c = start();
    // Everything to subset `stable`: v1 by the recall team's rule, v2 by bff's own rule.
    let policy = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: recall}
spec:
  host: recall
  subsets:
  - {name: stable, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: bff, name: recall-for-bff}
spec:
  host: recall.lemo-dev.svc.cluster.local
  subsets:
  - {name: stable, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {namespace: lemo-dev, name: recall}
spec:
  hosts: [recall]
  http:
  - route:
    - destination: {host: recall, subset: stable}
";
    c.apply_config("policy.yaml", policy).unwrap();
    let bff = ask(&c, "client-bff", 30);
    assert!(only(&bff, "recall-v2"), "bff's own DestinationRule: {bff:?}");
    let aaa = ask(&c, "client-aaa", 30);
    assert!(only(&aaa, "recall-v1"), "the Service's DestinationRule for everyone else: {aaa:?}");
    // The client's rule exported away from its own namespace no longer applies there.
    c.apply_config("policy.yaml", &policy.replace("  host: recall.lemo-dev.svc.cluster.local\n", "  host: recall.lemo-dev.svc.cluster.local\n  exportTo: [aaa]\n").replace(
        "metadata: {namespace: bff, name: recall-for-bff}",
        "metadata: {namespace: bff, name: recall-for-bff}",
    ))
    .unwrap();
    let bff = ask(&c, "client-bff", 20);
    assert!(only(&bff, "recall-v1"), "not exported to bff: the Service's rule: {bff:?}");
}

#[test]
fn use_client_protocol_forwards_http2_as_http2_and_disable_lifts_strict() {
    let c = start();
    let policy = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: lemo-dev, name: recall}
spec:
  host: recall
  trafficPolicy:
    connectionPool:
      http: {useClientProtocol: true}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {namespace: lemo-dev, name: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {namespace: aaa, name: evil}
spec:
  selector: {matchLabels: {app: evil}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
";
    c.apply_config("policy.yaml", policy).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // An HTTP/2 client on a port named `http`: upstream in the client's version.
    for (h2, want) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let mut args = vec!["--count", "1", "--print-body"];
        if h2 {
            args.push("--h2");
        }
        let v = report::http(&c, "client-bff", &format!("http://{RECALL}/headers"), &args, T);
        assert_eq!(status_count(&v, "200"), 1, "{v}");
        let seen: Value = serde_json::from_str(v["last_body"].as_str().unwrap()).unwrap();
        assert_eq!(seen[":version"], want, "h2={h2}: {seen}");
    }
    // STRICT refuses plaintext from outside the mesh; port-level DISABLE lifts it (as ambient).
    let connect = |addr: String| -> Value {
        let out = c.probe("outsider", &["connect", &addr, "--timeout-ms", "1000"], T).unwrap();
        serde_json::from_str(out.trim()).unwrap()
    };
    let strict = connect(format!("{}:8080", c.pod("recall-v2").ip));
    assert_ne!(strict["result"], "ok", "STRICT recall refuses the outsider: {strict}");
    let disabled = connect(format!("{}:8080", c.pod("evil").ip));
    assert_eq!(disabled["result"], "ok", "DISABLE on 8080 accepts it: {disabled}");
    // Mesh clients still get through to both.
    assert_eq!(ask(&c, "client-aaa", 10).values().sum::<u64>(), 10);
    let errors = admin_get(&c, "/config_errors");
    assert!(errors["warnings"].to_string().contains("DISABLE is applied as Istio ambient applies it"), "{errors}");
}

#[test]
fn unapplied_kinds_are_reported_by_validate_and_check() {
    let c = start();
    let service_entry = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: lemo-dev, name: payments}
spec:
  hosts: [api.payments.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
";
    let gateway = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {namespace: istio-system, name: public}
spec:
  selector: {istio: ingressgateway}
  servers: []
";
    // A Gateway alone: listed, a warning; --strict makes it an error.
    c.apply_config("gateway.yaml", gateway).unwrap();
    let validate = |strict: bool| {
        let mut cmd = std::process::Command::new(bins::path("mesh-node"));
        cmd.args(["validate", c.config_dir.to_str().unwrap()]);
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd.output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, text) = validate(false);
    assert!(ok, "{text}");
    assert!(text.contains("warning: gateway.yaml: Gateway istio-system/public (networking.istio.io/v1): not applied by mesh (kind Gateway)"), "{text}");
    let (ok, text) = validate(true);
    assert!(!ok, "--strict fails on it: {text}");
    assert!(text.contains("error: gateway.yaml: Gateway istio-system/public"), "{text}");
    let out = c.meshctl(0, &["check"]).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(report.contains("‼ kinds applied") && report.contains("not applied by mesh (kind Gateway)"), "{report}");
    let metrics = c.metrics(0).unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("mesh_config_not_applied_objects{") && l.contains("kind=\"Gateway\"") && l.ends_with(" 1")), "{metrics}");

    // A ServiceEntry would route mesh traffic in Istio: `meshctl check` fails, with a hint.
    c.apply_config("service-entry.yaml", service_entry).unwrap();
    let out = c.meshctl(0, &["check"]).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{report}");
    let line = report.lines().position(|l| l.starts_with("✘ kinds applied")).unwrap_or_else(|| panic!("{report}"));
    assert!(report.lines().nth(line).is_some_and(|l| l.contains("ServiceEntry lemo-dev/payments")), "{report}");
    assert!(report.lines().nth(line + 1).is_some_and(|h| h.contains("hint:") && h.contains("ExternalName")), "{report}");
    let errors = admin_get(&c, "/config_errors");
    let kinds: Vec<&str> = errors["not_applied"].as_array().into_iter().flatten().filter_map(|u| u["kind"].as_str()).collect();
    assert_eq!(kinds, ["Gateway", "ServiceEntry"], "{errors}");
}

/// GET on node-a's admin API (127.0.0.1:15000 inside the node's network namespace).
fn admin_get(c: &SimCluster, path: &str) -> Value {
    let url = format!("http://127.0.0.1:15000{path}");
    let out = c.run_in_netns(&c.node(0).netns, std::path::Path::new("curl"), &["-s", "-m", "5", &url], Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}{}", String::from_utf8_lossy(&out.stderr)))
}
