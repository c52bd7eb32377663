//! Builds a `Cluster` from decoded objects: duplicate detection, checks that
//! span objects (nodes, IPs, subsets) and the lookup indexes. Two ways: strict
//! (any problem rejects the input: file mode) and per object (a problem holds
//! back only its object: Kubernetes mode, see `per_object`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use serde_yaml::Value;

use super::cluster::Cluster;
use super::decode::{Kind, Object, Origin, Unapplied, decode};
use super::error::{Problem, Reporter};
use super::fail_closed;
use super::field_path::FieldPath;
use super::host::{self, host_matches};
use super::istio::exported_to;
use super::lookup;
use super::load::{Source, documents};
use super::tunnels::{self, TunnelMode};

/// An object and where it was defined.
type Placed<T> = (Origin, T);

#[derive(Default)]
struct Parts {
    namespaces: Vec<Placed<super::model::Namespace>>,
    nodes: Vec<Placed<super::model::Node>>,
    pods: Vec<Placed<super::model::Pod>>,
    services: Vec<Placed<super::model::Service>>,
    endpoint_slices: Vec<Placed<super::model::EndpointSlice>>,
    destination_rules: Vec<Placed<super::istio::DestinationRule>>,
    virtual_services: Vec<Placed<super::istio::VirtualService>>,
    peer_authentications: Vec<Placed<super::istio::PeerAuthentication>>,
    authorization_policies: Vec<Placed<super::istio::AuthorizationPolicy>>,
}

impl Parts {
    fn push(&mut self, origin: Origin, object: Object) {
        match object {
            Object::Namespace(o) => self.namespaces.push((origin, o)),
            Object::Node(o) => self.nodes.push((origin, o)),
            Object::Pod(o) => self.pods.push((origin, o)),
            Object::Service(o) => self.services.push((origin, o)),
            Object::EndpointSlice(o) => self.endpoint_slices.push((origin, o)),
            Object::DestinationRule(o) => self.destination_rules.push((origin, *o)),
            Object::VirtualService(o) => self.virtual_services.push((origin, *o)),
            Object::PeerAuthentication(o) => self.peer_authentications.push((origin, *o)),
            Object::AuthorizationPolicy(o) => self.authorization_policies.push((origin, *o)),
        }
    }
}

/// Identifies an object across loads: kind, namespace (empty for cluster-scoped kinds), name.
pub(crate) type ObjectKey = (Kind, String, String);

fn key_of(origin: &Origin) -> ObjectKey {
    (origin.kind, origin.namespace.clone(), origin.name.clone())
}

/// A named document: its object when it could be built, and its own problems.
struct Decoded {
    pub origin: Origin,
    pub object: Option<Object>,
    pub value: Value,
    /// Indexes into the problems vector of [`decode_sources`] that this document caused.
    pub problems: std::ops::Range<usize>,
    /// Applied, but not as written (see [`Reporter::warn`]).
    pub warnings: Vec<Problem>,
}

/// Decodes every document of `sources` in order. Problems go to `problems` in file order; a
/// duplicate (same kind, namespace and name as an earlier object) is reported and left out,
/// so it is not in the result.
fn decode_sources(sources: &[Source], problems: &mut Vec<Problem>, unapplied: &mut Vec<Unapplied>) -> Vec<Decoded> {
    let mut out = Vec::new();
    let mut first_seen: HashMap<ObjectKey, String> = HashMap::new();
    for source in sources {
        for (index, value) in documents(source, problems) {
            if let Some(u) = super::decode::unapplied(&source.rel, &value) {
                unapplied.push(u);
                continue;
            }
            let before = problems.len();
            let mut warnings = Vec::new();
            let Some((origin, object)) = decode(&source.rel, index, &value, problems, &mut warnings) else {
                continue;
            };
            let key = key_of(&origin);
            if let Some(first) = first_seen.get(&key) {
                let display = origin.display();
                Reporter::new(&origin.file, &display, problems).at(
                    &FieldPath::root(),
                    format!("duplicate object (first defined in {first})"),
                );
                continue;
            }
            first_seen.insert(key, origin.file.clone());
            out.push(Decoded { origin, object, value, problems: before..problems.len(), warnings });
        }
    }
    out
}

