//! AuthorizationPolicy: the lemo-dev example, lookups and validation lines.

use super::*;
use crate::authz::{Decision, Request, evaluate};

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
         metadata: {{namespace: lemo-dev, name: {name}}}\nspec:\n{spec}\n"
    )
}

#[test]
fn example_allows_recall_only_from_bff() {
    let c = sample();
    let recall = c.pod_by_ip(ip("10.244.0.11")).expect("recall-0");
    let bff = c.pod_by_ip(ip("10.244.0.10")).expect("bff-0");
    let policies = c.authorization_policies_for(recall);
    assert_eq!(policies.len(), 1);
    let p = policies[0];
    assert_eq!(
        (p.id(), p.action, p.selector.clone()),
        (
            "lemo-dev/recall-from-bff".to_string(),
            AuthzAction::Allow,
            Some([("app".to_string(), "recall".to_string())].into())
        )
    );
    // The principal the proxy derives from the BFF pod's service account.
    let principal = format!(
        "cluster.local/ns/{}/sa/{}",
        bff.namespace, bff.service_account
    );
    fn from(principal: Option<&str>, ip: IpAddr) -> Request<'_> {
        Request {
            source_principal: principal,
            source_namespace: None,
            source_ip: ip.into(),
            destination_port: 50051,
        }
    }
    assert_eq!(
        evaluate(&policies, &from(Some(&principal), bff.ip)),
        Decision::Allow
    );
    assert_eq!(
        evaluate(
            &policies,
            &from(Some("cluster.local/ns/lemo-dev/sa/rank"), bff.ip)
        ),
        Decision::Deny {
            policy: "lemo-dev/recall-from-bff".into(),
            reason: "no ALLOW policy matched (lemo-dev/recall-from-bff)".into(),
        }
    );
    assert!(!evaluate(&policies, &from(None, bff.ip)).is_allow());
    // Workloads no policy selects keep the default (allow).
    let rank = c.pod_by_ip(ip("10.244.0.20")).expect("rank-0");
    assert!(c.authorization_policies_for(rank).is_empty());
}

#[test]
fn authorization_policy_is_typed() {
    let spec = r#"  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/a/*"]
            notNamespaces: ["*-test"]
            ipBlocks: [10.0.0.0/8, "2001:db8::1"]
      to:
        - operation: {ports: ["8080", 9090], notPorts: ["9091"]}
"#;
    let yaml = policy("typed", spec);
    let mut files = sample_files();
    files.push(("typed.yaml", &yaml));
    let c = Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("{e}"));
    let p = c
        .authorization_policies()
        .find(|p| p.name == "typed")
        .expect("typed");
    let block = |s: &str| IpBlock::parse(s).expect("block");
    assert_eq!(
        p.rules,
        [AuthzRule {
            from: vec![AuthzSource {
                principals: vec![Wildcard::Prefix("cluster.local/ns/a/".into())],
                not_namespaces: vec![Wildcard::Suffix("-test".into())],
                ip_blocks: vec![block("10.0.0.0/8"), block("2001:db8::1/128")],
                ..AuthzSource::default()
            }],
            to: vec![AuthzOperation {
                ports: vec![8080, 9090],
                not_ports: vec![9091],
            }],
        }]
    );
    assert_eq!(p.action, AuthzAction::Deny);
    assert_eq!(p.selector, None);
}

/// The policy-level fields stay errors: no reading of them is more restrictive than
/// another (ztunnel does not apply such policies at all).
#[test]
fn policy_level_fields_the_proxy_cannot_apply_stay_errors() {
    let spec = r#"  action: CUSTOM
  provider: {name: ext-authz}
  targetRefs: [{kind: Service, name: recall}]
  rules:
    - to:
        - operation: {methods: [GET], paths: ["/admin"], hosts: [recall]}
"#;
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/ext";
    assert_problems(
        &[("ap.yaml", &policy("ext", spec))],
        &[
            &format!("{f}: targetRefs: not supported by mesh"),
            &format!("{f}: provider: not supported by mesh"),
            &format!("{f}: action: CUSTOM is not supported by mesh"),
        ],
    );
    let audit = policy(
        "audit",
        "  action: AUDIT\n  targetRef: {kind: Service, name: x}",
    );
    assert_problems(
        &[("ap.yaml", &audit)],
        &[
            "ap.yaml: AuthorizationPolicy lemo-dev/audit: targetRef: not supported by mesh",
            "ap.yaml: AuthorizationPolicy lemo-dev/audit: action: AUDIT is not supported by mesh",
        ],
    );
}

