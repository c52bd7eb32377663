//! Istio's lookup and precedence (`config::lookup`), the fields refused with a reason, and the
//! kinds reported as not applied.

use super::*;
use crate::config::TunnelMode;

/// `recall` in `lemo-dev` (pods v1 and v2), clients in `lemo-dev`, `aaa` and `bff`.
const BASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 172.30.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: lemo-dev}
---
apiVersion: v1
kind: Namespace
metadata: {name: aaa}
---
apiVersion: v1
kind: Namespace
metadata: {name: bff}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {namespace: aaa, name: client-aaa}
spec: {nodeName: node-a, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {namespace: bff, name: client-bff}
spec: {nodeName: node-a, containers: [{name: c, image: c}]}
status: {podIP: 10.244.0.12}
---
apiVersion: v1
kind: Service
metadata: {namespace: lemo-dev, name: recall}
spec:
  clusterIP: 10.96.0.10
  selector: {app: recall}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {namespace: aaa, name: evil}
spec:
  clusterIP: 10.96.0.20
  selector: {app: evil}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

fn load(extra: &str) -> Cluster {
    Cluster::from_yaml_files([("base.yaml", BASE), ("extra.yaml", extra)]).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(extra: &str) -> Vec<String> {
    match Cluster::from_yaml_files([("base.yaml", BASE), ("extra.yaml", extra)]) {
        Ok(_) => panic!("expected problems"),
        Err(e) => e.problems().to_vec(),
    }
}

fn recall(c: &Cluster) -> &Service {
    c.service("lemo-dev", "recall").expect("recall")
}

fn dr_name(c: &Cluster, client: Option<&str>) -> Option<String> {
    c.destination_rule_for(recall(c), client).map(|r| format!("{}/{}", r.namespace, r.name))
}

fn vs_name(c: &Cluster, client: Option<&str>) -> Option<String> {
    c.virtual_services_for(recall(c), client).first().map(|v| format!("{}/{}", v.namespace, v.name))
}

fn dr(namespace: &str, name: &str, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{namespace: {namespace}, name: {name}}}\nspec:\n  host: recall.lemo-dev.svc.cluster.local\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n{extra}---\n"
    )
}

fn vs(namespace: &str, name: &str, created: &str, extra: &str) -> String {
    let created = if created.is_empty() { String::new() } else { format!(", creationTimestamp: \"{created}\"") };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{namespace: {namespace}, name: {name}{created}}}\nspec:\n  hosts: [recall.lemo-dev.svc.cluster.local]\n{extra}  http:\n  - route:\n    - destination: {{host: recall.lemo-dev.svc.cluster.local, subset: v1}}\n---\n"
    )
}