/// Strict assembly (file mode, `mesh-node validate`): any problem anywhere rejects the whole
/// input, and every problem is reported at once.
pub(crate) fn assemble(sources: &[Source], mode: TunnelMode) -> Result<Cluster, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut parts = Parts::default();
    let mut warnings = Vec::new();
    let mut unapplied = Vec::new();
    for d in decode_sources(sources, &mut problems, &mut unapplied) {
        warnings.extend(d.warnings);
        if let Some(object) = d.object {
            parts.push(d.origin, object);
        }
    }
    let known_namespaces = known_namespaces(&parts);
    let mut checks = Checks { problems: &mut problems, blamed: Vec::new() };
    run_checks(&parts, &known_namespaces, mode, &mut checks);
    if !problems.is_empty() {
        return Err(problems);
    }
    warnings.extend(cross_object_warnings(&parts, &|ns: &str| known_namespaces.contains(ns)));
    let mut cluster = index(parts, known_namespaces);
    cluster.warnings = warnings;
    cluster.unapplied = unapplied;
    Ok(cluster)
}

/// The result of a per-object build ([`assemble_per_object`]).
pub(crate) struct PerObject {
    pub cluster: Cluster,
    /// Objects left out or held at their last good version, in key order.
    pub rejected: Vec<Rejected>,
    /// Problems not attributable to one object (an unnamed document, a duplicate).
    pub other: Vec<Problem>,
    /// What was applied, by key: the input for the next build's fallbacks.
    pub applied: BTreeMap<ObjectKey, Kept>,
    /// Rejected new policies applied in their most restrictive reading instead
    /// ([`fail_closed::stand_in`]); never a fallback for a later build.
    pub fail_closed: Vec<Kept>,
}

/// An object as last applied.
#[derive(Clone)]
pub(crate) struct Kept {
    pub origin: Origin,
    pub object: Object,
    pub value: Value,
    /// Its warnings, reported again while it is applied.
    pub warnings: Vec<Problem>,
}

pub(crate) struct Rejected {
    pub key: ObjectKey,
    pub display: String,
    pub problems: Vec<Problem>,
    /// The last good version of the object is still applied.
    pub kept_previous: bool,
    /// A stand-in that fails closed is applied instead ([`fail_closed::stand_in`]).
    pub fail_closed: bool,
}

struct Candidate {
    kept: Kept,
    /// Unchanged since the last build: such objects win conflicts (a duplicate IP is blamed
    /// on the newcomer), as the API server would have admitted the older one first.
    settled: bool,
    /// This is the last good version standing in for a rejected new one.
    fallback: bool,
    /// A rejected policy with no last good version, applied in its most restrictive reading.
    fail_closed: bool,
}

