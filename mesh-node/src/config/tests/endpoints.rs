//! Endpoints as Kubernetes defines them: EndpointSlices with their conditions, Pod readiness
//! and deletion, selector-less and ExternalName Services, publishNotReadyAddresses.

use super::*;
use crate::config::{Conditions, usable};

const BASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 172.30.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 172.30.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: echo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: web}]
"#;

fn pod(name: &str, ip: &str, status_extra: &str, meta_extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: demo, name: {name}, labels: {{app: echo}}{meta_extra}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: c, ports: [{{name: web, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: {ip}{status_extra}}}\n"
    )
}

fn build(docs: &[String]) -> Cluster {
    let text = std::iter::once(BASE.to_string()).chain(docs.iter().cloned()).collect::<Vec<_>>().join("\n---\n");
    Cluster::from_yaml_files([("c.yaml", text.as_str())]).unwrap_or_else(|e| panic!("{e}"))
}

fn states(c: &Cluster, svc: &str, port: u16) -> Vec<(String, bool, bool, bool)> {
    let s = c.service("demo", svc).expect("service");
    c.endpoints(s, port)
        .into_iter()
        .map(|e| (e.addr.to_string(), e.conditions.ready, e.conditions.serving, e.conditions.terminating))
        .collect()
}

const READY: &str = ", conditions: [{type: Ready, status: 'True'}]";
const NOT_READY: &str = ", conditions: [{type: Ready, status: 'False'}]";

#[test]
fn pods_by_selector_honour_ready_and_deletion() {
    let c = build(&[
        pod("a", "10.244.0.11", READY, ""),
        pod("b", "10.244.0.12", NOT_READY, ""),
        pod("c", "10.244.0.13", READY, ", deletionTimestamp: '2026-12-06T10:00:00Z'"),
        // Hand-written, no conditions at all: counts as ready.
        pod("d", "10.244.0.14", "", ""),
        // Not started yet (no IP) and finished pods are no workloads and no problems.
        "apiVersion: v1\nkind: Pod\nmetadata: {namespace: demo, name: e, labels: {app: echo}}\nspec: {containers: []}\nstatus: {phase: Pending}\n".into(),
        pod("f", "10.244.0.11", ", phase: Succeeded", ""),
    ]);
    assert_eq!(
        states(&c, "echo", 80),
        [
            ("10.244.0.11:8080".to_string(), true, true, false),
            ("10.244.0.12:8080".to_string(), false, false, false),
            ("10.244.0.13:8080".to_string(), false, true, true),
            ("10.244.0.14:8080".to_string(), true, true, false),
        ]
    );
    assert!(c.pod("demo", "e").is_none() && c.pod("demo", "f").is_none());
    // The Succeeded pod's old IP belongs to the running one.
    assert_eq!(c.pod_by_ip(ip("10.244.0.11")).map(|p| p.name.as_str()), Some("a"));
    let svc = c.service("demo", "echo").expect("echo");
    let picked: Vec<String> = usable(c.endpoints(svc, 80)).iter().map(|e| e.pod_name.clone()).collect();
    assert_eq!(picked, ["a", "d"], "only ready endpoints take new work");
}

#[test]
fn serving_terminating_endpoints_only_when_nothing_is_ready() {
    let c = build(&[
        pod("a", "10.244.0.11", READY, ", deletionTimestamp: '2026-12-06T10:00:00Z'"),
        pod("b", "10.244.0.12", NOT_READY, ", deletionTimestamp: '2026-12-06T10:00:00Z'"),
        pod("c", "10.244.0.13", NOT_READY, ""),
    ]);
    let svc = c.service("demo", "echo").expect("echo");
    let picked: Vec<String> = usable(c.endpoints(svc, 80)).iter().map(|e| e.pod_name.clone()).collect();
    assert_eq!(picked, ["a"], "the serving terminating pod, never the not-ready ones");
}

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: demo
  name: echo-x1
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a
  targetRef: {kind: Pod, namespace: demo, name: a}
- addresses: [10.244.0.12]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node-a
  targetRef: {kind: Pod, namespace: demo, name: b}
- addresses: [10.244.1.50]
  conditions: {ready: false, serving: false, terminating: false}
  nodeName: node-b
- addresses: [10.244.1.51]
  hostname: echo-3
"#;

#[test]
fn endpoint_slices_win_over_the_selector_and_keep_their_conditions() {
    // The pods say otherwise (both ready, port 8080): the slices are what Kubernetes decided.
    let c = build(&[pod("a", "10.244.0.11", READY, ""), pod("b", "10.244.0.12", READY, ""), SLICE.into()]);
    let svc = c.service("demo", "echo").expect("echo");
    let eps = c.endpoints(svc, 80);
    let got: Vec<(String, &str, &str, Conditions, Option<&str>)> = eps
        .iter()
        .map(|e| (e.addr.to_string(), e.pod_name.as_str(), e.node.as_str(), e.conditions, e.hostname.as_deref()))
        .collect();
    let c_ = |ready, serving, terminating| Conditions { ready, serving, terminating };
    assert_eq!(
        got,
        [
            ("10.244.0.11:9090".to_string(), "a", "node-a", c_(true, true, false), None),
            ("10.244.0.12:9090".to_string(), "b", "node-a", c_(false, true, true), None),
            ("10.244.1.50:9090".to_string(), "", "node-b", c_(false, false, false), None),
            // Nil conditions read as ready and serving; no node, no pod: outside the mesh.
            ("10.244.1.51:9090".to_string(), "", "", c_(true, true, false), Some("echo-3")),
        ]
    );
    // A port the slices do not list has no endpoints, even though the selector would match.
    assert!(c.endpoints(svc, 81).is_empty());
}

