//! Per-object validation for config that arrives object by object (Kubernetes mode): an
//! invalid object is held back, at its last good version when there is one, and the rest is
//! applied. File mode stays all-or-nothing (`mesh-node validate` fails, the watcher keeps the
//! last good directory): a directory is edited as a whole and checked before it ships, while
//! API objects are written by many people at different times, and one bad DestinationRule must
//! not freeze every Pod and Service update of the cluster. Istio behaves the same way: an
//! object its webhook did not catch is skipped by istiod, the rest of the config is pushed.

use std::collections::BTreeMap;
use std::fmt;

use super::assemble::{Kept, ObjectKey, assemble_per_object};
use super::cluster::Cluster;
use super::error::Problem;
use super::load::{self, Source};
use super::tunnels::TunnelMode;

/// Builds [`Cluster`]s from successive versions of the same objects, remembering what was
/// applied so a later invalid version of an object can fall back to it.
#[derive(Default)]
pub struct PerObjectBuilder {
    last_good: BTreeMap<ObjectKey, Kept>,
    /// Without a CA, objects needing peer identities are held back like invalid ones.
    mode: TunnelMode,
}

/// An object that was not applied as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedObject {
    /// `Kind namespace/name` (`Kind name` for cluster-scoped kinds).
    pub object: String,
    /// What is wrong, each naming the field.
    pub problems: Vec<Problem>,
    /// Its last good version is still applied; otherwise the object is left out, or, for a
    /// policy, applied in its most restrictive reading (`fail_closed`).
    pub kept_previous: bool,
    /// A new AuthorizationPolicy (deny-all) or PeerAuthentication (STRICT) applied in its
    /// most restrictive reading for what it selects, so a broken policy fails closed.
    pub fail_closed: bool,
}

impl fmt::Display for RejectedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = if self.kept_previous {
            "keeping its last good version"
        } else if self.fail_closed {
            super::fail_closed::describe(&self.object)
        } else {
            "left out"
        };
        write!(f, "{} rejected ({outcome}): ", self.object)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match &p.field {
                Some(field) => write!(f, "{field}: {}", p.message)?,
                None => f.write_str(&p.message)?,
            }
        }
        Ok(())
    }
}

/// One build: the model to publish and what was held back.
#[derive(Debug)]
pub struct PerObjectBuild {
    pub cluster: Cluster,
    /// In kind, namespace, name order.
    pub rejected: Vec<RejectedObject>,
    /// Problems that name no single object (an unnamed document, a duplicate definition);
    /// they hold nothing back.
    pub other: Vec<Problem>,
}

impl PerObjectBuilder {
    pub fn new() -> PerObjectBuilder {
        PerObjectBuilder::default()
    }

    /// A builder for a node whose tunnels are secured as `mode` says.
    pub fn for_tunnels(mode: TunnelMode) -> PerObjectBuilder {
        PerObjectBuilder { last_good: BTreeMap::new(), mode }
    }

    /// Builds from in-memory files (`(name, yaml)`), one or more objects each. Objects that
    /// are not in `files` any more are forgotten, valid or not: a deletion is applied.
    pub fn build<'a>(&mut self, files: impl IntoIterator<Item = (&'a str, &'a str)>) -> PerObjectBuild {
        let sources: Vec<Source> =
            files.into_iter().map(|(rel, text)| Source { rel: rel.to_string(), text: text.to_string() }).collect();
        let built = assemble_per_object(&sources, &self.last_good, self.mode);
        let mut cluster = built.cluster;
        // Over what was applied, not the input: a rejected edit that leaves the applied
        // objects as they were yields the same fingerprint.
        // The fail-closed stand-ins are applied too: a new broken policy must change it, or
        // it would not be published.
        let applied: Vec<Source> = built
            .applied
            .values()
            .chain(&built.fail_closed)
            .map(|k| Source {
                rel: k.origin.display(),
                text: serde_yaml::to_string(&k.value).unwrap_or_default(),
            })
            .collect();
        cluster.fingerprint = load::fingerprint(&applied);
        self.last_good = built.applied;
        PerObjectBuild {
            cluster,
            rejected: built
                .rejected
                .into_iter()
                .map(|r| RejectedObject {
                    object: r.display,
                    problems: r.problems,
                    kept_previous: r.kept_previous,
                    fail_closed: r.fail_closed,
                })
                .collect(),
            other: built.other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthzAction, MtlsMode};

    const CLUSTER: &str = include_str!("../../../deploy/examples/lemo-dev/cluster.yaml");
    const DESTINATION_RULES: &str = include_str!("../../../deploy/examples/lemo-dev/destination-rules.yaml");
    const VIRTUAL_SERVICES: &str = include_str!("../../../deploy/examples/lemo-dev/virtual-services.yaml");

