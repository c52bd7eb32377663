//! Builds a `Cluster` from decoded objects: duplicate detection, checks that
//! span objects (nodes, IPs, subsets) and the lookup indexes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::cluster::Cluster;
use super::decode::{Kind, Object, Origin, decode};
use super::error::{Problem, Reporter};
use super::field_path::FieldPath;
use super::host::{self, host_matches};
use super::load::{Source, documents};

/// An object and where it was defined.
type Placed<T> = (Origin, T);

#[derive(Default)]
struct Parts {
    namespaces: Vec<Placed<super::model::Namespace>>,
    nodes: Vec<Placed<super::model::Node>>,
    pods: Vec<Placed<super::model::Pod>>,
    services: Vec<Placed<super::model::Service>>,
    destination_rules: Vec<Placed<super::istio::DestinationRule>>,
    virtual_services: Vec<Placed<super::istio::VirtualService>>,
    peer_authentications: Vec<Placed<super::istio::PeerAuthentication>>,
    authorization_policies: Vec<Placed<super::istio::AuthorizationPolicy>>,
}

pub(crate) fn assemble(sources: &[Source]) -> Result<Cluster, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut parts = Parts::default();
    let mut first_seen: HashMap<(Kind, String, String), String> = HashMap::new();
    for source in sources {
        for (index, value) in documents(source, &mut problems) {
            let Some((origin, object)) = decode(&source.rel, index, &value, &mut problems) else {
                continue;
            };
            let key = (origin.kind, origin.namespace.clone(), origin.name.clone());
            if let Some(first) = first_seen.get(&key) {
                let display = origin.display();
                Reporter::new(&origin.file, &display, &mut problems).at(
                    &FieldPath::root(),
                    format!("duplicate object (first defined in {first})"),
                );
                continue;
            }
            first_seen.insert(key, origin.file.clone());
            match object {
                Object::Namespace(o) => parts.namespaces.push((origin, o)),
                Object::Node(o) => parts.nodes.push((origin, o)),
                Object::Pod(o) => parts.pods.push((origin, o)),
                Object::Service(o) => parts.services.push((origin, o)),
                Object::DestinationRule(o) => parts.destination_rules.push((origin, *o)),
                Object::VirtualService(o) => parts.virtual_services.push((origin, *o)),
                Object::PeerAuthentication(o) => parts.peer_authentications.push((origin, *o)),
                Object::AuthorizationPolicy(o) => parts.authorization_policies.push((origin, *o)),
            }
        }
    }

    let known_namespaces = known_namespaces(&parts);
    let is_ns = |ns: &str| known_namespaces.contains(ns);
    check_pod_nodes(&parts, &mut problems);
    check_pod_ips(&parts, &mut problems);
    check_service_ips(&parts, &mut problems);
    check_subsets(&parts, &is_ns, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(index(parts, known_namespaces))
}

fn known_namespaces(parts: &Parts) -> BTreeSet<String> {
    let mut set: BTreeSet<String> = parts
        .namespaces
        .iter()
        .map(|(_, n)| n.name.clone())
        .collect();
    let namespaced = parts
        .pods
        .iter()
        .map(|(o, _)| o)
        .chain(parts.services.iter().map(|(o, _)| o))
        .chain(parts.destination_rules.iter().map(|(o, _)| o))
        .chain(parts.virtual_services.iter().map(|(o, _)| o))
        .chain(parts.peer_authentications.iter().map(|(o, _)| o))
        .chain(parts.authorization_policies.iter().map(|(o, _)| o));
    set.extend(namespaced.map(|o| o.namespace.clone()));
    set
}

fn check_pod_nodes(parts: &Parts, problems: &mut Vec<Problem>) {
    let nodes: BTreeSet<&str> = parts.nodes.iter().map(|(_, n)| n.name.as_str()).collect();
    for (origin, pod) in &parts.pods {
        if !pod.node.is_empty() && !nodes.contains(pod.node.as_str()) {
            Reporter::new(&origin.file, &origin.display(), problems).at(
                &FieldPath::of(&["spec", "nodeName"]),
                format!("node {:?} is not defined", pod.node),
            );
        }
    }
}

