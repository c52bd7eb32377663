//! Whose address a tunnel stream carries. The source node proxy names the calling pod in a
//! `Forwarded: for=<pod IP>` header (as ztunnel does), so `ipBlocks` can be judged on the real
//! caller instead of the node proxy. The header is the peer's word, so it is believed only when
//! it names a mesh pod of the identity the peer's certificate proved, scheduled on the node the
//! tunnel connection comes from: a node proxy can only speak for its own pods, and only with
//! their certificates.
use std::net::IpAddr;

use crate::{config::Cluster, identity::Identity};

/// Why a tunnel's claimed source address is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error("the tunnel names no source address")]
    Missing,
    #[error("the tunnel is not authenticated, so it cannot speak for a pod")]
    NoIdentity,
    #[error("the tunnel comes from {peer}, which is no node's InternalIP")]
    UnknownNode { peer: IpAddr },
    #[error("the claimed source {claimed} is no mesh pod")]
    NotAPod { claimed: IpAddr },
    #[error("the claimed source {claimed} is pod {pod} on node {actual}, not on the source node {node}")]
    OtherNode { claimed: IpAddr, pod: String, actual: String, node: String },
    #[error("the claimed source {claimed} is pod {pod} of service account {actual}, not of the peer's identity {identity}")]
    OtherIdentity { claimed: IpAddr, pod: String, actual: String, identity: String },
}

/// The calling pod's address, if the tunnel from `peer` (authenticated as `identity`) names
/// one (`claimed`) that checks out against `cluster`.
pub fn verify(cluster: &Cluster, peer: IpAddr, identity: Option<&Identity>, claimed: Option<IpAddr>) -> Result<IpAddr, Unverified> {
    let claimed = claimed.ok_or(Unverified::Missing)?.to_canonical();
    let identity = identity.ok_or(Unverified::NoIdentity)?;
    let peer = peer.to_canonical();
    let node = cluster.nodes().find(|n| n.ip == peer).ok_or(Unverified::UnknownNode { peer })?;
    let pod = cluster.pod_by_ip(claimed).filter(|p| cluster.is_enrolled(p)).ok_or(Unverified::NotAPod { claimed })?;
    let name = format!("{}/{}", pod.namespace, pod.name);
    if pod.node != node.name {
        return Err(Unverified::OtherNode { claimed, pod: name, actual: pod.node.clone(), node: node.name.clone() });
    }
    if pod.namespace != identity.namespace || pod.service_account != identity.service_account {
        let actual = format!("{}/{}", pod.namespace, pod.service_account);
        return Err(Unverified::OtherIdentity { claimed, pod: name, actual, identity: identity.to_string() });
    }
    Ok(claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// node-a (172.30.0.1) runs client-a (demo/client) and other-a (demo/other); node-b
    /// (172.30.0.2) runs client-b (demo/client); outsider-a is in an unenrolled namespace.
    fn cluster() -> Cluster {
        let pod = |name: &str, ns: &str, sa: &str, node: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {sa}}}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: []}}\nstatus: {{podIP: {ip}}}\n---\n"
            )
        };
        let yaml = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n".to_string(),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n---\n".to_string(),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.1}]}\n---\n".to_string(),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.2}]}\n---\n".to_string(),
            pod("client-a", "demo", "client", "node-a", "10.244.0.10"),
            pod("other-a", "demo", "other", "node-a", "10.244.0.11"),
            pod("client-b", "demo", "client", "node-b", "10.244.1.10"),
            pod("outsider-a", "plain", "client", "node-a", "10.244.0.12"),
        ]
        .concat();
        Cluster::from_yaml_files([("c.yaml", yaml.as_str())]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    #[test]
    fn a_pod_of_the_peer_identity_on_the_peer_node_is_believed() {
        let c = cluster();
        let client = Identity::in_default_domain("demo", "client");
        assert_eq!(verify(&c, ip("172.30.0.1"), Some(&client), Some(ip("10.244.0.10"))), Ok(ip("10.244.0.10")));
        // From node-b, the same identity speaks for its pod there.
        assert_eq!(verify(&c, ip("172.30.0.2"), Some(&client), Some(ip("10.244.1.10"))), Ok(ip("10.244.1.10")));
        // An IPv4-mapped peer (a dual-stack listener) is the same node.
        assert_eq!(verify(&c, ip("::ffff:172.30.0.1"), Some(&client), Some(ip("10.244.0.10"))), Ok(ip("10.244.0.10")));
    }

    #[test]
    fn claims_that_do_not_check_out_are_not_believed() {
        let c = cluster();
        let client = Identity::in_default_domain("demo", "client");
        let node_a = ip("172.30.0.1");
        assert_eq!(verify(&c, node_a, Some(&client), None), Err(Unverified::Missing));
        assert_eq!(verify(&c, node_a, None, Some(ip("10.244.0.10"))), Err(Unverified::NoIdentity));
        assert_eq!(verify(&c, ip("172.30.0.9"), Some(&client), Some(ip("10.244.0.10"))), Err(Unverified::UnknownNode { peer: ip("172.30.0.9") }));
        assert_eq!(verify(&c, node_a, Some(&client), Some(ip("10.244.7.7"))), Err(Unverified::NotAPod { claimed: ip("10.244.7.7") }));
        // Not in the mesh: no pod of a mesh identity.
        assert_eq!(verify(&c, node_a, Some(&client), Some(ip("10.244.0.12"))), Err(Unverified::NotAPod { claimed: ip("10.244.0.12") }));
        // Right identity, but the pod is on node-b: node-a cannot speak for it.
        assert!(matches!(verify(&c, node_a, Some(&client), Some(ip("10.244.1.10"))), Err(Unverified::OtherNode { .. })));
        // Right node, another service account's pod.
        let err = verify(&c, node_a, Some(&client), Some(ip("10.244.0.11"))).expect_err("other identity");
        assert!(matches!(err, Unverified::OtherIdentity { .. }), "{err}");
        assert!(err.to_string().contains("demo/other-a"), "{err}");
        // Same service account name in another namespace is another identity.
        let stranger = Identity::in_default_domain("elsewhere", "client");
        assert!(matches!(verify(&c, node_a, Some(&stranger), Some(ip("10.244.0.10"))), Err(Unverified::OtherIdentity { .. })));
    }
}