    /// A file set: the sample plus `extra`, and a replaced DestinationRule or VirtualService
    /// when given.
    fn files<'a>(dr: &'a str, vs: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut out = vec![("cluster.yaml", CLUSTER), ("destination-rules.yaml", dr), ("virtual-services.yaml", vs)];
        out.extend_from_slice(extra);
        out
    }

    fn bad_interval_dr() -> String {
        DESTINATION_RULES.replace("interval: 10s", "interval: ten")
    }

    fn interval_of(c: &Cluster) -> String {
        let dr = c.destination_rules().find(|d| d.name == "recall").expect("recall DestinationRule");
        format!("{:?}", dr.traffic_policy.as_ref().and_then(|t| t.outlier_detection.as_ref()).and_then(|o| o.interval))
    }

    const EXTRA_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  namespace: lemo-dev
  name: extra
spec:
  clusterIP: 10.96.0.99
  selector:
    app: recall
  ports:
    - name: http
      port: 8080
"#;

    #[test]
    fn a_new_invalid_object_is_left_out_and_the_rest_applied() {
        let mut b = PerObjectBuilder::new();
        let bad = bad_interval_dr();
        let built = b.build(files(&bad, VIRTUAL_SERVICES, &[("extra.yaml", EXTRA_SERVICE)]));
        // The rule is left out, and with it the VirtualService whose subsets it defined; the
        // rest (pods, the new Service) is applied.
        assert!(built.cluster.destination_rules().next().is_none());
        assert!(built.cluster.service("lemo-dev", "extra").is_some());
        assert_eq!(built.cluster.pods().count(), 6);
        assert_eq!(built.rejected.len(), 2, "{:?}", built.rejected);
        let dr = &built.rejected[0];
        assert_eq!(dr.object, "DestinationRule lemo-dev/recall");
        assert!(!dr.kept_previous);
        assert_eq!(
            dr.to_string(),
            "DestinationRule lemo-dev/recall rejected (left out): trafficPolicy.outlierDetection.interval: \"ten\" is not a duration"
        );
        assert_eq!(dr.problems[0].file, "destination-rules.yaml");
        let vs = &built.rejected[1];
        assert_eq!(vs.object, "VirtualService lemo-dev/recall");
        assert!(vs.to_string().contains("subset \"v2\" is not defined by any DestinationRule"), "{vs}");
        assert!(built.cluster.virtual_services().next().is_none());
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_version_and_other_updates_apply() {
        let mut b = PerObjectBuilder::new();
        let good = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[]));
        assert!(good.rejected.is_empty() && good.other.is_empty());
        assert_eq!(interval_of(&good.cluster), "Some(10s)");

        // The same build breaks the rule and adds a Service.
        let bad = bad_interval_dr();
        let built = b.build(files(&bad, VIRTUAL_SERVICES, &[("extra.yaml", EXTRA_SERVICE)]));
        assert_eq!(interval_of(&built.cluster), "Some(10s)", "the last good rule stays");
        assert!(built.cluster.service("lemo-dev", "extra").is_some(), "the new Service is applied");
        assert_eq!(built.cluster.virtual_services().count(), 1, "its subsets still exist");
        assert_eq!(built.rejected.len(), 1);
        assert!(built.rejected[0].kept_previous);
        assert!(built.rejected[0].to_string().starts_with("DestinationRule lemo-dev/recall rejected (keeping its last good version): trafficPolicy.outlierDetection.interval"));

        // Still broken on the next build: still the old version.
        let again = b.build(files(&bad, VIRTUAL_SERVICES, &[]));
        assert_eq!(interval_of(&again.cluster), "Some(10s)");
        assert!(again.cluster.service("lemo-dev", "extra").is_none(), "a deletion applies");

        // Fixed with a new value: applied, nothing held back.
        let fixed = DESTINATION_RULES.replace("interval: 10s", "interval: 20s");
        let fixed = b.build(files(&fixed, VIRTUAL_SERVICES, &[]));
        assert!(fixed.rejected.is_empty());
        assert_eq!(interval_of(&fixed.cluster), "Some(20s)");
    }

    #[test]
    fn a_cross_object_problem_falls_back_then_leaves_out() {
        let mut b = PerObjectBuilder::new();
        b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[]));
        // The VirtualService now routes to a subset nobody defines: its last version stays.
        let vs = VIRTUAL_SERVICES.replacen("subset: v2", "subset: v3", 1);
        let built = b.build(files(DESTINATION_RULES, &vs, &[]));
        assert_eq!(built.rejected.len(), 1);
        assert!(built.rejected[0].kept_previous);
        assert!(built.rejected[0].to_string().contains("http[0].route[0].destination.subset: subset \"v3\" is not defined"), "{}", built.rejected[0]);
        let kept = built.cluster.virtual_services().next().expect("kept").clone();
        assert!(format!("{kept:?}").contains("\"v2\"") && !format!("{kept:?}").contains("\"v3\""));

        // The rule drops subset v2: the old VirtualService is no longer valid either, so it
        // is left out rather than routing into nothing; the rule itself is applied.
        let dr = DESTINATION_RULES.replace("    - name: v2\n      labels:\n        version: v2\n", "");
        let built = b.build(files(&dr, &vs, &[]));
        assert!(built.cluster.virtual_services().next().is_none());
        assert_eq!(built.cluster.destination_rules().next().expect("rule").subsets.len(), 1);
        assert_eq!(built.rejected.len(), 1);
        assert!(!built.rejected[0].kept_previous);
        assert!(built.rejected[0].problems.len() >= 2, "the new and the kept version's problems: {:?}", built.rejected[0]);
    }

    #[test]
    fn a_conflict_is_blamed_on_the_newcomer() {
        let mut b = PerObjectBuilder::new();
        b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[]));
        // A pod sorting before bff-0 takes bff-0's IP: in file mode the later one in file
        // order is reported; here the one already applied keeps it.
        let intruder = r#"
