//! The compact, validated model of the Kubernetes core kinds the mesh uses.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::host::fqdn;

/// Label that enrolls a namespace (`ambient`) or opts a pod out (`none`), as in Istio ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The node's `InternalIP` (the first one when several are listed).
    pub ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`, or a stable UUID-shaped hash of `namespace/name` when absent.
    pub uid: String,
    /// `status.podIP`.
    pub ip: IpAddr,
    /// `status.podIPs`, or just `ip` when the list is absent. The first is always `ip`.
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `(name, containerPort)` of every container port, in spec order.
    pub container_ports: Vec<(Option<String>, u16)>,
    /// Ports the kubelet probes (readiness, liveness, startup), sorted: only the kubelet's own
    /// connections reach them when the pod is STRICT or guarded by an AuthorizationPolicy.
    pub probe_ports: Vec<u16>,
    /// Host-network pods share their node's IP, so they are exempt from the
    /// unique-IP check and are never mesh workloads of their own.
    pub host_network: bool,
    /// The `Ready` condition; a hand-written Pod without `status.conditions` counts as ready.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down.
    pub terminating: bool,
}

impl Pod {
    /// The container port a Service `targetPort` refers to, if this pod has it.
    pub fn resolve_target_port(&self, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => self
                .container_ports
                .iter()
                .find(|(n, _)| n.as_deref() == Some(name.as_str()))
                .map(|(_, port)| *port),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for headless Services (`clusterIP: None`).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None` when the Service has no selector (or an empty one): Kubernetes
    /// then derives no endpoints for it.
    pub selector: Option<BTreeMap<String, String>>,
    pub labels: BTreeMap<String, String>,
    /// `spec.publishNotReadyAddresses`: every endpoint counts as ready.
    pub publish_not_ready: bool,
    /// `spec.externalName` of an `ExternalName` Service: a DNS alias the client resolves
    /// itself; such a Service has no VIP and no endpoints.
    pub external_name: Option<String>,
    /// The `networking.istio.io/exportTo` annotation, split at commas: the namespaces whose
    /// clients see the Service in the mesh (`.`, `*`, `~` or names); empty means everywhere.
    pub export_to: Vec<String>,
}

impl Service {
    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        fqdn(&self.name, &self.namespace)
    }

    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    pub fn is_headless(&self) -> bool {
        self.cluster_ips.is_empty()
    }

    /// Whether the selector picks `pod` (same namespace, all selector labels equal).
    pub fn selects(&self, pod: &Pod) -> bool {
        match &self.selector {
            Some(selector) => {
                pod.namespace == self.namespace && labels_match(selector, &pod.labels)
            }
            None => false,
        }
    }
}

/// Every `selector` entry is present with the same value in `labels`.
pub fn labels_match(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port` when the manifest omits it, as Kubernetes does.
    pub target_port: TargetPort,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: String,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetPort::Number(n) => write!(f, "{n}"),
            TargetPort::Name(name) => f.write_str(name),
        }
    }
}

/// One backend of a Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod behind the address; both empty when it is not a pod the config knows (a
    /// hand-managed endpoint, the API server, a node address).
    pub pod_namespace: String,
    pub pod_name: String,
    /// Empty when unknown.
    pub node: String,
    /// Pod IP and resolved target port.
    pub addr: SocketAddr,
    pub conditions: Conditions,
    /// `hostname` of a headless Service's endpoint (`<hostname>.<service>...`).
    pub hostname: Option<String>,
}

/// An endpoint's state, as an EndpointSlice states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    /// Takes new requests and connections.
    pub ready: bool,
    /// Can answer, whether or not it takes new work (a terminating pod finishing up).
    pub serving: bool,
    pub terminating: bool,
}

impl Default for Conditions {
    /// What Kubernetes reads from a nil condition: ready and serving, not terminating.
    fn default() -> Self {
        Self { ready: true, serving: true, terminating: false }
    }
}

impl Endpoint {
    /// A ready endpoint of `pod` at `addr` (one of its addresses).
    pub fn of_pod(pod: &Pod, addr: SocketAddr) -> Self {
        Endpoint {
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            node: pod.node.clone(),
            addr,
            conditions: Conditions::default(),
            hostname: None,
        }
    }
}

/// The endpoints that take new work, as kube-proxy and Envoy choose them: the ready ones, or,
/// when none is ready, those still serving while they terminate (so a Service whose every pod
/// is shutting down answers until the last one stops). Not-ready endpoints never do; open
/// connections and requests in flight to an endpoint that left this set are not cut.
pub fn usable(endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    if endpoints.iter().any(|e| e.conditions.ready) {
        endpoints.into_iter().filter(|e| e.conditions.ready).collect()
    } else {
        endpoints.into_iter().filter(|e| e.conditions.serving && e.conditions.terminating).collect()
    }
}

/// `discovery.k8s.io/v1` EndpointSlice: a part of one Service's endpoints, as the
/// EndpointSlice controller (or whoever manages a selector-less Service) writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name (`None` for the single unnamed port).
    pub name: Option<String>,
    /// The target port on the endpoints.
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address: the others are fungible (the API allows clients to use only it).
    pub address: IpAddr,
    pub conditions: Conditions,
    pub node: Option<String>,
    pub hostname: Option<String>,
    /// `targetRef` when it names a Pod: (namespace, name).
    pub pod: Option<(String, String)>,
}