#[test]
fn destination_rule_client_namespace_then_service_namespace_then_root() {
    let c = load(&[dr("lemo-dev", "recall", ""), dr("aaa", "mine", ""), dr("istio-system", "fallback", "")].concat());
    assert_eq!(dr_name(&c, Some("aaa")).as_deref(), Some("aaa/mine"), "the client's own namespace first");
    assert_eq!(dr_name(&c, Some("bff")).as_deref(), Some("lemo-dev/recall"), "then the Service's");
    assert_eq!(dr_name(&c, Some("lemo-dev")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(dr_name(&c, None).as_deref(), Some("lemo-dev/recall"), "an unknown caller: as from the Service's namespace");
    // Without the Service's rule, the root namespace's.
    let c = load(&[dr("aaa", "mine", ""), dr("istio-system", "fallback", "")].concat());
    assert_eq!(dr_name(&c, Some("bff")).as_deref(), Some("istio-system/fallback"));
    assert_eq!(dr_name(&c, Some("aaa")).as_deref(), Some("aaa/mine"));
}

#[test]
fn destination_rule_export_to_is_read_from_the_clients_namespace() {
    // The Service's rule exported only to its own namespace: other clients fall back to root.
    let c = load(&[dr("lemo-dev", "recall", "  exportTo: [\".\"]\n"), dr("istio-system", "fallback", "")].concat());
    assert_eq!(dr_name(&c, Some("lemo-dev")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(dr_name(&c, Some("bff")).as_deref(), Some("istio-system/fallback"));
    // Exported by name.
    let c = load(&[dr("lemo-dev", "recall", "  exportTo: [\".\", bff]\n"), dr("istio-system", "fallback", "")].concat());
    assert_eq!(dr_name(&c, Some("bff")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(dr_name(&c, Some("aaa")).as_deref(), Some("istio-system/fallback"));
    // "~": nobody, not even its own namespace.
    let c = load(&dr("lemo-dev", "recall", "  exportTo: [\"~\"]\n"));
    assert_eq!(dr_name(&c, Some("lemo-dev")), None);
}

#[test]
fn equally_specific_destination_rules_the_oldest_wins() {
    let a = dr("lemo-dev", "a-new", "").replace("name: a-new}", "name: a-new, creationTimestamp: \"2026-02-01T00:00:00Z\"}");
    let b = dr("lemo-dev", "b-old", "").replace("name: b-old}", "name: b-old, creationTimestamp: \"2026-01-01T00:00:00Z\"}");
    let c = load(&[a, b].concat());
    assert_eq!(dr_name(&c, Some("bff")).as_deref(), Some("lemo-dev/b-old"));
}

#[test]
fn a_tenant_virtual_service_takes_no_traffic_it_is_not_exported_to() {
    // The recall team's VirtualService (older), and a newer one in `aaa` for the same host.
    let owner = vs("lemo-dev", "recall", "2026-01-01T00:00:00Z", "");
    let tenant_local = vs("aaa", "hijack", "2026-03-01T00:00:00Z", "  exportTo: [\".\"]\n");
    let both = [dr("lemo-dev", "recall", ""), owner.clone(), tenant_local].concat();
    let c = load(&both);
    assert_eq!(vs_name(&c, Some("bff")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(vs_name(&c, Some("lemo-dev")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(vs_name(&c, None).as_deref(), Some("lemo-dev/recall"));
    // Clients in `aaa` see both: the older one wins there too, the tenant's is shadowed.
    assert_eq!(vs_name(&c, Some("aaa")).as_deref(), Some("lemo-dev/recall"));
    let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|l| l.starts_with("extra.yaml: VirtualService aaa/hijack: hosts[0]: shadowed: VirtualService lemo-dev/recall is older")),
        "{w:?}"
    );
    // Without the owner's, the tenant's applies to its own namespace only.
    let c = load(&[dr("lemo-dev", "recall", ""), vs("aaa", "hijack", "2026-03-01T00:00:00Z", "  exportTo: [\".\"]\n")].concat());
    assert_eq!(vs_name(&c, Some("aaa")).as_deref(), Some("aaa/hijack"));
    assert_eq!(vs_name(&c, Some("bff")), None);
    assert_eq!(vs_name(&c, Some("lemo-dev")), None);
}

#[test]
fn conflicting_virtual_services_resolve_to_the_oldest_then_name_then_namespace() {
    let base = dr("lemo-dev", "recall", "");
    // Newer by timestamp loses, whatever the names say.
    let c = load(&[base.clone(), vs("aaa", "a", "2026-03-01T00:00:00Z", ""), vs("lemo-dev", "z", "2026-01-01T00:00:00Z", "")].concat());
    for client in [Some("aaa"), Some("bff"), Some("lemo-dev"), None] {
        assert_eq!(vs_name(&c, client).as_deref(), Some("lemo-dev/z"), "{client:?}");
    }
    assert_eq!(c.virtual_services_for(recall(&c), Some("bff")).len(), 1, "one VirtualService per host, no fall-through");
    assert_eq!(c.virtual_services_seen_by(recall(&c), Some("bff")).len(), 2);
    // Same second: by name, then namespace (Istio's sortConfigByCreationTime).
    let t = "2026-01-01T00:00:00Z";
    let c = load(&[base.clone(), vs("lemo-dev", "b", t, ""), vs("aaa", "a", t, "")].concat());
    assert_eq!(vs_name(&c, Some("bff")).as_deref(), Some("aaa/a"));
    let c = load(&[base, vs("lemo-dev", "same", t, ""), vs("aaa", "same", t, "")].concat());
    assert_eq!(vs_name(&c, Some("bff")).as_deref(), Some("aaa/same"));
}

#[test]
fn a_more_specific_host_beats_an_older_wildcard() {
    let wildcard = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {namespace: lemo-dev, name: all, creationTimestamp: \"2025-01-01T00:00:00Z\"}\nspec:\n  hosts: [\"*.lemo-dev.svc.cluster.local\"]\n  http:\n  - route:\n    - destination: {host: recall}\n---\n";
    let c = load(&[dr("lemo-dev", "recall", ""), wildcard.to_string(), vs("lemo-dev", "exact", "2026-01-01T00:00:00Z", "")].concat());
    assert_eq!(vs_name(&c, Some("bff")).as_deref(), Some("lemo-dev/exact"));
}

#[test]
fn virtual_services_bound_only_to_gateways_do_not_apply_to_mesh_traffic_and_say_so() {
    let c = load(&[dr("lemo-dev", "recall", ""), vs("lemo-dev", "ingress", "", "  gateways: [istio-system/public]\n")].concat());
    assert_eq!(vs_name(&c, Some("bff")), None);
    let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|l| l.starts_with("extra.yaml: VirtualService lemo-dev/ingress: gateways: bound only to gateway(s) istio-system/public (not \"mesh\"): not applied by mesh")),
        "{w:?}"
    );
    let c = load(&[dr("lemo-dev", "recall", ""), vs("lemo-dev", "both", "", "  gateways: [istio-system/public, mesh]\n")].concat());
    assert_eq!(vs_name(&c, Some("bff")).as_deref(), Some("lemo-dev/both"));
}

#[test]
fn the_service_export_to_annotation_hides_it_from_other_namespaces_rules() {
    let annotated = BASE.replace(
        "metadata: {namespace: lemo-dev, name: recall}",
        "metadata: {namespace: lemo-dev, name: recall, annotations: {networking.istio.io/exportTo: \".\"}}",
    );
    let rules = [dr("lemo-dev", "recall", ""), vs("lemo-dev", "recall", "", "")].concat();
    let c = Cluster::from_yaml_files([("base.yaml", annotated.as_str()), ("extra.yaml", rules.as_str())]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recall(&c).export_to, vec![".".to_string()]);
    assert_eq!(dr_name(&c, Some("lemo-dev")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(vs_name(&c, Some("lemo-dev")).as_deref(), Some("lemo-dev/recall"));
    assert_eq!(dr_name(&c, Some("bff")), None, "not in bff's mesh config: no rule applies");
    assert_eq!(vs_name(&c, Some("bff")), None);
    let bad = BASE.replace(
        "metadata: {namespace: lemo-dev, name: recall}",
        "metadata: {namespace: lemo-dev, name: recall, annotations: {networking.istio.io/exportTo: \"., Bad_NS\"}}",
    );
    let e = Cluster::from_yaml_files([("base.yaml", bad.as_str())]).expect_err("invalid entry");
    assert_eq!(
        e.problems(),
        ["base.yaml: Service lemo-dev/recall: metadata.annotations[\"networking.istio.io/exportTo\"]: \"Bad_NS\" is not ., *, ~ or a namespace name"]
    );
}

#[test]
fn subset_validation_runs_the_runtime_lookup_for_every_client_namespace() {
    // The Service's rule defines v1; a rule in `aaa` (which wins for aaa's clients) does not.
    let mine = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {namespace: aaa, name: mine}\nspec:\n  host: recall.lemo-dev.svc.cluster.local\n---\n";
    let got = problems(&[dr("lemo-dev", "recall", ""), mine.to_string(), vs("lemo-dev", "recall", "", "")].concat());
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("extra.yaml: DestinationRule aaa/mine: subsets: does not define subset \"v1\", which VirtualService lemo-dev/recall routes to (http[0].route[0].destination)"),
        "{got:?}"
    );
    // Exported to aaa only, the rule in aaa is nobody else's concern: nothing to blame.
    load(&[dr("lemo-dev", "recall", ""), mine.to_string(), vs("lemo-dev", "recall", "", "  exportTo: [\".\", bff]\n")].concat());
    // The Service's rule visible only in its own namespace: clients elsewhere find no subset.
    let got = problems(&[dr("lemo-dev", "recall", "  exportTo: [\".\"]\n"), vs("lemo-dev", "recall", "", "")].concat());
    assert!(
        got.iter().any(|l| l.starts_with("extra.yaml: VirtualService lemo-dev/recall: http[0].route[0].destination.subset: subset \"v1\" is not defined for clients in namespace aaa: no DestinationRule for host recall.lemo-dev.svc.cluster.local is visible to them (exportTo)")),
        "{got:?}"
    );
    // A VirtualService exported only where the rule is visible validates.
    load(&[dr("lemo-dev", "recall", "  exportTo: [\".\"]\n"), vs("lemo-dev", "recall", "", "  exportTo: [\".\"]\n")].concat());
}

#[test]
fn destination_rule_tls_modes_other_than_istio_mutual_are_refused_with_the_reason() {
    let with = |mode: &str| dr("lemo-dev", "recall", &format!("  trafficPolicy:\n    tls: {{mode: {mode}}}\n"));
    let got = problems(&with("DISABLE"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("extra.yaml: DestinationRule lemo-dev/recall: trafficPolicy.tls.mode: DISABLE is not supported (traffic between mesh pods always goes through mutual TLS tunnels (HBONE)"),
        "{got:?}"
    );
    for mode in ["SIMPLE", "MUTUAL"] {
        let got = problems(&with(mode));
        assert!(got[0].starts_with(&format!("extra.yaml: DestinationRule lemo-dev/recall: trafficPolicy.tls.mode: {mode} is not supported (TLS origination")), "{got:?}");
    }
    // ISTIO_MUTUAL is what the proxy does between mesh pods: applied (with a CA) ...
    let c = load(&with("ISTIO_MUTUAL"));
    let tls = c.destination_rule_for(recall(&c), None).and_then(|r| r.traffic_policy.as_ref()).and_then(|p| p.tls.clone());
    assert_eq!(tls, Some(ClientTls { mode: TlsMode::IstioMutual }));
    // ... and refused on a node without a CA, which cannot give it.
    let text = [BASE, "---\n", with("ISTIO_MUTUAL").as_str()].concat();
    let e = Cluster::from_yaml_files_in([("all.yaml", text.as_str())], TunnelMode::Plaintext).expect_err("no mutual TLS without a CA");
    assert!(e.problems()[0].starts_with("all.yaml: DestinationRule lemo-dev/recall: trafficPolicy.tls.mode: ISTIO_MUTUAL cannot be enforced without mutual TLS"), "{:?}", e.problems());
}

#[test]
fn use_client_protocol_true_is_applied_and_false_refused() {
    let with = |v: &str| dr("lemo-dev", "recall", &format!("  trafficPolicy:\n    connectionPool:\n      http: {{useClientProtocol: {v}}}\n"));
    let c = load(&with("true"));
    let http = c.destination_rule_for(recall(&c), None).and_then(|r| r.traffic_policy.clone()).and_then(|p| p.connection_pool).and_then(|p| p.http);
    assert!(http.expect("http settings").use_client_protocol);
    assert_eq!(
        problems(&with("false")),
        ["extra.yaml: DestinationRule lemo-dev/recall: trafficPolicy.connectionPool.http.useClientProtocol: false is not supported (the proxy always forwards a request in the HTTP version the client used, which is what true asks for: set true or leave it out)"]
    );
}

#[test]
fn peer_authentication_disable_is_applied_like_permissive_and_says_so() {
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: lemo-dev, name: recall}\nspec:\n  selector: {matchLabels: {app: recall}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n";
    let c = load(pa);
    let w: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        w,
        ["extra.yaml: PeerAuthentication lemo-dev/recall: portLevelMtls.8080.mode: DISABLE is applied as Istio ambient applies it, like PERMISSIVE: plaintext from outside the mesh is accepted (it lifts a STRICT mode), while traffic from mesh pods still arrives over mutual TLS"]
    );
    assert_eq!(c.peer_authentications().next().unwrap().port_level_mtls.get(&8080), Some(&MtlsMode::Disable));
}

#[test]
fn kinds_the_mesh_does_not_apply_are_listed_not_skipped() {
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {namespace: lemo-dev, name: payments}
spec: {hosts: [api.payments.example], ports: [{number: 443, name: tls, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {namespace: lemo-dev, name: default}
spec: {egress: [{hosts: ["./*"]}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {namespace: istio-system, name: public}
spec: {selector: {istio: ingressgateway}, servers: []}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: lemo-dev, name: web}
spec: {}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {namespace: istio-system, name: mesh-default}
spec: {}
---
apiVersion: apps/v1
kind: Deployment
metadata: {namespace: lemo-dev, name: not-ours}
spec: {}
"#;
    let c = load(extra);
    let lines: Vec<String> = c.unapplied().iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "extra.yaml: ServiceEntry lemo-dev/payments (networking.istio.io/v1): not applied by mesh (kind ServiceEntry): in Istio it changes how mesh traffic is routed, so traffic here is routed as if it did not exist",
            "extra.yaml: Sidecar lemo-dev/default (networking.istio.io/v1beta1): not applied by mesh (kind Sidecar): in Istio it changes how mesh traffic is routed, so traffic here is routed as if it did not exist",
            "extra.yaml: Gateway istio-system/public (networking.istio.io/v1): not applied by mesh (kind Gateway)",
            "extra.yaml: HTTPRoute lemo-dev/web (gateway.networking.k8s.io/v1): not applied by mesh (kind HTTPRoute)",
            "extra.yaml: Telemetry istio-system/mesh-default (telemetry.istio.io/v1): not applied by mesh (kind Telemetry)",
        ]
    );
    // Kubernetes mode (per object) lists them the same way.
    let mut builder = PerObjectBuilder::new();
    let built = builder.build([("base.yaml", BASE), ("extra.yaml", extra)]);
    assert_eq!(built.cluster.unapplied().len(), 5);
    assert!(built.rejected.is_empty());
}