/// Per-object assembly (Kubernetes mode): an object with problems is left out, or replaced by
/// its version in `last_good` when there is one, and everything else is applied. This is what
/// Istio effectively does: one bad object must not freeze every other update.
///
/// Cross-object checks blame one object per problem; the blamed objects fall back or go and the
/// checks run again, until nothing is blamed. Each round removes or replaces at least one
/// object, and a fallback that is blamed is removed, so this ends.
pub(crate) fn assemble_per_object(sources: &[Source], last_good: &BTreeMap<ObjectKey, Kept>, mode: TunnelMode) -> PerObject {
    let mut problems = Vec::new();
    let mut unapplied = Vec::new();
    let decoded = decode_sources(sources, &mut problems, &mut unapplied);
    let mut rejected: BTreeMap<ObjectKey, Rejected> = BTreeMap::new();
    let mut candidates: BTreeMap<ObjectKey, Candidate> = BTreeMap::new();
    let fallback = |key: &ObjectKey, candidates: &mut BTreeMap<ObjectKey, Candidate>| {
        if let Some(previous) = last_good.get(key) {
            candidates.insert(key.clone(), Candidate { kept: previous.clone(), settled: true, fallback: true, fail_closed: false });
        }
    };
    // Problems of documents that name no object (no apiVersion, kind or name; YAML syntax)
    // and of duplicates hold nothing back: they are reported on their own.
    let mut own = vec![false; problems.len()];
    for d in decoded {
        let key = key_of(&d.origin);
        own[d.problems.clone()].fill(true);
        match d.object {
            Some(object) if d.problems.is_empty() => {
                let settled = last_good.get(&key).is_some_and(|k| k.value == d.value);
                let kept = Kept { origin: d.origin, object, value: d.value, warnings: d.warnings };
                candidates.insert(key, Candidate { kept, settled, fallback: false, fail_closed: false });
            }
            _ => {
                rejected.insert(
                    key.clone(),
                    Rejected {
                        key: key.clone(),
                        display: d.origin.display(),
                        problems: problems[d.problems].to_vec(),
                        kept_previous: false,
                        fail_closed: false,
                    },
                );
                fallback(&key, &mut candidates);
                // A new policy that cannot be read must not leave its workloads open.
                if !candidates.contains_key(&key)
                    && let Some(object) = fail_closed::stand_in(&d.origin, &d.value)
                {
                    let kept = Kept { origin: d.origin, object, value: d.value, warnings: Vec::new() };
                    candidates.insert(key, Candidate { kept, settled: false, fallback: false, fail_closed: true });
                }
            }
        }
    }
    let other: Vec<Problem> = problems.into_iter().zip(own).filter(|(_, own)| !own).map(|(p, _)| p).collect();

    loop {
        let mut parts = Parts::default();
        let order = candidates.iter().filter(|(_, c)| c.settled).chain(candidates.iter().filter(|(_, c)| !c.settled));
        for (_, c) in order {
            parts.push(c.kept.origin.clone(), c.kept.object.clone());
        }
        let known = known_namespaces(&parts);
        let mut problems = Vec::new();
        let mut checks = Checks { problems: &mut problems, blamed: Vec::new() };
        run_checks(&parts, &known, mode, &mut checks);
        let blamed = std::mem::take(&mut checks.blamed);
        if blamed.is_empty() {
            for r in rejected.values_mut() {
                r.kept_previous = candidates.get(&r.key).is_some_and(|c| c.fallback);
                r.fail_closed = candidates.get(&r.key).is_some_and(|c| c.fail_closed);
            }
            let cross = cross_object_warnings(&parts, &|ns: &str| known.contains(ns));
            let mut cluster = index(parts, known);
            cluster.warnings = candidates.values().flat_map(|c| c.kept.warnings.iter().cloned()).collect();
            cluster.warnings.extend(cross);
            cluster.unapplied = unapplied;
            let (stand_ins, applied): (Vec<_>, Vec<_>) = candidates.into_iter().partition(|(_, c)| c.fail_closed);
            let applied = applied.into_iter().map(|(k, c)| (k, c.kept)).collect();
            let fail_closed = stand_ins.into_iter().map(|(_, c)| c.kept).collect();
            return PerObject { cluster, rejected: rejected.into_values().collect(), other, applied, fail_closed };
        }
        let mut round: BTreeSet<ObjectKey> = BTreeSet::new();
        for (key, problem) in blamed.into_iter().zip(problems) {
            let display = problem.object.clone().unwrap_or_default();
            rejected
                .entry(key.clone())
                .or_insert_with(|| Rejected { key: key.clone(), display, problems: Vec::new(), kept_previous: false, fail_closed: false })
                .problems
                .push(problem);
            round.insert(key);
        }
        // Once per object and round, or a second problem would also remove the fallback.
        for key in round {
            if let Some(c) = candidates.remove(&key)
                && !c.fallback
            {
                fallback(&key, &mut candidates);
            }
        }
    }
}

/// Collects cross-object problems and which object each one blames.
struct Checks<'a> {
    problems: &'a mut Vec<Problem>,
    /// `blamed[i]` is the object of the i-th problem pushed through [`Checks::report`].
    blamed: Vec<ObjectKey>,
}

impl Checks<'_> {
    fn report(&mut self, origin: &Origin, field: &FieldPath, message: String) {
        let display = origin.display();
        Reporter::new(&origin.file, &display, self.problems).at(field, message);
        self.blamed.push(key_of(origin));
    }
}

fn run_checks(parts: &Parts, known_namespaces: &BTreeSet<String>, mode: TunnelMode, checks: &mut Checks<'_>) {
    let is_ns = |ns: &str| known_namespaces.contains(ns);
    check_pod_nodes(parts, checks);
    check_pod_ips(parts, checks);
    check_service_ips(parts, checks);
    check_subsets(parts, &is_ns, checks);
    if mode == TunnelMode::Plaintext {
        check_needs_identities(parts, checks);
    }
}