/// The sample plus `extra`, which must load (warnings allowed).
fn load_with(extra: &[(&str, &str)]) -> Cluster {
    let mut files = sample_files();
    files.extend_from_slice(extra);
    Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("must load:\n{e}"))
}

/// Whether the pod at `pod_ip` accepts a connection from `sa` (in lemo-dev) on `port`.
fn admits(c: &Cluster, pod_ip: &str, sa: Option<&str>, port: u16) -> bool {
    let pod = c.pod_by_ip(ip(pod_ip)).expect("pod");
    let principal = sa.map(|sa| format!("cluster.local/ns/lemo-dev/sa/{sa}"));
    let req = Request {
        source_principal: principal.as_deref(),
        source_namespace: None,
        source_ip: ip("10.244.0.10").into(),
        destination_port: port,
    };
    evaluate(&c.authorization_policies_for(pod), &req).is_allow()
}

const RANK: &str = "10.244.0.20";

fn warnings(c: &Cluster) -> Vec<String> {
    c.warnings().iter().map(ToString::to_string).collect()
}

#[test]
fn an_allow_rule_with_http_attributes_matches_nothing() {
    // Every HTTP attribute, each in a rule of its own, plus one plain L4 rule.
    let spec = r#"  selector: {matchLabels: {app: rank}}
  rules:
    - to: [{operation: {paths: ["/admin"]}}]
    - from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff]}}]
      to: [{operation: {ports: ["50061"], methods: [GET]}}]
    - from: [{source: {requestPrincipals: ["*"], namespaces: [lemo-dev]}}]
    - from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/recall]}}]
      when: [{key: source.ip, values: [10.244.0.10]}]
    - from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/rerank]}}]
"#;
    let c = load_with(&[("ap.yaml", &policy("l7", spec))]);
    // Each rule with an HTTP attribute is dropped, not the policy: rerank's rule applies.
    assert!(admits(&c, RANK, Some("rerank"), 50061));
    for sa in [Some("bff"), Some("recall"), Some("rank"), None] {
        assert!(!admits(&c, RANK, sa, 50061), "{sa:?}");
    }
    let rule = |i: usize| format!("not enforceable at L4 (mesh authorizes connections, not requests): ALLOW rule rules[{i}] matches nothing, as in ztunnel");
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/l7";
    assert_eq!(
        warnings(&c),
        [
            format!("{f}: rules[0].to[0].operation.paths: {}", rule(0)),
            format!("{f}: rules[1].to[0].operation.methods: {}", rule(1)),
            format!("{f}: rules[2].from[0].source.requestPrincipals: {}", rule(2)),
            format!("{f}: rules[3].when: {}", rule(3)),
        ]
    );
    let p = c.authorization_policies().find(|p| p.name == "l7").expect("applied");
    assert_eq!(p.rules.len(), 1);
}

#[test]
fn an_allow_policy_with_only_http_rules_denies_everything() {
    let spec = "  selector: {matchLabels: {app: rank}}\n  rules: [{to: [{operation: {paths: [\"/admin\"], hosts: [rank]}}]}]";
    let c = load_with(&[("ap.yaml", &policy("admin-only", spec))]);
    for sa in [Some("bff"), Some("rank"), None] {
        assert!(!admits(&c, RANK, sa, 50061), "{sa:?}");
    }
    // Unselected workloads keep their own policies (recall: bff only).
    assert!(admits(&c, "10.244.0.11", Some("bff"), 50051));
    assert_eq!(c.warnings().len(), 2, "{:?}", warnings(&c));
}

#[test]
fn a_deny_rule_with_http_attributes_keeps_its_l4_fields() {
    let spec = r#"  selector: {matchLabels: {app: rank}}
  action: DENY
  rules:
    - from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/recall], notRequestPrincipals: ["*"]}}]
      to: [{operation: {ports: ["50061"], paths: ["/admin"], notMethods: [GET]}}]
      when: [{key: "request.headers[x-debug]", values: ["1"]}]