apiVersion: v1
kind: Pod
metadata:
  namespace: lemo-dev
  name: aaa-intruder
spec:
  nodeName: node-a
  containers:
    - name: x
      image: x
status:
  podIP: 10.244.0.10
"#;
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("intruder.yaml", intruder)]));
        assert_eq!(built.rejected.len(), 1, "{:?}", built.rejected);
        assert_eq!(built.rejected[0].object, "Pod lemo-dev/aaa-intruder");
        assert!(built.rejected[0].to_string().contains("status.podIP: 10.244.0.10 is already used by Pod lemo-dev/bff-0"));
        let owner = built.cluster.pod_by_ip("10.244.0.10".parse().expect("ip")).expect("owner");
        assert_eq!(owner.name, "bff-0");
        // File mode rejects the whole input.
        let strict = Cluster::from_yaml_files(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("intruder.yaml", intruder)]));
        assert!(strict.is_err());
    }

    #[test]
    fn unnamed_documents_and_duplicates_are_reported_without_holding_anything_back() {
        let mut b = PerObjectBuilder::new();
        let nameless = "apiVersion: v1\nkind: Service\nmetadata: {}\n";
        let dup = CLUSTER.split("---").find(|d| d.contains("name: rank-0")).expect("rank-0");
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("nameless.yaml", nameless), ("dup.yaml", dup)]));
        assert!(built.rejected.is_empty(), "{:?}", built.rejected);
        let lines: Vec<String> = built.other.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "nameless.yaml: Service (document 1): metadata.name: is required",
                "dup.yaml: Pod lemo-dev/rank-0: duplicate object (first defined in cluster.yaml)",
            ]
        );
        assert!(built.cluster.pods().any(|p| p.name == "rank-0"));
    }

    #[test]
    fn the_fingerprint_follows_what_is_applied() {
        let mut b = PerObjectBuilder::new();
        let first = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[])).cluster.fingerprint();
        let bad = bad_interval_dr();
        let held = b.build(files(&bad, VIRTUAL_SERVICES, &[])).cluster.fingerprint();
        assert_eq!(first, held, "a rejected edit changes nothing applied");
        let other = DESTINATION_RULES.replace("interval: 10s", "interval: 20s");
        assert_ne!(first, b.build(files(&other, VIRTUAL_SERVICES, &[])).cluster.fingerprint());
    }

    // ---- fail closed: a new policy that cannot be read is applied in its most restrictive
    // reading; an update of an applied one keeps its last good version.

    fn ap(name: &str, spec: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{namespace: lemo-dev, name: {name}}}\nspec:\n{spec}\n")
    }

    /// Whether rank-0 accepts bff on its port.
    fn rank_admits_bff(c: &Cluster) -> bool {
        let rank = c.pod("lemo-dev", "rank-0").expect("rank-0");
        let req = crate::authz::Request {
            source_principal: Some("cluster.local/ns/lemo-dev/sa/bff"),
            source_namespace: None,
            source_ip: "10.244.0.10".parse::<std::net::IpAddr>().expect("ip").into(),
            destination_port: 50061,
        };
        crate::authz::evaluate(&c.authorization_policies_for(rank), &req).is_allow()
    }

    const ALLOW_BFF: &str = "  selector: {matchLabels: {app: rank}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff]}}]}]";
    const ALLOW_BFF_BAD_CIDR: &str = "  selector: {matchLabels: {app: rank}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff], ipBlocks: [10.0.0.0/33]}}]}]";

    #[test]
    fn a_new_unreadable_authorization_policy_denies_all_for_its_selector() {
        let mut b = PerObjectBuilder::new();
        let bad = ap("rank", ALLOW_BFF_BAD_CIDR);
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", bad.as_str())]));
        assert_eq!(built.rejected.len(), 1, "{:?}", built.rejected);
        let r = &built.rejected[0];
        assert!(r.fail_closed && !r.kept_previous);
        assert_eq!(
            r.to_string(),
            "AuthorizationPolicy lemo-dev/rank rejected (applied as deny-all for what it selects): rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block"
        );
        let p = built.cluster.authorization_policies().find(|p| p.name == "rank").expect("stand-in applied");
        assert_eq!((p.action, p.rules.len()), (AuthzAction::Allow, 0), "allows nothing");
        assert_eq!(p.selector, Some([("app".to_string(), "rank".to_string())].into()));
        assert!(!rank_admits_bff(&built.cluster));
        // Other workloads are not touched.
        let recall = built.cluster.pod("lemo-dev", "recall-0").expect("recall-0");
        assert!(built.cluster.authorization_policies_for(recall).is_empty());

        // The stand-in is never a "last good version": fixed, the policy applies as written.
        let good = ap("rank", ALLOW_BFF);
        let fixed = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", good.as_str())]));
        assert!(fixed.rejected.is_empty());
        assert!(rank_admits_bff(&fixed.cluster));
        // Broken again: now its last good version stays.
        let again = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", bad.as_str())]));
        assert!(again.rejected[0].kept_previous && !again.rejected[0].fail_closed);
        assert!(rank_admits_bff(&again.cluster));
    }

    #[test]
    fn without_a_ca_the_deny_all_stand_in_still_applies() {
        // Plaintext tunnels make principal rules invalid; the stand-in names none, so it stays.
        let mut b = PerObjectBuilder::for_tunnels(TunnelMode::Plaintext);
        let bad = ap("rank", ALLOW_BFF_BAD_CIDR);
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", bad.as_str())]));
        assert!(built.rejected[0].fail_closed, "{:?}", built.rejected);
        assert!(!rank_admits_bff(&built.cluster));
    }

    #[test]
    fn a_new_unreadable_deny_policy_denies_everything() {
        let mut b = PerObjectBuilder::new();
        // Not even the action's neighbours can be read: an unknown field.
        let bad = ap("deny", "  action: DENY\n  rules: [{from: [{source: {principal: [x]}}]}]");
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", bad.as_str())]));
        assert!(built.rejected[0].fail_closed);
        let p = built.cluster.authorization_policies().next().expect("stand-in");
        assert_eq!((p.action, p.selector.clone(), p.rules.len()), (AuthzAction::Deny, None, 1));
        assert!(!rank_admits_bff(&built.cluster), "namespace-wide: rank too");
        // The stand-in is published: the model's fingerprint differs from the one without it.
        let without = PerObjectBuilder::new().build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[])).cluster.fingerprint();
        assert_ne!(built.cluster.fingerprint(), without);
    }

    #[test]
    fn an_http_attribute_is_applied_with_a_warning_not_held_back() {
        let mut b = PerObjectBuilder::new();
        let l7 = ap("l7", "  selector: {matchLabels: {app: rank}}\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]");
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("ap.yaml", l7.as_str())]));
        assert!(built.rejected.is_empty(), "{:?}", built.rejected);
        assert!(!rank_admits_bff(&built.cluster), "the only ALLOW rule matches nothing");
        let w: Vec<String> = built.cluster.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("ap.yaml: AuthorizationPolicy lemo-dev/l7: rules[0].to[0].operation.paths: not enforceable at L4"), "{w:?}");
    }

    #[test]
    fn a_new_unreadable_peer_authentication_is_strict_for_its_selector() {
        let mut b = PerObjectBuilder::new();
        let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {namespace: lemo-dev, name: rank}\nspec:\n  selector: {matchLabels: {app: rank}}\n  mtls: {mode: STRICTT}\n";
        let built = b.build(files(DESTINATION_RULES, VIRTUAL_SERVICES, &[("pa.yaml", pa)]));
        assert_eq!(built.rejected.len(), 1);
        assert!(built.rejected[0].fail_closed);
        assert!(built.rejected[0].to_string().starts_with("PeerAuthentication lemo-dev/rank rejected (applied as STRICT for what it selects): mtls.mode: "), "{}", built.rejected[0]);
        let c = &built.cluster;
        let rank = c.pod("lemo-dev", "rank-0").expect("rank-0");
        let recall = c.pod("lemo-dev", "recall-0").expect("recall-0");
        assert_eq!(c.mtls_mode_for(rank, 50061), MtlsMode::Strict);
        assert_eq!(c.mtls_mode_for(recall, 50051), MtlsMode::Permissive, "not selected");
    }
}
