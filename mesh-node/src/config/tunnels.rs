//! What config a node can enforce depends on how its tunnels are secured. Without a CA
//! (`--insecure-plaintext-tunnels`) no peer has a verified identity: a STRICT
//! PeerAuthentication could not be honoured (nothing would be mutual TLS) and a rule naming
//! principals or namespaces could only be judged against "no identity". Silently reading such
//! config would either leave traffic open that the author meant to close or break traffic for
//! reasons nobody sees, so in plaintext mode it is a validation error naming the object and
//! field: file mode rejects the change (the last good config stays live), Kubernetes mode
//! holds the object back, exactly like any other invalid object.
//!
//! The check is a validation rule, not a daemon-level filter, so it reuses every reporting
//! path the config already has (`mesh-node validate`, the watcher's log, the held-back list of
//! the admin API) and keeps "what is live" decided in one place.

use super::field_path::FieldPath;
use super::istio::{AuthorizationPolicy, DestinationRule, MtlsMode, PeerAuthentication, TrafficPolicy};

/// How this node's tunnels are secured, which decides whether identity-based config is valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelMode {
    /// Workload certificates from the mesh CA: every policy field can be enforced.
    #[default]
    MutualTls,
    /// No CA (`--insecure-plaintext-tunnels`): peers have no identity.
    Plaintext,
}

const WHY: &str = "cannot be enforced without mutual TLS: this node runs without a CA (--insecure-plaintext-tunnels), so peers have no verified identity";

/// The fields of a PeerAuthentication that ask for STRICT, with what is wrong with each.
pub(crate) fn peer_authentication(pa: &PeerAuthentication) -> Vec<(FieldPath, String)> {
    let strict = |m: &MtlsMode| *m == MtlsMode::Strict;
    let root = FieldPath::root();
    let mut out = Vec::new();
    if pa.mtls.as_ref().is_some_and(strict) {
        out.push((root.key("mtls").key("mode"), format!("STRICT {WHY}")));
    }
    for (port, _) in pa.port_level_mtls.iter().filter(|(_, m)| strict(m)) {
        out.push((root.key("portLevelMtls").key(port.to_string()).key("mode"), format!("STRICT {WHY}")));
    }
    out
}

/// The `tls.mode: ISTIO_MUTUAL` fields of a DestinationRule: mutual TLS the node cannot give.
pub(crate) fn destination_rule(dr: &DestinationRule) -> Vec<(FieldPath, String)> {
    let mut out = Vec::new();
    let mut policy = |path: FieldPath, tp: &TrafficPolicy| {
        if tp.tls.is_some() {
            out.push((path.key("tls").key("mode"), format!("ISTIO_MUTUAL {WHY}")));
        }
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            if p.tls.is_some() {
                out.push((path.key("portLevelSettings").index(i).key("tls").key("mode"), format!("ISTIO_MUTUAL {WHY}")));
            }
        }
    };
    if let Some(tp) = &dr.traffic_policy {
        policy(FieldPath::root().key("trafficPolicy"), tp);
    }
    for (i, s) in dr.subsets.iter().enumerate() {
        if let Some(tp) = &s.traffic_policy {
            policy(FieldPath::root().key("subsets").index(i).key("trafficPolicy"), tp);
        }
    }
    out
}

