//! End to end, with mutual TLS on: what an enrolled pod reaches that is not in the mesh, as on
//! a real node. Unenrolled pods on either node (through their Service VIP and directly), a
//! host-network workload and a node address, a selector-less Service whose EndpointSlice
//! points at an address outside the pod network (`default/kubernetes`, the API server), an
//! ExternalName Service. All of it passes through as plain TCP from the source node, never
//! through a tunnel, and is reported with `connection_security_policy="unknown"`; mesh pods
//! still get HBONE, and a headless Service's pod address still gets the pod's policy.
//! Needs root (CI runs as root); run through `cargo xtask test`.
use std::{path::Path, time::Duration};

use mesh_e2e::{ClusterSpec, SimCluster, bins};

const T: Duration = Duration::from_secs(30);

/// Node IPs are 172.30.0.<i+1>; the switch (where the "API server" runs) is 172.30.0.254.
const NODE_B: &str = "172.30.0.2";

fn spec() -> ClusterSpec {
    ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("legacy", false)
        .pod("client", "demo", 0, "client", 9000)
        .pod("mesh-b", "demo", 1, "mesh", 7000)
        .pod("legacy-b", "legacy", 1, "legacy", 7100)
        .pod("legacy-a", "legacy", 0, "legacy-local", 7200)
        .service("mesh", "demo", [10, 96, 0, 10], "mesh", 80, 7000)
        .service("legacy", "legacy", [10, 96, 0, 20], "legacy", 80, 7100)
        .service("legacy-local", "legacy", [10, 96, 0, 21], "legacy-local", 80, 7200)
}

/// What the harness does not write: objects other controllers or people write on a real
/// cluster. A host-network pod (a node agent) and its Service (no EndpointSlice: endpoints
/// from Pods x selector); the API server's selector-less Service and hand-written slice; an
/// ExternalName alias; a headless Service over the mesh pod.
const EXTRA: &str = r#"
apiVersion: v1
kind: Pod
metadata: {namespace: kube-system, name: node-agent-b, labels: {app: node-agent}}
spec:
  nodeName: node-b
  hostNetwork: true
  containers: [{name: agent, ports: [{name: metrics, containerPort: 9100}]}]
status:
  phase: Running
  podIP: 172.30.0.2
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {namespace: kube-system, name: node-agent}
spec:
  clusterIP: 10.96.0.30
  selector: {app: node-agent}
  ports: [{name: metrics, port: 80, targetPort: metrics}]
