//! Who is on each end of a connection, in the terms of Istio's metric labels: workload name,
//! namespace, principal, app and version of a pod; FQDN and name of a Service.
//!
//! Built once per config snapshot and shared, so a request looks its peers up by address
//! instead of deriving names (and allocating label strings) on the data path.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{
    config::{Cluster, Pod, Service},
    identity::Identity,
};

/// Label value Istio uses when a peer attribute is not known.
pub const UNKNOWN: &str = "unknown";

/// The labels of one pod as a metrics peer.
#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: String,
    pub name: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    /// The node the pod runs on (empty when unknown).
    pub node: String,
    /// An enrolled pod: traffic to it goes through the mesh (tunnels, policy).
    pub in_mesh: bool,
}

impl Workload {
    pub fn unknown() -> Self {
        let u = || UNKNOWN.to_string();
        Self { pod: u(), name: u(), namespace: u(), principal: u(), app: u(), version: u(), node: String::new(), in_mesh: false }
    }

    fn of(pod: &Pod, in_mesh: bool, trust_domain: &str, mtls: bool) -> Self {
        let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k)).cloned().unwrap_or_else(|| UNKNOWN.into());
        Self {
            pod: pod.name.clone(),
            name: workload_name(&pod.name).to_string(),
            namespace: pod.namespace.clone(),
            // Istio reports the principal from the peer certificate: none without mTLS, and
            // none for pods outside the mesh (they hold no certificate).
            principal: if mtls && in_mesh { Identity::new(trust_domain, &pod.namespace, &pod.service_account).to_string() } else { UNKNOWN.into() },
            app: label(&["app", "app.kubernetes.io/name"]),
            version: label(&["version", "app.kubernetes.io/version"]),
            node: pod.node.clone(),
            in_mesh,
        }
    }
}

/// A destination Service's labels.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    pub fqdn: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceLabels {
    pub fn unknown() -> Self {
        Self { fqdn: UNKNOWN.into(), name: UNKNOWN.into(), namespace: UNKNOWN.into() }
    }

    fn of(svc: &Service) -> Self {
        Self { fqdn: svc.fqdn(), name: svc.name.clone(), namespace: svc.namespace.clone() }
    }
}

/// The peers of one config snapshot.
pub struct Peers {
    fingerprint: u64,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// By namespace, then name: looked up with borrowed strings, no allocation per request.
    services: HashMap<String, HashMap<String, Arc<ServiceLabels>>>,
    unknown: Arc<Workload>,
    unknown_service: Arc<ServiceLabels>,
}

