//! L4 authorization: decides whether a connection to a workload is allowed by
//! the AuthorizationPolicies that apply to it
//! (`Cluster::authorization_policies_for`), with Istio's semantics:
//!
//! 1. a DENY policy with a matching rule denies (deny wins over allow);
//! 2. with no ALLOW policy for the workload, the connection is allowed;
//! 3. otherwise it is allowed only if some ALLOW policy has a matching rule.
//!    An ALLOW policy without rules matches nothing (Istio's "allow nothing").
//!
//! The source address of a tunnelled connection is the one the tunnel names (`Forwarded`),
//! when it checks out ([`super::forwarded`]); when it does not, the address is
//! [`SourceIp::Unverified`] and address conditions are read the fail-closed way.

use std::net::IpAddr;

use crate::config::{AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzRule, AuthzSource};

/// What is known about a connection when it reaches the destination workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// `cluster.local/ns/<ns>/sa/<sa>` when the peer is authenticated (mTLS,
    /// or a known pod on the same node); `None` for plaintext from outside.
    pub source_principal: Option<&'a str>,
    /// The peer's namespace; when `None`, read from the principal's `/ns/`
    /// segment. Ignored without a principal, as in Istio.
    pub source_namespace: Option<&'a str>,
    pub source_ip: SourceIp,
    /// The workload's port the connection is for.
    pub destination_port: u16,
}

/// The caller's address as the destination's proxy knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceIp {
    /// Seen on the socket (a pod on this node), or named by the tunnel and checked to be a pod
    /// of the verified source identity on the source node.
    Known(IpAddr),
    /// Only the tunnel's far end is known: `proxy` (a node proxy) stands for every pod behind
    /// it, so matching `ipBlocks` against it would let a DENY on a pod CIDR miss and an ALLOW
    /// on the node's address admit anyone there. Read fail-closed instead: the address
    /// conditions of a DENY rule match (the real address could be any), those of an ALLOW
    /// rule do not.
    Unverified { proxy: IpAddr },
}

impl From<IpAddr> for SourceIp {
    fn from(ip: IpAddr) -> Self {
        SourceIp::Known(ip)
    }
}

