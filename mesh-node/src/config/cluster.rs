//! The loaded snapshot and the lookups the proxy needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::assemble::assemble;
use super::decode::Unapplied;
use super::error::{ConfigError, Problem};
use super::host;
use super::istio::{AuthorizationPolicy, DestinationRule, MtlsMode, PeerAuthentication, VirtualService};
use super::lookup::{self, root_namespace};
use super::load::{self, Source};
use super::tunnels::TunnelMode;
use super::model::{
    Conditions, DATAPLANE_MODE_LABEL, Endpoint, EndpointSlice, Namespace, Node, Pod, Service,
    labels_match,
};

/// An immutable, validated snapshot of the cluster. Cloning copies
/// everything; share it behind an `Arc` (the watcher does).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub(crate) namespaces: BTreeMap<String, Namespace>,
    pub(crate) nodes: BTreeMap<String, Node>,
    /// Sorted by namespace/name, which is also the endpoint order.
    pub(crate) pods: Vec<Pod>,
    pub(crate) pod_by_ip: HashMap<IpAddr, usize>,
    /// Sorted by namespace/name.
    pub(crate) services: Vec<Service>,
    pub(crate) service_by_name: HashMap<(String, String), usize>,
    pub(crate) service_by_vip: HashMap<IpAddr, usize>,
    /// Sorted by namespace/name.
    pub(crate) endpoint_slices: Vec<EndpointSlice>,
    /// By the Service (namespace, name) they belong to: indexes into `endpoint_slices`.
    pub(crate) slices_by_service: HashMap<(String, String), Vec<usize>>,
    /// Sorted by namespace/name; `dr_hosts[i]` is rule i's canonical host.
    pub(crate) destination_rules: Vec<DestinationRule>,
    pub(crate) dr_hosts: Vec<String>,
    /// Sorted by namespace/name; `vs_hosts[i]` are rule i's canonical hosts.
    pub(crate) virtual_services: Vec<VirtualService>,
    pub(crate) vs_hosts: Vec<Vec<String>>,
    pub(crate) peer_authentications: Vec<PeerAuthentication>,
    /// Sorted by namespace/name.
    pub(crate) authorization_policies: Vec<AuthorizationPolicy>,
    /// Every namespace mentioned anywhere, to read `name.namespace` hosts.
    pub(crate) known_namespaces: BTreeSet<String>,
    pub(crate) fingerprint: u64,
    /// Problems with objects that are applied anyway, in a reading that differs from (is
    /// more restrictive than) what they say; in file order.
    pub(crate) warnings: Vec<Problem>,
    /// Objects of kinds the mesh does not apply (ServiceEntry, Gateway, ...), in file order.
    pub(crate) unapplied: Vec<Unapplied>,
}

impl Cluster {
    /// Loads and validates every `.yaml`/`.yml` file under `dir`.
    pub fn load_dir(dir: &Path) -> Result<Cluster, ConfigError> {
        Self::load_dir_in(dir, TunnelMode::MutualTls)
    }

    /// Like [`Cluster::load_dir`], for a node whose tunnels are secured as `mode` says (without
    /// a CA, policy that needs peer identities is invalid).
    pub fn load_dir_in(dir: &Path, mode: TunnelMode) -> Result<Cluster, ConfigError> {
        let sources = load::read_sources(dir).map_err(ConfigError::new)?;
        Self::from_sources_in(&sources, mode)
    }

    /// Loads from in-memory files (`(name, yaml)`), named in messages as given.
    pub fn from_yaml_files<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Cluster, ConfigError> {
        Self::from_yaml_files_in(files, TunnelMode::MutualTls)
    }