#[test]
fn selectorless_service_with_hand_written_slices_like_the_api_server() {
    let c = build(&[r#"
apiVersion: v1
kind: Service
metadata: {namespace: default, name: kubernetes}
spec: {clusterIP: 10.96.0.1, ports: [{name: https, port: 443, targetPort: 6443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: default, name: kubernetes, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports: [{name: https, port: 6443, protocol: TCP}]
endpoints: [{addresses: [172.30.0.254], conditions: {ready: true}}]
"#
    .into()]);
    let svc = c.service_by_vip(ip("10.96.0.1")).expect("kubernetes");
    assert!(svc.selector.is_none());
    let eps = c.endpoints(svc, 443);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].addr, "172.30.0.254:6443".parse().unwrap());
    assert!(eps[0].pod_name.is_empty() && eps[0].node.is_empty());
}

#[test]
fn publish_not_ready_addresses_counts_every_endpoint_as_ready() {
    let svc = r#"
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: peers}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: web}]
"#;
    let c = build(&[pod("a", "10.244.0.11", NOT_READY, ""), svc.into()]);
    assert_eq!(states(&c, "peers", 80), [("10.244.0.11:8080".to_string(), true, false, false)]);
    assert!(c.service("demo", "peers").is_some_and(Service::is_headless));
}

#[test]
fn external_name_services_are_dns_aliases_not_errors() {
    let c = build(&[r#"
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: payments}
spec: {type: ExternalName, externalName: Payments.Example.COM, ports: [{port: 443}]}
"#
    .into()]);
    let svc = c.service("demo", "payments").expect("payments");
    assert_eq!(svc.external_name.as_deref(), Some("payments.example.com"));
    assert!(svc.cluster_ips.is_empty());
    assert!(c.endpoints(svc, 443).is_empty());

    let missing = "apiVersion: v1\nkind: Service\nmetadata: {namespace: demo, name: bad}\nspec: {type: ExternalName}\n";
    let err = Cluster::from_yaml_files([("bad.yaml", missing)]).expect_err("no externalName").to_string();
    assert!(err.contains("Service demo/bad") && err.contains("spec.externalName: is required"), "{err}");
}

#[test]
fn broken_slices_name_the_field() {
    let cases = [
        ("metadata: {namespace: demo, name: s}\naddressType: IPv4\nendpoints: []", "metadata.labels[\"kubernetes.io/service-name\"]: is required"),
        ("metadata: {namespace: demo, name: s, labels: {kubernetes.io/service-name: echo}}\naddressType: FQDN\nendpoints: []", "addressType: \"FQDN\" is not one of IPv4, IPv6"),
        (
            "metadata: {namespace: demo, name: s, labels: {kubernetes.io/service-name: echo}}\naddressType: IPv4\nendpoints: [{addresses: [fd00::1]}]",
            "does not match addressType IPv4",
        ),
        (
            "metadata: {namespace: demo, name: s, labels: {kubernetes.io/service-name: echo}}\naddressType: IPv4\nendpoints: [{addresses: [ten]}]",
            "endpoints[0].addresses[0]: \"ten\" is not an IP address",
        ),
    ];
    for (body, want) in cases {
        let doc = format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n{body}\n");
        let err = Cluster::from_yaml_files([("s.yaml", doc.as_str())]).expect_err(body).to_string();
        assert!(err.contains("EndpointSlice demo/s") && err.contains(want), "{body}\n=> {err}");
    }
}

#[test]
fn a_dual_stack_service_dials_its_vips_family() {
    let v6 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: demo, name: echo-v6, labels: {kubernetes.io/service-name: echo}}
addressType: IPv6
ports: [{name: http, port: 9090}]
endpoints: [{addresses: ["fd00::11"], conditions: {ready: true}}]
"#;
    let c = build(&[SLICE.into(), v6.into()]);
    let svc = c.service("demo", "echo").expect("echo");
    assert!(c.endpoints(svc, 80).iter().all(|e| e.addr.is_ipv4()));
    assert_eq!(c.endpoints(svc, 80).len(), 4);
}

#[test]
fn service_account_names_follow_kubernetes_rules() {
    let with_sa = |sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: demo, name: p}}\n\
             spec: {{nodeName: node-a, serviceAccountName: {sa:?}, containers: []}}\nstatus: {{podIP: 10.244.0.9}}\n"
        )
    };
    let c = build(&[with_sa("recall.reader-v1")]);
    assert_eq!(c.pod("demo", "p").map(|p| p.service_account.as_str()), Some("recall.reader-v1"));
    let doc = with_sa("Recall");
    let text = format!("{BASE}\n---\n{doc}");
    let err = Cluster::from_yaml_files([("c.yaml", text.as_str())]).expect_err("uppercase").to_string();
    assert!(err.contains("Pod demo/p: spec.serviceAccountName: \"Recall\""), "{err}");
}

#[test]
fn an_address_in_two_slices_counts_once_and_ready_wins() {
    // The controller moving an endpoint between slices may list it in both for a moment.
    let moved = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: demo, name: echo-x2, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 9090, protocol: TCP}]
endpoints: [{addresses: [10.244.1.50], conditions: {ready: true}, nodeName: node-b}]
"#;
    let c = build(&[SLICE.into(), moved.into()]);
    let got: Vec<(String, bool)> = states(&c, "echo", 80).into_iter().map(|(a, r, _, _)| (a, r)).collect();
    assert_eq!(got.iter().filter(|(a, _)| a == "10.244.1.50:9090").count(), 1, "{got:?}");
    assert!(got.contains(&("10.244.1.50:9090".to_string(), true)), "{got:?}");
}
