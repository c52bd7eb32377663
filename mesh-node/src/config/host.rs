//! Service host names as Istio reads them.
//!
//! A short name (`recall`) is relative to the namespace of the object that
//! mentions it; `recall.ns`, `recall.ns.svc` and the full
//! `recall.ns.svc.cluster.local` name the same Service.

/// The only cluster domain the mesh supports; Istio's default too.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// `name.namespace.svc.cluster.local`.
pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// The `(name, namespace)` of the Service a host string may refer to.
///
/// `is_namespace` decides the two-label form: `recall.lemo-dev` is a Service
/// only when `lemo-dev` is a namespace; otherwise (`example.com`) it is an
/// external host.
pub fn service_ref<'a>(
    host: &'a str,
    from_namespace: &'a str,
    is_namespace: impl Fn(&str) -> bool,
) -> Option<(&'a str, &'a str)> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.contains('*') {
        return None;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let cluster_labels: Vec<&str> = CLUSTER_DOMAIN.split('.').collect();
    match labels.as_slice() {
        [name] => Some((name, from_namespace)),
        [name, ns] if is_namespace(ns) => Some((name, ns)),
        [name, ns, "svc"] => Some((name, ns)),
        [name, ns, "svc", domain @ ..] if domain == cluster_labels.as_slice() => Some((name, ns)),
        _ => None,
    }
}

/// The form used to compare hosts: Service hosts become their FQDN, anything
/// else (external names, wildcards) is kept, lower-cased and without a trailing dot.
pub fn canonical_host(
    host: &str,
    from_namespace: &str,
    is_namespace: impl Fn(&str) -> bool,
) -> String {
    let lower = host.to_ascii_lowercase();
    match service_ref(&lower, from_namespace, is_namespace) {
        Some((name, ns)) => fqdn(name, ns),
        None => lower.strip_suffix('.').unwrap_or(&lower).to_string(),
    }
}

/// Whether a canonical host `pattern` (possibly `*` or `*.suffix`) covers the
/// canonical host `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        // "*.ns.svc.cluster.local" must not match "ns.svc.cluster.local" itself.
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// How specific a matching pattern is: exact names beat wildcards, longer
/// wildcards beat shorter ones (Istio picks the most specific host).
pub fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(ns: &str) -> bool {
        ns == "lemo-dev"
    }

    #[test]
    fn canonicalizes_all_service_forms() {
        for host in [
            "recall",
            "recall.lemo-dev",
            "recall.lemo-dev.svc",
            "recall.lemo-dev.svc.cluster.local",
            "recall.lemo-dev.svc.cluster.local.",
            "Recall.Lemo-Dev.svc",
        ] {
            assert_eq!(
                canonical_host(host, "lemo-dev", known),
                "recall.lemo-dev.svc.cluster.local",
                "{host}"
            );
        }
        assert_eq!(
            canonical_host("recall", "other", known),
            "recall.other.svc.cluster.local"
        );
        assert_eq!(
            canonical_host("example.com", "lemo-dev", known),
            "example.com"
        );
        assert_eq!(
            canonical_host("*.lemo-dev.svc.cluster.local", "x", known),
            "*.lemo-dev.svc.cluster.local"
        );
        assert_eq!(service_ref("a.b.svc.other.domain", "x", known), None);
    }

    #[test]
    fn wildcards_match_suffixes_only() {
        assert!(host_matches("*", "a.b.svc.cluster.local"));
        assert!(host_matches(
            "*.b.svc.cluster.local",
            "a.b.svc.cluster.local"
        ));
        assert!(!host_matches(
            "*.b.svc.cluster.local",
            "b.svc.cluster.local"
        ));
        assert!(!host_matches(
            "a.b.svc.cluster.local",
            "c.b.svc.cluster.local"
        ));
        assert!(specificity("a.b") > specificity("*.a.b"));
    }
}