/// Without a CA, policy that needs peer identities is invalid (see `tunnels`).
fn check_needs_identities(parts: &Parts, checks: &mut Checks<'_>) {
    for (origin, pa) in &parts.peer_authentications {
        for (field, message) in tunnels::peer_authentication(pa) {
            checks.report(origin, &field, message);
        }
    }
    for (origin, dr) in &parts.destination_rules {
        for (field, message) in tunnels::destination_rule(dr) {
            checks.report(origin, &field, message);
        }
    }
    for (origin, policy) in &parts.authorization_policies {
        for (field, message) in tunnels::authorization_policy(policy) {
            checks.report(origin, &field, message);
        }
    }
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
        .chain(parts.endpoint_slices.iter().map(|(o, _)| o))
        .chain(parts.destination_rules.iter().map(|(o, _)| o))
        .chain(parts.virtual_services.iter().map(|(o, _)| o))
        .chain(parts.peer_authentications.iter().map(|(o, _)| o))
        .chain(parts.authorization_policies.iter().map(|(o, _)| o));
    set.extend(namespaced.map(|o| o.namespace.clone()));
    set
}

fn check_pod_nodes(parts: &Parts, checks: &mut Checks<'_>) {
    let nodes: BTreeSet<&str> = parts.nodes.iter().map(|(_, n)| n.name.as_str()).collect();
    for (origin, pod) in &parts.pods {
        if !pod.node.is_empty() && !nodes.contains(pod.node.as_str()) {
            checks.report(
                origin,
                &FieldPath::of(&["spec", "nodeName"]),
                format!("node {:?} is not defined", pod.node),
            );
        }
    }
}

fn check_pod_ips(parts: &Parts, checks: &mut Checks<'_>) {
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
                    checks.report(origin, &path, format!("{ip} is already used by {other}"));
                }
                Some(_) => {}
                None => {
                    owner.insert(*ip, display.clone());
                }
            }
        }
    }
}

fn check_service_ips(parts: &Parts, checks: &mut Checks<'_>) {
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
                    checks.report(origin, &path, format!("{ip} is already used by {other}"));
                }
                None => {
                    owner.insert(*ip, display.clone());
                }
            }
        }
    }
}