impl std::fmt::Display for SourceIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceIp::Known(ip) => write!(f, "{ip}"),
            SourceIp::Unverified { proxy } => write!(f, "unverified (via {proxy})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the deciding policy (for "no ALLOW policy
        /// matched", the first ALLOW policy that applies).
        policy: String,
        reason: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

pub fn evaluate(policies: &[&AuthorizationPolicy], req: &Request<'_>) -> Decision {
    let applies = |p: &&&AuthorizationPolicy| p.rules.iter().any(|r| rule_matches(r, req, p.action));
    let of = |action| policies.iter().filter(move |p| p.action == action);

    if let Some(p) = of(AuthzAction::Deny).find(applies) {
        return Decision::Deny {
            policy: p.id(),
            reason: format!("denied by AuthorizationPolicy {}", p.id()),
        };
    }
    let allow: Vec<&&AuthorizationPolicy> = of(AuthzAction::Allow).collect();
    let Some(first) = allow.first() else {
        return Decision::Allow;
    };
    if allow.iter().any(applies) {
        return Decision::Allow;
    }
    let names: Vec<String> = allow.iter().map(|p| p.id()).collect();
    Decision::Deny {
        policy: first.id(),
        reason: format!("no ALLOW policy matched ({})", names.join(", ")),
    }
}

fn rule_matches(rule: &AuthzRule, req: &Request<'_>, action: AuthzAction) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req, action));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req));
    from && to
}

fn source_matches(s: &AuthzSource, req: &Request<'_>, action: AuthzAction) -> bool {
    let principal = req.source_principal;
    // The namespace is part of the peer's identity: without a principal there
    // is none, so `namespaces` cannot match and `notNamespaces` always does.
    let namespace = principal.and_then(|p| req.source_namespace.or_else(|| namespace_of(p)));
    let wild = |list: &[crate::config::Wildcard], value: Option<&str>| {
        value.is_some_and(|v| list.iter().any(|w| w.matches(v)))
    };
    (s.principals.is_empty() || wild(&s.principals, principal))
        && !wild(&s.not_principals, principal)
        && (s.namespaces.is_empty() || wild(&s.namespaces, namespace))
        && !wild(&s.not_namespaces, namespace)
        && address_matches(s, req.source_ip, action)
}

/// `ipBlocks` and `notIpBlocks` (`remoteIpBlocks` is not supported: the config refuses it).
fn address_matches(s: &AuthzSource, source_ip: SourceIp, action: AuthzAction) -> bool {
    if s.ip_blocks.is_empty() && s.not_ip_blocks.is_empty() {
        return true;
    }
    match source_ip {
        SourceIp::Known(ip) => {
            let within = |list: &[crate::config::IpBlock]| list.iter().any(|b| b.contains(ip));
            (s.ip_blocks.is_empty() || within(&s.ip_blocks)) && !within(&s.not_ip_blocks)
        }
        // Fail closed: see [`SourceIp::Unverified`].
        SourceIp::Unverified { .. } => action == AuthzAction::Deny,
    }
}

fn operation_matches(o: &AuthzOperation, req: &Request<'_>) -> bool {
    (o.ports.is_empty() || o.ports.contains(&req.destination_port))
        && !o.not_ports.contains(&req.destination_port)
}

/// `<trust-domain>/ns/<ns>/sa/<sa>` -> `<ns>`.
fn namespace_of(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    rest.split('/').next().filter(|ns| !ns.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Cluster, Pod};

    const BFF: &str = "cluster.local/ns/lemo-dev/sa/bff";

    fn cluster(policies: &str) -> Cluster {
        Cluster::from_yaml_files([("authz.yaml", policies)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pod(namespace: &str, app: &str) -> Pod {
        let ip: IpAddr = "10.244.0.11".parse().expect("test IP");
        Pod {
            namespace: namespace.into(),
            name: format!("{app}-0"),
            uid: "uid".into(),
            ip,
            ips: vec![ip],
            node: "node-a".into(),
            service_account: app.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            container_ports: vec![],
            probe_ports: vec![],
            host_network: false,
            ready: true,
            terminating: false,
        }
    }

    fn req(principal: Option<&str>, port: u16) -> Request<'_> {
        Request {
            source_principal: principal,
            source_namespace: None,
            source_ip: SourceIp::Known("10.244.0.10".parse().expect("test IP")),
            destination_port: port,
        }
    }

    /// The decision for a connection to `lemo-dev/recall` (app=recall).
    fn decide(c: &Cluster, r: &Request<'_>) -> Decision {
        evaluate(&c.authorization_policies_for(&pod("lemo-dev", "recall")), r)
    }

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{namespace: lemo-dev, name: {name}}}\nspec:\n{spec}\n---\n"
        )
    }

    fn denied(policy: &str, reason: &str) -> Decision {
        Decision::Deny {
            policy: policy.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn principals_exact_prefix_and_suffix() {
        for (principals, want) in [
            ("[cluster.local/ns/lemo-dev/sa/bff]", true),
            ("[cluster.local/ns/lemo-dev/sa/bf]", false),
            ("[\"cluster.local/ns/lemo-dev/*\"]", true),
            ("[\"cluster.local/ns/other/*\"]", false),
            ("[\"*/sa/bff\"]", true),
            ("[\"*/sa/rank\"]", false),
            ("[\"*\"]", true),
        ] {
            let c = cluster(&policy(
                "allow",
                &format!("  rules: [{{from: [{{source: {{principals: {principals}}}}}]}}]"),
            ));
            assert_eq!(
                decide(&c, &req(Some(BFF), 50051)).is_allow(),
                want,
                "{principals}"
            );
        }
    }

    /// A principal is matched as a whole string: the dots of a service account are not
    /// separators, and the longest names are not cut.
    #[test]
    fn principals_with_dots_and_the_longest_names_match_exactly() {
        use crate::identity::Identity;
        let ns63 = format!("n{}", "s".repeat(62));
        let long_sa = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let c = cluster(&policy(
            "allow",
            &format!("  rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/lemo-dev/sa/recall.reader\", \"cluster.local/ns/{ns63}/sa/{long_sa}\"]}}}}]}}]"),
        ));
        let target = pod("lemo-dev", "recall");
        let ip: IpAddr = "10.244.0.10".parse().expect("test IP");
        let decide = |ns: &str, sa: &str| check(&c, &target, Some(&Identity::in_default_domain(ns, sa)), ip, 80).is_allow();
        assert!(decide("lemo-dev", "recall.reader"));
        assert!(decide(&ns63, &long_sa));
        for (ns, sa) in [
            ("lemo-dev", "recall"),
            ("lemo-dev", "recall.reader.v2"),
            ("lemo-dev", "recall-reader"),
            ("lemo-dev", "reader"),
            ("other", "recall.reader"),
            (ns63.as_str(), &long_sa[..252]),
        ] {
            assert!(!decide(ns, sa), "{ns}/{sa} is not an allowed principal");
        }
        // Istio's prefix and suffix wildcards see the dotted name as one string.
        let c = cluster(&policy("allow", "  rules: [{from: [{source: {principals: [\"*/sa/recall.reader\", \"cluster.local/ns/lemo-dev/sa/api.*\"]}}]}]"));
        let decide = |sa: &str| check(&c, &target, Some(&Identity::in_default_domain("lemo-dev", sa)), ip, 80).is_allow();
        assert!(decide("recall.reader") && decide("api.v1") && decide("api.v1.internal"));
        assert!(!decide("reader") && !decide("api") && !decide("apiv1"));
    }

    #[test]
    fn namespaces_and_not_namespaces() {
        let c = cluster(&policy(
            "allow",
            "  rules: [{from: [{source: {namespaces: [\"lemo-*\"], notNamespaces: [lemo-test]}}]}]",
        ));
        assert!(decide(&c, &req(Some(BFF), 80)).is_allow());
        let test = "cluster.local/ns/lemo-test/sa/bff";
        assert!(!decide(&c, &req(Some(test), 80)).is_allow());
        let other = "cluster.local/ns/other/sa/bff";
        assert!(!decide(&c, &req(Some(other), 80)).is_allow());
        // An explicit namespace takes precedence over the principal's.
        let explicit = Request {
            source_namespace: Some("lemo-test"),
            ..req(Some(BFF), 80)
        };
        assert!(!decide(&c, &explicit).is_allow());
    }

    #[test]
    fn ports_and_not_ports() {
        let c = cluster(&policy(
            "allow",
            "  rules:\n  - to: [{operation: {ports: [\"50051\", \"8081\"], notPorts: [\"8081\"]}}]",
        ));
        assert!(decide(&c, &req(None, 50051)).is_allow());
        assert!(!decide(&c, &req(None, 8081)).is_allow());
        assert!(!decide(&c, &req(None, 9090)).is_allow());
    }

    #[test]
    fn rule_needs_from_and_to_sources_are_alternatives() {
        let c = cluster(&policy(
            "allow",
            "  rules:\n  - from: [{source: {principals: [\"*/sa/rank\"]}}, {source: {principals: [\"*/sa/bff\"]}}]\n    to: [{operation: {ports: [\"50051\"]}}]",
        ));
        assert!(decide(&c, &req(Some(BFF), 50051)).is_allow());
        assert!(!decide(&c, &req(Some(BFF), 8081)).is_allow());
        let rerank = "cluster.local/ns/lemo-dev/sa/rerank";
        assert!(!decide(&c, &req(Some(rerank), 50051)).is_allow());
    }

    #[test]
    fn deny_wins_over_allow() {
        let yaml = policy(
            "allow-bff",
            "  rules: [{from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff]}}]}]",
        ) + &policy(
            "deny-metrics",
            "  action: DENY\n  rules: [{to: [{operation: {ports: [\"8081\"]}}]}]",
        );
        let c = cluster(&yaml);
        assert_eq!(decide(&c, &req(Some(BFF), 50051)), Decision::Allow);
        assert_eq!(
            decide(&c, &req(Some(BFF), 8081)),
            denied(
                "lemo-dev/deny-metrics",
                "denied by AuthorizationPolicy lemo-dev/deny-metrics"
            )
        );
        let rank = "cluster.local/ns/lemo-dev/sa/rank";
        assert_eq!(
            decide(&c, &req(Some(rank), 50051)),
            denied(
                "lemo-dev/allow-bff",
                "no ALLOW policy matched (lemo-dev/allow-bff)"
            )
        );
    }

    #[test]
    fn default_allow_when_no_allow_policy_applies() {
        assert_eq!(decide(&Cluster::default(), &req(None, 80)), Decision::Allow);
        // A DENY policy that does not match leaves the default in place, and
        // an ALLOW policy for another workload does not apply.
        let yaml = policy(
            "deny-legacy",
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [legacy]}}]}]",
        ) + &policy(
            "rank-only",
            "  selector: {matchLabels: {app: rank}}\n  rules: [{from: [{source: {namespaces: [x]}}]}]",
        );
        let c = cluster(&yaml);
        assert_eq!(decide(&c, &req(Some(BFF), 80)), Decision::Allow);
        let legacy = "cluster.local/ns/legacy/sa/default";
        assert_eq!(
            decide(&c, &req(Some(legacy), 80)),
            denied(
                "lemo-dev/deny-legacy",
                "denied by AuthorizationPolicy lemo-dev/deny-legacy"
            )
        );
    }

    #[test]
    fn allow_nothing_and_deny_nothing() {
        let c = cluster(&policy("allow-nothing", "  {}"));
        assert_eq!(
            decide(&c, &req(Some(BFF), 80)),
            denied(
                "lemo-dev/allow-nothing",
                "no ALLOW policy matched (lemo-dev/allow-nothing)"
            )
        );
        let c = cluster(&policy("deny-nothing", "  action: DENY"));
        assert!(decide(&c, &req(Some(BFF), 80)).is_allow());
        // A rule with neither from nor to matches every connection.
        let c = cluster(&policy("allow-all", "  rules: [{}]"));
        assert!(decide(&c, &req(None, 80)).is_allow());
    }

    #[test]
    fn unauthenticated_peers() {
        let allow = |source: &str| {
            let c = cluster(&policy(
                "p",
                &format!("  rules: [{{from: [{{source: {source}}}]}}]"),
            ));
            decide(&c, &req(None, 80)).is_allow()
        };
        assert!(!allow("{principals: [\"*\"]}"));
        assert!(!allow("{namespaces: [lemo-dev]}"));
        assert!(allow("{notPrincipals: [\"*\"]}"));
        assert!(allow("{notNamespaces: [lemo-dev]}"));
        // A source namespace alone is not an identity.
        let c = cluster(&policy(
            "p",
            "  rules: [{from: [{source: {namespaces: [lemo-dev]}}]}]",
        ));
        let claimed = Request {
            source_namespace: Some("lemo-dev"),
            ..req(None, 80)
        };
        assert!(!decide(&c, &claimed).is_allow());
    }

    #[test]
    fn ip_blocks() {
        let c = cluster(&policy(
            "p",
            "  rules: [{from: [{source: {ipBlocks: [10.244.0.0/16, \"2001:db8::/32\"], notIpBlocks: [10.244.9.0/24]}}]}]",
        ));
        let from = |ip: &str| Request {
            source_ip: SourceIp::Known(ip.parse().expect("test IP")),
            ..req(None, 80)
        };
        assert!(decide(&c, &from("10.244.1.5")).is_allow());
        assert!(decide(&c, &from("2001:db8::7")).is_allow());
        assert!(decide(&c, &from("::ffff:10.244.1.5")).is_allow());
        assert!(!decide(&c, &from("10.244.9.5")).is_allow());
        assert!(!decide(&c, &from("172.18.0.2")).is_allow());
    }

    /// A tunnelled caller whose address did not check out is judged fail-closed: every DENY
    /// address condition could hold, no ALLOW one can be shown to; rules without addresses
    /// are judged as usual.
    #[test]
    fn unverified_source_addresses_are_judged_fail_closed() {
        let unverified = Request { source_ip: SourceIp::Unverified { proxy: "172.30.0.1".parse().expect("test IP") }, ..req(Some(BFF), 80) };
        for (spec, allowed) in [
            ("  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.244.0.0/24]}}]}]", false),
            ("  action: DENY\n  rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}]", false),
            // The proxy's own address is in this ALLOW block: it must not stand for the caller.
            ("  rules: [{from: [{source: {ipBlocks: [172.30.0.0/24]}}]}]", false),
            ("  rules: [{from: [{source: {notIpBlocks: [10.244.9.0/24]}}]}]", false),
            // Without address conditions the address does not matter.
            ("  action: DENY\n  rules: [{from: [{source: {namespaces: [other]}}]}]", true),
            ("  rules: [{from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff]}}]}]", true),
            // A DENY whose other conditions do not hold still does not apply.
            ("  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.244.0.0/24], namespaces: [other]}}]}]", true),
        ] {
            let c = cluster(&policy("p", spec));
            assert_eq!(decide(&c, &unverified).is_allow(), allowed, "{spec}");
        }
    }

    /// The real caller's address, once known, is what `ipBlocks` sees (not its node proxy's).
    #[test]
    fn ip_blocks_deny_a_pod_cidr() {
        let c = cluster(&policy("p", "  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.244.0.0/24]}}]}]"));
        let target = pod("lemo-dev", "recall");
        let bff = crate::identity::Identity::in_default_domain("lemo-dev", "bff");
        let from = |ip: &str| check(&c, &target, Some(&bff), ip.parse::<IpAddr>().expect("test IP"), 80).is_allow();
        assert!(!from("10.244.0.10"));
        assert!(from("10.244.1.10"));
    }

    #[test]
    fn root_namespace_policies() {
        let yaml = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
            metadata: {namespace: istio-system, name: mesh-deny-legacy}\n\
            spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}\n---\n\
            apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {namespace: istio-system, name: recall-everywhere}\n\
            spec: {selector: {matchLabels: {app: recall}}}\n---\n\
            apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
            metadata: {namespace: other, name: other-ns}\nspec: {}\n";
        let c = cluster(yaml);
        let names = |ns: &str, app: &str| -> Vec<String> {
            c.authorization_policies_for(&pod(ns, app))
                .iter()
                .map(|p| p.id())
                .collect()
        };
        assert_eq!(
            names("lemo-dev", "recall"),
            [
                "istio-system/mesh-deny-legacy",
                "istio-system/recall-everywhere"
            ]
        );
        assert_eq!(names("lemo-dev", "rank"), ["istio-system/mesh-deny-legacy"]);
        assert_eq!(
            names("other", "recall"),
            [
                "istio-system/mesh-deny-legacy",
                "istio-system/recall-everywhere",
                "other/other-ns"
            ]
        );
        let legacy = "cluster.local/ns/legacy/sa/x";
        let rank = pod("lemo-dev", "rank");
        assert_eq!(
            evaluate(&c.authorization_policies_for(&rank), &req(Some(legacy), 80)),
            denied(
                "istio-system/mesh-deny-legacy",
                "denied by AuthorizationPolicy istio-system/mesh-deny-legacy"
            )
        );
        assert!(evaluate(&c.authorization_policies_for(&rank), &req(Some(BFF), 80)).is_allow());
    }

    #[test]
    fn namespace_of_principal() {
        assert_eq!(namespace_of(BFF), Some("lemo-dev"));
        assert_eq!(namespace_of("cluster.local/sa/x"), None);
        assert_eq!(namespace_of("cluster.local/ns//sa/x"), None);
    }
}

/// Whether a connection from `source` may reach `pod` on `port`, under the AuthorizationPolicies
/// that apply to the pod. `source_id` is the authenticated identity (mTLS peer, or a pod on this
/// node whose identity the proxy knows).
pub fn check(cluster: &crate::config::Cluster, pod: &crate::config::Pod, source_id: Option<&crate::identity::Identity>, source_ip: impl Into<SourceIp>, port: u16) -> Decision {
    let policies = cluster.authorization_policies_for(pod);
    if policies.is_empty() {
        return Decision::Allow;
    }
    let principal = source_id.map(|id| format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account));
    evaluate(
        &policies,
        &Request {
            source_principal: principal.as_deref(),
            source_namespace: source_id.map(|id| id.namespace.as_str()),
            source_ip: source_ip.into(),
            destination_port: port,
        },
    )
}