---
apiVersion: v1
kind: Service
metadata: {namespace: default, name: kubernetes, labels: {component: apiserver, provider: kubernetes}}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: default
  name: kubernetes
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: endpointslicemirroring-controller.k8s.io}
addressType: IPv4
ports: [{name: https, port: 6443, protocol: TCP}]
endpoints: [{addresses: [172.30.0.254], conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: partner}
spec: {type: ExternalName, externalName: api.partner.test}
---
apiVersion: v1
kind: Service
metadata: {namespace: demo, name: mesh-headless}
spec:
  clusterIP: None
  selector: {app: mesh}
  ports: [{name: tcp, port: 7000}]
"#;

fn start() -> SimCluster {
    let c = SimCluster::start(spec()).expect("simulated cluster");
    c.start_servers().expect("servers");
    let probe = bins::path("mesh-probe");
    // The host-network agent listens in node-b's own namespace; the API server on the switch.
    c.spawn_in_netns(&c.node(1).netns, &probe, &["serve", "--name", "node-agent", "--port", "9100"], &c.log_dir().join("agent.log")).expect("agent");
    c.spawn_in_netns(&c.switch_netns(), &probe, &["serve", "--name", "apiserver", "--port", "6443"], &c.log_dir().join("apiserver.log")).expect("apiserver");
    c.apply_config("extra.yaml", EXTRA).expect("extra objects load");
    c
}

/// The name of whoever answered a WHO from the client pod (fails the test if nobody did).
fn who(c: &SimCluster, addr: &str) -> String {
    let out = c.probe("client", &["who", addr], T).unwrap_or_else(|e| panic!("{addr}: {e:#}\n{}", c.proxy_log(0)));
    out.split_whitespace().next().unwrap_or_default().to_string()
}


/// `istio_tcp_connections_opened_total` of the source reporter toward `service`, by security policy.
fn opened(metrics: &str, service: &str, security: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains("reporter=\"source\""))
        .filter(|l| l.contains(&format!("destination_service=\"{service}\"")))
        .filter(|l| l.contains(&format!("connection_security_policy=\"{security}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn destinations_outside_the_mesh_pass_through_with_mtls_on() {
    let c = start();
    let legacy_b = c.pod("legacy-b").ip.to_string();

    // Unenrolled pods, through their VIP: captured (every VIP is), then plain TCP from node-a.
    assert_eq!(who(&c, "10.96.0.20:80"), "legacy-b", "unenrolled pod on the other node");
    assert_eq!(who(&c, "10.96.0.21:80"), "legacy-a", "unenrolled pod on the same node");
    // Directly by pod IP: not a mesh destination, never captured.
    assert_eq!(who(&c, &format!("{legacy_b}:7100")), "legacy-b");
    // Host network: the node's address, and a Service whose endpoint is a host-network pod.
    assert_eq!(who(&c, &format!("{NODE_B}:9100")), "node-agent");
    assert_eq!(who(&c, "10.96.0.30:80"), "node-agent");
    // default/kubernetes: no selector, its EndpointSlice names the API server's address.
    assert_eq!(who(&c, "10.96.0.1:443"), "apiserver");
    // ExternalName: cluster DNS answers the alias with its target's address (CoreDNS's CNAME
    // then A record, handed to the client here); the mesh only must not stand in the way.
    let hosts = c.log_dir().join("dns-hosts");
    std::fs::write(&hosts, format!("{NODE_B} api.partner.test partner.demo.svc.cluster.local\n")).unwrap();
    let env_probe = format!("MESH_PROBE_HOSTS={}", hosts.display());
    let out = c
        .run_in_pod("client", Path::new("/usr/bin/env"), &[&env_probe, bins::path("mesh-probe").to_str().unwrap(), "who", "partner.demo.svc.cluster.local:9100"], T)
        .expect("probe runs");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("node-agent"), "{out:?}");

    // None of that went through a tunnel; the mesh Service does.
    assert_eq!(c.counter(0, "proxy", "outbound_tunneled"), 0, "passthrough is never tunnelled");
    assert_eq!(c.counter(1, "proxy", "inbound_requests"), 0);
    assert_eq!(who(&c, "10.96.0.10:80"), "mesh-b");
    assert_eq!(c.counter(0, "proxy", "outbound_tunneled"), 1);
    assert_eq!(c.counter(1, "proxy", "inbound_requests"), 1);

    let m = c.metrics(0).expect("node-a metrics");
    assert_eq!(opened(&m, "legacy.legacy.svc.cluster.local", "unknown"), 1, "{m}");
    assert_eq!(opened(&m, "legacy-local.legacy.svc.cluster.local", "unknown"), 1, "{m}");
    assert_eq!(opened(&m, "node-agent.kube-system.svc.cluster.local", "unknown"), 1, "{m}");
    assert_eq!(opened(&m, "kubernetes.default.svc.cluster.local", "unknown"), 1, "{m}");
    assert_eq!(opened(&m, "mesh.demo.svc.cluster.local", "mutual_tls"), 1, "{m}");
    assert_eq!(opened(&m, "legacy.legacy.svc.cluster.local", "mutual_tls"), 0, "{m}");
}

#[test]
fn headless_pod_addresses_get_the_pods_policy() {
    let c = start();
    let mesh_b = format!("{}:7000", c.pod("mesh-b").ip);
    // A headless Service resolves to pod addresses: mesh pod addresses are captured and
    // tunnelled like any other mesh destination.
    assert_eq!(who(&c, &mesh_b), "mesh-b");
    assert_eq!(c.counter(0, "proxy", "outbound_tunneled"), 1);
    c.apply_config(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: demo, name: no-client}\nspec:\n  selector: {matchLabels: {app: mesh}}\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]\n",
    )
    .unwrap();
    let out = c.probe("client", &["who", &mesh_b], T);
    assert!(out.is_err() || !out.as_ref().unwrap().starts_with("mesh-b"), "denied by the pod's policy: {out:?}");
    assert!(c.counter(1, "proxy", "inbound_denied") >= 1, "refused by node-b's proxy");
    // The policy is the mesh pod's: destinations outside the mesh are untouched.
    assert_eq!(who(&c, "10.96.0.20:80"), "legacy-b");
}