/// The source fields of an AuthorizationPolicy that need peer identities: principals,
/// notPrincipals, namespaces, notNamespaces (a namespace is read from the peer's identity).
pub(crate) fn authorization_policy(policy: &AuthorizationPolicy) -> Vec<(FieldPath, String)> {
    let mut out = Vec::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for (j, source) in rule.from.iter().enumerate() {
            let path = FieldPath::root().key("rules").index(i).key("from").index(j).key("source");
            let fields = [
                ("principals", source.principals.is_empty()),
                ("notPrincipals", source.not_principals.is_empty()),
                ("namespaces", source.namespaces.is_empty()),
                ("notNamespaces", source.not_namespaces.is_empty()),
            ];
            for (field, _) in fields.iter().filter(|(_, empty)| !empty) {
                out.push((path.key(*field), WHY.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Cluster;
    use super::super::per_object::PerObjectBuilder;
    use super::TunnelMode;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n";

    fn pa(spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: pa\n  namespace: demo\nspec:\n{spec}")
    }

    fn ap(source: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ap\n  namespace: demo\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/8\"]\n    - source:\n{source}"
        )
    }

    fn problems(yaml: &str, mode: TunnelMode) -> Vec<String> {
        match Cluster::from_yaml_files_in([("ns.yaml", NS), ("policy.yaml", yaml)], mode) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().to_vec(),
        }
    }

    #[test]
    fn strict_is_an_error_only_without_a_ca() {
        let strict = pa("  mtls:\n    mode: STRICT\n");
        assert_eq!(problems(&strict, TunnelMode::MutualTls), Vec::<String>::new());
        let found = problems(&strict, TunnelMode::Plaintext);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("policy.yaml: PeerAuthentication demo/pa: mtls.mode: STRICT cannot be enforced without mutual TLS"), "{found:?}");
        assert!(found[0].contains("--insecure-plaintext-tunnels"), "{found:?}");
    }

    #[test]
    fn port_level_strict_is_an_error_and_permissive_is_not() {
        let spec = "  selector:\n    matchLabels:\n      app: x\n  mtls:\n    mode: PERMISSIVE\n  portLevelMtls:\n    8080:\n      mode: STRICT\n    9090:\n      mode: DISABLE\n";
        let found = problems(&pa(spec), TunnelMode::Plaintext);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("PeerAuthentication demo/pa: portLevelMtls.8080.mode: STRICT cannot be enforced"), "{found:?}");
    }

    #[test]
    fn identity_fields_of_authorization_rules_are_errors_and_ip_blocks_are_not() {
        for field in ["principals", "notPrincipals", "namespaces", "notNamespaces"] {
            let source = format!("        {field}: [\"demo\"]\n");
            assert_eq!(problems(&ap(&source), TunnelMode::MutualTls), Vec::<String>::new(), "{field}");
            let found = problems(&ap(&source), TunnelMode::Plaintext);
            assert_eq!(found.len(), 1, "{field}: {found:?}");
            assert!(
                found[0].contains(&format!("AuthorizationPolicy demo/ap: rules[0].from[1].source.{field}: cannot be enforced without mutual TLS")),
                "{field}: {found:?}"
            );
        }
        let ip_only = ap("        notIpBlocks: [\"10.1.0.0/16\"]\n");
        assert_eq!(problems(&ip_only, TunnelMode::Plaintext), Vec::<String>::new());
    }

    #[test]
    fn kubernetes_mode_holds_the_object_back_and_applies_the_rest() {
        let strict = pa("  mtls:\n    mode: STRICT\n");
        let mut b = PerObjectBuilder::for_tunnels(TunnelMode::Plaintext);
        let built = b.build([("ns.yaml", NS), ("pa.yaml", strict.as_str())]);
        assert!(built.cluster.namespace("demo").is_some(), "the rest is applied");
        assert_eq!(built.cluster.peer_authentications().count(), 0, "the STRICT object is held back");
        assert_eq!(built.rejected.len(), 1, "{:?}", built.rejected);
        assert_eq!(built.rejected[0].object, "PeerAuthentication demo/pa");
        assert!(built.rejected[0].to_string().contains("mtls.mode: STRICT cannot be enforced"), "{}", built.rejected[0]);

        let mut with_ca = PerObjectBuilder::new();
        let built = with_ca.build([("ns.yaml", NS), ("pa.yaml", strict.as_str())]);
        assert!(built.rejected.is_empty(), "{:?}", built.rejected);
        assert_eq!(built.cluster.peer_authentications().count(), 1);
    }
}
