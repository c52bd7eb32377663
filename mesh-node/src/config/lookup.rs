//! Istio's lookup: which DestinationRule and which VirtualService apply to a request, as seen
//! from the client's namespace. Shared by the proxy's lookups (`cluster`) and validation
//! (`assemble`), so a VirtualService that validates never fails at runtime for want of a subset.
//!
//! - DestinationRule: the client's namespace first, then the Service's, then the root
//!   namespace; in each, the most specific host, then the oldest (`creationTimestamp`), then
//!   by name. `exportTo` is evaluated from the client's namespace.
//! - VirtualService: one per host, as Istio's sidecars (no merging for the mesh gateway): the
//!   most specific host, then the oldest, then by name, then by namespace (Istio's
//!   `sortConfigByCreationTime`); the others are shadowed. Only rules bound to the `mesh`
//!   gateway (or to none) apply, and only when exported to the client's namespace.
//! - A Service annotated `networking.istio.io/exportTo` that is not exported to the client's
//!   namespace is not in that client's mesh config: no VirtualService or DestinationRule
//!   applies to it (Istio sends such traffic through its passthrough cluster, with no rules).

use std::cmp::Reverse;
use std::net::IpAddr;
use std::sync::OnceLock;

use super::host::{host_matches, specificity};
use super::istio::{DestinationRule, VirtualService, exported_to};
use super::model::Service;

/// Istio's default root namespace.
pub const ROOT_NAMESPACE: &str = "istio-system";

static ROOT: OnceLock<String> = OnceLock::new();

/// Sets the root namespace (`--root-namespace`) once, before any config is loaded; later calls
/// are ignored. Returns whether this call set it.
pub fn set_root_namespace(namespace: &str) -> bool {
    ROOT.set(namespace.to_string()).is_ok()
}

/// Where mesh-wide policies and fallback DestinationRules live (default `istio-system`).
pub fn root_namespace() -> &'static str {
    ROOT.get().map_or(ROOT_NAMESPACE, String::as_str)
}

/// Whether the Service is in the mesh config of clients in `client_ns` (its
/// `networking.istio.io/exportTo` annotation).
pub(crate) fn service_visible(svc: &Service, client_ns: &str) -> bool {
    exported_to(&svc.export_to, &svc.namespace, client_ns)
}

/// Istio's order among equals: the oldest first (no timestamp counts as oldest), then name,
/// then namespace.
fn age_key<'a>(created: Option<i64>, name: &'a str, namespace: &'a str) -> (i64, &'a str, &'a str) {
    (created.unwrap_or(i64::MIN), name, namespace)
}

/// The namespaces searched for a DestinationRule, in order, without repeats.
pub(crate) fn search_order<'a>(client_ns: &'a str, svc_ns: &'a str) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::with_capacity(3);
    for ns in [client_ns, svc_ns, root_namespace()] {
        if !out.contains(&ns) {
            out.push(ns);
        }
    }
    out
}

/// The DestinationRule for the Service `svc` as clients in `client_ns` see it. `rules` pairs
/// each rule with its canonical host.
pub(crate) fn destination_rule<'a, I>(rules: I, svc: &Service, client_ns: &str) -> Option<&'a DestinationRule>
where
    I: Iterator<Item = (&'a DestinationRule, &'a str)> + Clone,
{
    if !service_visible(svc, client_ns) {
        return None;
    }
    let fqdn = svc.fqdn();
    search_order(client_ns, &svc.namespace).into_iter().find_map(|ns| {
        rules
            .clone()
            .filter(|(dr, pattern)| {
                dr.namespace == ns && host_matches(pattern, &fqdn) && exported_to(&dr.export_to, &dr.namespace, client_ns)
            })
            .min_by_key(|(dr, pattern)| (Reverse(specificity(pattern)), age_key(dr.created, &dr.name, &dr.namespace)))
            .map(|(dr, _)| dr)
    })
}

/// How specifically `hosts` (canonical) name `svc`: its VIP and its exact name rank first.
fn vs_match(hosts: &[String], svc: &Service, fqdn: &str) -> Option<(bool, usize)> {
    hosts
        .iter()
        .filter_map(|h| {
            if h.parse::<IpAddr>().is_ok_and(|ip| svc.cluster_ips.contains(&ip)) {
                Some((true, usize::MAX))
            } else if host_matches(h, fqdn) {
                Some(specificity(h))
            } else {
                None
            }
        })
        .max()
}

/// Every VirtualService that applies to mesh traffic for `svc` from `client_ns`, the one
/// Istio uses first (the others for this Service are shadowed by it).
pub(crate) fn virtual_services<'a, I>(rules: I, svc: &Service, client_ns: &str) -> Vec<&'a VirtualService>
where
    I: Iterator<Item = (&'a VirtualService, &'a [String])>,
{
    if !service_visible(svc, client_ns) {
        return Vec::new();
    }
    let fqdn = svc.fqdn();
    let mut candidates: Vec<((bool, usize), &VirtualService)> = rules
        .filter(|(vs, _)| vs.applies_to_mesh() && exported_to(&vs.export_to, &vs.namespace, client_ns))
        .filter_map(|(vs, hosts)| vs_match(hosts, svc, &fqdn).map(|m| (m, vs)))
        .collect();
    candidates.sort_by(|(ma, a), (mb, b)| {
        mb.cmp(ma).then_with(|| age_key(a.created, &a.name, &a.namespace).cmp(&age_key(b.created, &b.name, &b.namespace)))
    });
    candidates.into_iter().map(|(_, vs)| vs).collect()
}

/// Whether some namespace sees both objects (their `exportTo` overlap).
pub(crate) fn visibility_overlaps(a: (&[String], &str), b: (&[String], &str), known: &[&str]) -> bool {
    let everywhere = |e: &[String]| e.is_empty() || e.iter().any(|x| x == "*");
    if everywhere(a.0) && everywhere(b.0) {
        return true;
    }
    known.iter().any(|ns| exported_to(a.0, a.1, ns) && exported_to(b.0, b.1, ns))
}