    /// Like [`Cluster::from_yaml_files`], validated for tunnels secured as `mode` says.
    pub fn from_yaml_files_in<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
        mode: TunnelMode,
    ) -> Result<Cluster, ConfigError> {
        let sources: Vec<Source> = files
            .into_iter()
            .map(|(rel, text)| Source {
                rel: rel.to_string(),
                text: text.to_string(),
            })
            .collect();
        Self::from_sources_in(&sources, mode)
    }

    pub(crate) fn from_sources_in(sources: &[Source], mode: TunnelMode) -> Result<Cluster, ConfigError> {
        let mut cluster = assemble(sources, mode).map_err(ConfigError::new)?;
        cluster.fingerprint = load::fingerprint(sources);
        Ok(cluster)
    }

    /// What is applied differently from how it reads (an AuthorizationPolicy rule with
    /// HTTP attributes, applied in its most restrictive reading), one per field.
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// Objects of kinds the mesh does not apply (Istio's ServiceEntry, Sidecar, Gateway, ...,
    /// Gateway API routes), each reported as "not applied by mesh (kind X)".
    pub fn unapplied(&self) -> &[Unapplied] {
        &self.unapplied
    }

    /// Identifies the input this snapshot was built from (names and contents).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter()
    }

    /// Looks up any of a pod's IPs (host-network pods are not indexed: their
    /// IP is the node's).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pod_by_ip.get(&ip).map(|&i| &self.pods[i])
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .map(|i| &self.pods[i])
    }

    pub fn pods_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.iter()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.service_by_name
            .get(&(namespace.to_string(), name.to_string()))
            .map(|&i| &self.services[i])
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.service_by_vip.get(&ip).map(|&i| &self.services[i])
    }

    /// Resolves `recall`, `recall.ns`, `recall.ns.svc` or the FQDN, with short
    /// names relative to `from_namespace`.
    pub fn service_by_host(&self, host: &str, from_namespace: &str) -> Option<&Service> {
        let lower = host.to_ascii_lowercase();
        let (name, ns) = host::service_ref(&lower, from_namespace, |ns| {
            self.known_namespaces.contains(ns)
        })?;
        self.service(ns, name)
    }

    /// The canonical form of `host` as written in `from_namespace`.
    pub fn canonical_host(&self, host: &str, from_namespace: &str) -> String {
        host::canonical_host(host, from_namespace, |ns| {
            self.known_namespaces.contains(ns)
        })
    }

    /// Every endpoint of `svc`'s port `port` with its conditions, ready or not (pick the ones
    /// to send to with [`super::usable`]), ordered by address.
    ///
    /// From the Service's EndpointSlices when it has any, as Kubernetes' own consumers read
    /// them (selector-less Services such as `default/kubernetes` have only those); otherwise
    /// derived from Pods x selector as the EndpointSlice controller would (running pods that
    /// have the target port, Ready and `deletionTimestamp` honoured).
    /// `publishNotReadyAddresses` makes every endpoint count as ready.
    pub fn endpoints(&self, svc: &Service, port: u16) -> Vec<Endpoint> {
        let Some(service_port) = svc.port(port) else {
            return Vec::new();
        };
        let mut endpoints = match self.slices_by_service.get(&(svc.namespace.clone(), svc.name.clone())) {
            Some(slices) => {
                let mut endpoints = self.slice_endpoints(slices, service_port);
                // A dual-stack Service has a slice per family: the VIP's family is the one the
                // connection came in on (the capture is IPv4), so it is the one to dial.
                if let Some(vip) = svc.cluster_ips.first() {
                    endpoints.retain(|e| e.addr.is_ipv4() == vip.is_ipv4());
                }
                endpoints
            }
            None => self
                .pods
                .iter()
                .filter(|pod| svc.selects(pod))
                .filter_map(|pod| {
                    let target = pod.resolve_target_port(&service_port.target_port)?;
                    let mut endpoint = Endpoint::of_pod(pod, SocketAddr::new(pod.ip, target));
                    endpoint.conditions = Conditions {
                        ready: pod.ready && !pod.terminating,
                        serving: pod.ready,
                        terminating: pod.terminating,
                    };
                    Some(endpoint)
                })
                .collect(),
        };
        if svc.publish_not_ready {
            for e in &mut endpoints {
                e.conditions.ready = true;
            }
        }
        endpoints.sort_by_key(|e| e.addr);
        endpoints
    }

    fn slice_endpoints(&self, slices: &[usize], service_port: &super::model::ServicePort) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
        let mut at: HashMap<SocketAddr, usize> = HashMap::new();
        for slice in slices.iter().map(|&i| &self.endpoint_slices[i]) {
            // The controller names a slice port after the Service port it serves.
            let Some(port) = slice
                .ports
                .iter()
                .find(|p| p.name == service_port.name && p.protocol == service_port.protocol)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let pod = match &ep.pod {
                    Some((namespace, name)) => self.pod(namespace, name),
                    None => self.pod_by_ip(ep.address),
                };
                let endpoint = Endpoint {
                    pod_namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
                    pod_name: pod.map(|p| p.name.clone()).unwrap_or_default(),
                    node: ep.node.clone().or_else(|| pod.map(|p| p.node.clone())).unwrap_or_default(),
                    addr: SocketAddr::new(ep.address, port.port),
                    conditions: ep.conditions,
                    hostname: ep.hostname.clone(),
                };
                // The same address in two slices (the controller moving it): keep the ready one.
                match at.get(&endpoint.addr) {
                    Some(&i) if !out[i].conditions.ready && endpoint.conditions.ready => out[i] = endpoint,
                    Some(_) => {}
                    None => {
                        at.insert(endpoint.addr, out.len());
                        out.push(endpoint);
                    }
                }
            }
        }
        out
    }

    /// The EndpointSlices of the Service `namespace/name`.
    pub fn endpoint_slices_of(&self, namespace: &str, name: &str) -> impl Iterator<Item = &EndpointSlice> {
        self.slices_by_service
            .get(&(namespace.to_string(), name.to_string()))
            .into_iter()
            .flatten()
            .map(|&i| &self.endpoint_slices[i])
    }

    /// In the mesh: the pod's namespace is labelled
    /// `istio.io/dataplane-mode: ambient` and the pod is not labelled `none`.
    /// Host-network pods never are: their traffic is the node's own, which
    /// ambient cannot capture per pod.
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        let namespace_ambient = self
            .namespaces
            .get(&pod.namespace)
            .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
            .is_some_and(|mode| mode == "ambient");
        let opted_out = pod
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .is_some_and(|mode| mode == "none");
        namespace_ambient && !opted_out && !pod.host_network
    }

    /// The DestinationRule that applies to requests for `svc` from a client in `client_ns`
    /// (`None`: the caller is not a known pod; it is looked up as from the Service's own
    /// namespace). Istio's lookup, see [`super::lookup`]: the client's namespace, then the
    /// Service's, then the root namespace, with `exportTo` evaluated from the client's.
    pub fn destination_rule_for(&self, svc: &Service, client_ns: Option<&str>) -> Option<&DestinationRule> {
        let client = client_ns.unwrap_or(&svc.namespace);
        lookup::destination_rule(self.destination_rules.iter().zip(self.dr_hosts.iter().map(String::as_str)), svc, client)
    }

    /// The VirtualService that routes mesh traffic for `svc` from a client in `client_ns`
    /// (`None`: as from the Service's namespace), as a list of at most one: Istio's sidecars
    /// use one VirtualService per host, the oldest of the most specific (see [`super::lookup`]),
    /// and never fall through to another one.
    pub fn virtual_services_for(&self, svc: &Service, client_ns: Option<&str>) -> Vec<&VirtualService> {
        let mut all = self.virtual_services_seen_by(svc, client_ns);
        all.truncate(1);
        all
    }

    /// Every VirtualService for `svc` that a client in `client_ns` sees, the one that applies
    /// first; the others are shadowed by it.
    pub fn virtual_services_seen_by(&self, svc: &Service, client_ns: Option<&str>) -> Vec<&VirtualService> {
        let client = client_ns.unwrap_or(&svc.namespace);
        lookup::virtual_services(self.virtual_services.iter().zip(self.vs_hosts.iter().map(Vec::as_slice)), svc, client)
    }

    pub fn destination_rules(&self) -> impl Iterator<Item = &DestinationRule> {
        self.destination_rules.iter()
    }

    pub fn virtual_services(&self) -> impl Iterator<Item = &VirtualService> {
        self.virtual_services.iter()
    }

    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.peer_authentications.iter()
    }

    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.authorization_policies.iter()
    }

    /// The AuthorizationPolicies that apply to `pod`, ordered by
    /// namespace/name, for `crate::authz::evaluate`: those of its namespace
    /// that select it or have no selector, and those of the root namespace
    /// without a selector (mesh-wide) or whose selector matches it. As in
    /// Istio, a root-namespace selector reaches matching pods in every
    /// namespace.
    pub fn authorization_policies_for(&self, pod: &Pod) -> Vec<&AuthorizationPolicy> {
        self.authorization_policies
            .iter()
            .filter(|p| {
                (p.namespace == pod.namespace || p.namespace == root_namespace())
                    && p.selector
                        .as_ref()
                        .is_none_or(|s| labels_match(s, &pod.labels))
            })
            .collect()
    }

    /// The effective inbound mTLS mode for `pod` on container port `port`:
    /// workload rule (port-level first), then namespace rule, then the
    /// mesh-wide rule in the root namespace; `Unset` defers to the next
    /// level; `Permissive` when nothing decides. Several candidates at one
    /// level: the first by name wins (Istio: the oldest).
    pub fn mtls_mode_for(&self, pod: &Pod, port: u16) -> MtlsMode {
        let workload = self.peer_authentications.iter().find(|pa| {
            pa.namespace == pod.namespace
                && pa
                    .selector
                    .as_ref()
                    .is_some_and(|s| labels_match(s, &pod.labels))
        });
        let namespace = self
            .peer_authentications
            .iter()
            .find(|pa| pa.namespace == pod.namespace && pa.selector.is_none());
        let mesh = self
            .peer_authentications
            .iter()
            .find(|pa| pa.namespace == root_namespace() && pa.selector.is_none());
        let decided = |m: Option<MtlsMode>| m.filter(|m| *m != MtlsMode::Unset);
        workload
            .and_then(|pa| decided(pa.port_level_mtls.get(&port).copied()))
            .or_else(|| workload.and_then(|pa| decided(pa.mtls)))
            .or_else(|| namespace.and_then(|pa| decided(pa.mtls)))
            .or_else(|| mesh.and_then(|pa| decided(pa.mtls)))
            .unwrap_or(MtlsMode::Permissive)
    }
}