impl Peers {
    fn build(cluster: &Cluster, trust_domain: &str, mtls: bool) -> Self {
        let mut by_ip = HashMap::new();
        for pod in cluster.pods().filter(|p| !p.host_network) {
            let w = Arc::new(Workload::of(pod, cluster.is_enrolled(pod), trust_domain, mtls));
            for ip in &pod.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        let mut services: HashMap<String, HashMap<String, Arc<ServiceLabels>>> = HashMap::new();
        for s in cluster.services() {
            services.entry(s.namespace.clone()).or_default().insert(s.name.clone(), Arc::new(ServiceLabels::of(s)));
        }
        Self { fingerprint: cluster.fingerprint(), by_ip, services, unknown: Arc::new(Workload::unknown()), unknown_service: Arc::new(ServiceLabels::unknown()) }
    }

    /// The pod at `ip`, or the all-"unknown" workload.
    pub fn workload(&self, ip: IpAddr) -> &Arc<Workload> {
        self.by_ip.get(&ip).unwrap_or(&self.unknown)
    }

    pub fn find(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn unknown(&self) -> &Arc<Workload> {
        &self.unknown
    }

    pub fn service(&self, namespace: &str, name: &str) -> &Arc<ServiceLabels> {
        self.services.get(namespace).and_then(|m| m.get(name)).unwrap_or(&self.unknown_service)
    }

    pub fn unknown_service(&self) -> &Arc<ServiceLabels> {
        &self.unknown_service
    }

    /// (namespace, workload name) of every workload in the snapshot.
    pub fn workload_keys(&self) -> HashSet<(String, String)> {
        self.by_ip.values().map(|w| (w.namespace.clone(), w.name.clone())).collect()
    }
}

/// The current [`Peers`], rebuilt when the config snapshot changes.
pub struct WorkloadCache {
    current: RwLock<Arc<Peers>>,
    trust_domain: String,
    mtls: bool,
}

impl WorkloadCache {
    pub fn new(cluster: &Cluster, trust_domain: &str, mtls: bool) -> Self {
        Self { current: RwLock::new(Arc::new(Peers::build(cluster, trust_domain, mtls))), trust_domain: trust_domain.into(), mtls }
    }

    pub fn get(&self, cluster: &Cluster) -> Arc<Peers> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        if current.fingerprint == cluster.fingerprint() {
            return current;
        }
        let fresh = Arc::new(Peers::build(cluster, &self.trust_domain, self.mtls));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        fresh
    }
}

/// Kubernetes' name-suffix alphabet (no vowels, no look-alike digits): ReplicaSet and pod hashes.
fn is_hash(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
}

/// The workload a pod belongs to, from its name as controllers generate them (there are no
/// owner references in the config): `<deployment>-<rs hash>-<pod hash>`, `<statefulset>-<n>`,
/// `<daemonset or job>-<hash>`; otherwise the pod's own name.
pub fn workload_name(pod: &str) -> &str {
    let mut parts = pod.rsplitn(3, '-');
    let (Some(last), Some(prev)) = (parts.next(), parts.next()) else { return pod };
    if let Some(base) = parts.next()
        && is_hash(last, 5..=5)
        && is_hash(prev, 5..=10)
        && !base.is_empty()
    {
        return base;
    }
    let base = &pod[..pod.len() - last.len() - 1];
    if base.is_empty() {
        return pod;
    }
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return base;
    }
    if is_hash(last, 5..=5) {
        return base;
    }
    pod
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_yaml(namespace: &str, name: &str, sa: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{namespace: {namespace}, name: {name}, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: node-a, serviceAccountName: {sa}, containers: [{{name: app, image: app}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        )
    }

    #[test]
    fn principals_of_dotted_and_longest_service_accounts_are_their_whole_spiffe_ids() {
        let ns63 = format!("n{}", "s".repeat(62));
        let long_sa = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 172.18.0.2}]}\n---\n";
        // Enrolled namespaces: pods outside the mesh have no principal.
        let enrolled = |ns: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n");
        let yaml = node.to_string() + &enrolled("lemo-dev") + &enrolled(&ns63) + &pod_yaml("lemo-dev", "reader", "recall.reader", "10.244.0.20") + &pod_yaml(&ns63, "long", &long_sa, "10.244.0.21");
        let cluster = Cluster::from_yaml_files([("pods.yaml", yaml.as_str())]).unwrap_or_else(|e| panic!("{e}"));
        let peers = Peers::build(&cluster, "cluster.local", true);
        let principal = |ip: &str| peers.workload(ip.parse().expect("ip")).principal.clone();
        assert_eq!(principal("10.244.0.20"), "spiffe://cluster.local/ns/lemo-dev/sa/recall.reader");
        assert_eq!(principal("10.244.0.21"), format!("spiffe://cluster.local/ns/{ns63}/sa/{long_sa}"));
        let plaintext = Peers::build(&cluster, "cluster.local", false);
        assert_eq!(plaintext.workload("10.244.0.20".parse().expect("ip")).principal, UNKNOWN, "no principal without mTLS");
    }

    #[test]
    fn workload_names_as_controllers_generate_them() {
        assert_eq!(workload_name("reviews-v1-545db77b95-tzvpl"), "reviews-v1");
        assert_eq!(workload_name("web-1"), "web");
        assert_eq!(workload_name("redis-0"), "redis");
        assert_eq!(workload_name("node-agent-x7k2p"), "node-agent");
        assert_eq!(workload_name("client"), "client");
        assert_eq!(workload_name("web-v1a"), "web-v1a");
        assert_eq!(workload_name("client-mesh"), "client-mesh");
        assert_eq!(workload_name("-1"), "-1");
    }
}