fn check_pod_ips(parts: &Parts, problems: &mut Vec<Problem>) {
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for (origin, pod) in parts.pods.iter().filter(|(_, p)| !p.host_network) {
        let display = origin.display();
        for (i, ip) in pod.ips.iter().enumerate() {
            let path = if i == 0 {
                FieldPath::of(&["status", "podIP"])
            } else {
                FieldPath::of(&["status", "podIPs"]).index(i).key("ip")
            };
            match owner.get(ip) {
                Some(other) if *other != display => {
                    Reporter::new(&origin.file, &display, problems)
                        .at(&path, format!("{ip} is already used by {other}"));
                }
                Some(_) => {}
                None => {
                    owner.insert(*ip, display.clone());
                }
            }
        }
    }
}

fn check_service_ips(parts: &Parts, problems: &mut Vec<Problem>) {
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for (origin, svc) in &parts.services {
        let display = origin.display();
        for (i, ip) in svc.cluster_ips.iter().enumerate() {
            let path = if i == 0 {
                FieldPath::of(&["spec", "clusterIP"])
            } else {
                FieldPath::of(&["spec", "clusterIPs"]).index(i)
            };
            match owner.get(ip) {
                Some(other) => {
                    Reporter::new(&origin.file, &display, problems)
                        .at(&path, format!("{ip} is already used by {other}"));
                }
                None => {
                    owner.insert(*ip, display.clone());
                }
            }
        }
    }
}

/// Istio rejects routes to subsets no DestinationRule defines (the traffic
/// would be black-holed), so the error goes on the VirtualService.
fn check_subsets(parts: &Parts, is_ns: &dyn Fn(&str) -> bool, problems: &mut Vec<Problem>) {
    let dr_hosts: Vec<String> = parts
        .destination_rules
        .iter()
        .map(|(_, dr)| host::canonical_host(&dr.host, &dr.namespace, is_ns))
        .collect();
    for (origin, vs) in &parts.virtual_services {
        let display = origin.display();
        for (path, dest) in vs.destinations() {
            let Some(subset) = &dest.subset else { continue };
            let target = host::canonical_host(&dest.host, &vs.namespace, is_ns);
            let defined =
                parts
                    .destination_rules
                    .iter()
                    .zip(&dr_hosts)
                    .any(|((_, dr), pattern)| {
                        host_matches(pattern, &target) && dr.subset(subset).is_some()
                    });
            if !defined {
                Reporter::new(&origin.file, &display, problems).at(
                    &path.key("subset"),
                    format!(
                        "subset {subset:?} is not defined by any DestinationRule for host {target}"
                    ),
                );
            }
        }
    }
}

fn sorted<T>(mut items: Vec<Placed<T>>) -> Vec<T> {
    items.sort_by(|(a, _), (b, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    items.into_iter().map(|(_, item)| item).collect()
}

fn index(parts: Parts, known_namespaces: BTreeSet<String>) -> Cluster {
    let is_ns = |ns: &str| known_namespaces.contains(ns);
    let pods = sorted(parts.pods);
    let mut pod_by_ip = HashMap::new();
    for (i, pod) in pods.iter().enumerate().filter(|(_, p)| !p.host_network) {
        for ip in &pod.ips {
            pod_by_ip.insert(*ip, i);
        }
    }
    let services = sorted(parts.services);
    let mut service_by_name = HashMap::new();
    let mut service_by_vip = HashMap::new();
    for (i, svc) in services.iter().enumerate() {
        service_by_name.insert((svc.namespace.clone(), svc.name.clone()), i);
        for ip in &svc.cluster_ips {
            service_by_vip.insert(*ip, i);
        }
    }
    let destination_rules = sorted(parts.destination_rules);
    let dr_hosts = destination_rules
        .iter()
        .map(|dr| host::canonical_host(&dr.host, &dr.namespace, is_ns))
        .collect();
    let virtual_services = sorted(parts.virtual_services);
    let vs_hosts = virtual_services
        .iter()
        .map(|vs| {
            vs.hosts
                .iter()
                .map(|h| host::canonical_host(h, &vs.namespace, is_ns))
                .collect()
        })
        .collect();
    Cluster {
        namespaces: parts
            .namespaces
            .into_iter()
            .map(|(_, ns)| (ns.name.clone(), ns))
            .collect::<BTreeMap<_, _>>(),
        nodes: parts
            .nodes
            .into_iter()
            .map(|(_, n)| (n.name.clone(), n))
            .collect(),
        pods,
        pod_by_ip,
        services,
        service_by_name,
        service_by_vip,
        destination_rules,
        dr_hosts,
        virtual_services,
        vs_hosts,
        peer_authentications: sorted(parts.peer_authentications),
        authorization_policies: sorted(parts.authorization_policies),
        known_namespaces,
        fingerprint: 0,
    }
}