"#;
    let c = load_with(&[("ap.yaml", &policy("no-admin", spec))]);
    // Denied whatever the request: its principal and port match.
    assert!(!admits(&c, RANK, Some("recall"), 50061));
    // The L4 fields still narrow it: another caller, another port.
    assert!(admits(&c, RANK, Some("bff"), 50061));
    assert!(admits(&c, RANK, Some("recall"), 9999));
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/no-admin";
    let m = "not enforceable at L4 (mesh authorizes connections, not requests): ignored, DENY rule rules[0] denies every connection its L4 fields match, as in ztunnel";
    assert_eq!(
        warnings(&c),
        [
            format!("{f}: rules[0].from[0].source.notRequestPrincipals: {m}"),
            format!("{f}: rules[0].to[0].operation.notMethods: {m}"),
            format!("{f}: rules[0].to[0].operation.paths: {m}"),
            format!("{f}: rules[0].when: {m}"),
        ]
    );
}

#[test]
fn a_deny_rule_with_only_http_attributes_denies_everything() {
    let spec = "  selector: {matchLabels: {app: rank}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin\"]}}]}]";
    let c = load_with(&[("ap.yaml", &policy("deny-admin", spec))]);
    for (sa, port) in [(Some("bff"), 50061), (None, 50061), (Some("rank"), 1)] {
        assert!(!admits(&c, RANK, sa, port), "{sa:?} {port}");
    }
}

#[test]
fn malformed_values_next_to_http_attributes_still_reject_the_config() {
    let spec = "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}], to: [{operation: {paths: [\"/x\"]}}]}]";
    assert_problems(
        &[("ap.yaml", &policy("bad", spec))],
        &["ap.yaml: AuthorizationPolicy lemo-dev/bad: rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block"],
    );
}

#[test]
fn the_example_has_no_warnings() {
    assert!(sample().warnings().is_empty(), "{:?}", warnings(&sample()));
}

#[test]
fn authorization_policy_value_checks() {
    let spec = r#"  rules:
    - from:
        - source:
            principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/*/sa/b", ""]
            namespaces: ["a*b"]
            ipBlocks: [10.0.0.0/33, 10.0.0.300, not-an-ip]
        - source: {}
        - {}
      to:
        - operation: {ports: ["80", "0", "65536", "http", "+80"], notPorts: [" "]}
        - {}
    - from: []
      to: []
"#;
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/bad";
    let src = "rules[0].from[0].source";
    let op = "rules[0].to[0].operation";
    assert_problems(
        &[("ap.yaml", &policy("bad", spec))],
        &[
            &format!(
                "{f}: {src}.principals[0]: \"spiffe://cluster.local/ns/a/sa/b\" must not include spiffe:// (write <trust-domain>/ns/<ns>/sa/<sa>)"
            ),
            &format!(
                "{f}: {src}.principals[1]: \"cluster.local/*/sa/b\" has a * in the middle (only *, prefix* and *suffix are supported)"
            ),
            &format!("{f}: {src}.principals[2]: must not be empty"),
            &format!(
                "{f}: {src}.namespaces[0]: \"a*b\" has a * in the middle (only *, prefix* and *suffix are supported)"
            ),
            &format!("{f}: {src}.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address or CIDR block"),
            &format!("{f}: {src}.ipBlocks[1]: \"10.0.0.300\" is not an IP address or CIDR block"),
            &format!("{f}: {src}.ipBlocks[2]: \"not-an-ip\" is not an IP address or CIDR block"),
            &format!("{f}: rules[0].from[1].source: must set at least one field"),
            &format!("{f}: rules[0].from[2].source: is required"),
            &format!("{f}: {op}.ports[1]: 0 is not a valid port (1-65535)"),
            &format!("{f}: {op}.ports[2]: 65536 is not a valid port (1-65535)"),
            &format!("{f}: {op}.ports[3]: \"http\" is not a port number"),
            &format!("{f}: {op}.ports[4]: \"+80\" is not a port number"),
            &format!("{f}: {op}.notPorts[0]: \" \" is not a port number"),
            &format!("{f}: rules[0].to[1].operation: is required"),
            &format!("{f}: rules[1].from: must not be empty"),
            &format!("{f}: rules[1].to: must not be empty"),
        ],
    );
}

#[test]
fn authorization_policy_structural_errors() {
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/bad";
    for (spec, want) in [
        (
            "  rules: [{from: [{source: {principal: [x]}}]}]",
            "rules[0].from[0].source.principal: unknown field (expected one of: ",
        ),
        (
            "  action: REJECT",
            "action: \"REJECT\" is not one of ALLOW, DENY, AUDIT, CUSTOM",
        ),
        (
            "  rules: [{to: [{operation: {ports: 80}}]}]",
            "rules[0].to[0].operation.ports: ",
        ),
    ] {
        let got = problems_with(&[("ap.yaml", &policy("bad", spec))]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with(&format!("{f}: {want}")), "{got:?}");
    }
}