/// Istio rejects routes to subsets no DestinationRule defines (the traffic would be
/// black-holed), so the error goes on the VirtualService. The rule a request uses depends on
/// the client's namespace (see `lookup`), so the check runs the proxy's own lookup for every
/// namespace with pods whose clients see the VirtualService, and for clients of any other namespace: a
/// VirtualService that validates never finds its subset missing at runtime. When the rule of
/// one client namespace (its own DestinationRule, which wins there) lacks a subset the others
/// define, that rule is blamed instead.
fn check_subsets(parts: &Parts, is_ns: &dyn Fn(&str) -> bool, checks: &mut Checks<'_>) {
    let dr_hosts: Vec<String> = parts
        .destination_rules
        .iter()
        .map(|(_, dr)| host::canonical_host(&dr.host, &dr.namespace, is_ns))
        .collect();
    let rules = || parts.destination_rules.iter().map(|(_, dr)| dr).zip(dr_hosts.iter().map(String::as_str));
    // The namespaces clients call from: those with pods (a namespace without any has no client
    // yet; its first pod makes the check run again), and any other namespace, which sees only
    // what is exported everywhere.
    const ELSEWHERE: &str = "";
    let mut clients: Vec<&str> = parts.pods.iter().map(|(_, p)| p.namespace.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
    clients.push(ELSEWHERE);
    let mut reported: BTreeSet<(ObjectKey, String)> = BTreeSet::new();
    for (origin, vs) in &parts.virtual_services {
        for (path, dest) in vs.destinations() {
            let Some(subset) = &dest.subset else { continue };
            let target = host::canonical_host(&dest.host, &vs.namespace, is_ns);
            let defined_anywhere = rules().any(|(dr, pattern)| host_matches(pattern, &target) && dr.subset(subset).is_some());
            let svc = parts.services.iter().map(|(_, s)| s).find(|s| s.fqdn() == target);
            let (Some(svc), true) = (svc, defined_anywhere) else {
                if !defined_anywhere {
                    checks.report(
                        origin,
                        &path.key("subset"),
                        format!("subset {subset:?} is not defined by any DestinationRule for host {target}"),
                    );
                }
                continue;
            };
            for client in &clients {
                let sees_vs = if *client == ELSEWHERE {
                    vs.export_to.is_empty() || vs.export_to.iter().any(|e| e == "*")
                } else {
                    exported_to(&vs.export_to, &vs.namespace, client)
                };
                if !sees_vs || !lookup::service_visible(svc, client) {
                    continue;
                }
                let rule = lookup::destination_rule(rules(), svc, client);
                if rule.is_some_and(|dr| dr.subset(subset).is_some()) {
                    continue;
                }
                let who = if *client == ELSEWHERE { "other namespaces".to_string() } else { format!("namespace {client}") };
                match rule {
                    // The client namespace's own rule shadows one that has the subset: blame it.
                    Some(dr) if dr.namespace == *client && dr.namespace != svc.namespace => {
                        let (dr_origin, _) = parts
                            .destination_rules
                            .iter()
                            .find(|(_, d)| std::ptr::eq(d, dr))
                            .expect("the rule comes from parts");
                        let message = format!(
                            "does not define subset {subset:?}, which VirtualService {}/{} routes to ({path}); as the DestinationRule of the clients' own namespace it is the one that applies to host {target} for clients in {who} (Istio's lookup), so their requests would find no subset",
                            vs.namespace, vs.name
                        );
                        if reported.insert((key_of(dr_origin), message.clone())) {
                            checks.report(dr_origin, &FieldPath::of(&["subsets"]), message);
                        }
                    }
                    _ => {
                        let applied = match rule {
                            Some(dr) => format!("by DestinationRule {}/{}, the rule that applies to host {target} for clients in {who}", dr.namespace, dr.name),
                            None => format!("for clients in {who}: no DestinationRule for host {target} is visible to them (exportTo)"),
                        };
                        let message = format!("subset {subset:?} is not defined {applied}");
                        if reported.insert((key_of(origin), format!("{path}: {message}"))) {
                            checks.report(origin, &path.key("subset"), message);
                        }
                    }
                }
            }
        }
    }
}

/// What is applied but not the way it reads, across objects: VirtualServices shadowed by an
/// older one for the same host (Istio uses one VirtualService per host: the oldest).
fn cross_object_warnings(parts: &Parts, is_ns: &dyn Fn(&str) -> bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let known = known_namespaces(parts);
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let mesh: Vec<(&Origin, &super::istio::VirtualService, Vec<String>)> = parts
        .virtual_services
        .iter()
        .filter(|(_, vs)| vs.applies_to_mesh())
        .map(|(o, vs)| (o, vs, vs.hosts.iter().map(|h| host::canonical_host(h, &vs.namespace, is_ns)).collect()))
        .collect();
    let age = |vs: &super::istio::VirtualService| (vs.created.unwrap_or(i64::MIN), vs.name.clone(), vs.namespace.clone());
    for (origin, vs, hosts) in &mesh {
        for (i, host) in hosts.iter().enumerate() {
            let winner = mesh
                .iter()
                .filter(|(_, other, other_hosts)| {
                    other_hosts.contains(host)
                        && age(other) < age(vs)
                        && lookup::visibility_overlaps((&vs.export_to, &vs.namespace), (&other.export_to, &other.namespace), &known)
                })
                .min_by_key(|(_, other, _)| age(other));
            if let Some((_, older, _)) = winner {
                let display = origin.display();
                let mut sink = Vec::new();
                Reporter::new(&origin.file, &display, &mut sink).at(
                    &FieldPath::of(&["hosts"]).index(i),
                    format!(
                        "shadowed: VirtualService {}/{} is older and also routes host {host}; Istio applies only the oldest VirtualService of a host (creationTimestamp, then name), so this one is not used for it by clients that see both",
                        older.namespace, older.name
                    ),
                );
                out.extend(sink);
            }
        }
    }
    out
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
    let endpoint_slices = sorted(parts.endpoint_slices);
    let mut slices_by_service: HashMap<(String, String), Vec<usize>> = HashMap::new();
    for (i, slice) in endpoint_slices.iter().enumerate() {
        slices_by_service.entry((slice.namespace.clone(), slice.service.clone())).or_default().push(i);
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
        endpoint_slices,
        slices_by_service,
        destination_rules,
        dr_hosts,
        virtual_services,
        vs_hosts,
        peer_authentications: sorted(parts.peer_authentications),
        authorization_policies: sorted(parts.authorization_policies),
        known_namespaces,
        fingerprint: 0,
        warnings: Vec::new(),
        unapplied: Vec::new(),
    }
}
