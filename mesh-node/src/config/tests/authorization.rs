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

#[test]
fn authorization_policy_l4_only_and_unsupported_fields() {
    let spec = r#"  action: CUSTOM
  provider: {name: ext-authz}
  targetRefs: [{kind: Service, name: recall}]
  rules:
    - from:
        - source:
            requestPrincipals: ["*"]
            remoteIpBlocks: [1.2.3.4]
      to:
        - operation: {methods: [GET], paths: ["/admin"], hosts: [recall]}
      when: [{key: "request.headers[x]", values: ["1"]}]
"#;
    let f = "ap.yaml: AuthorizationPolicy lemo-dev/ext";
    let from = "rules[0].from[0].source";
    let to = "rules[0].to[0].operation";
    let l7 = "not supported by mesh (L4 authorization only)";
    assert_problems(
        &[("ap.yaml", &policy("ext", spec))],
        &[
            &format!("{f}: targetRefs: not supported by mesh"),
            &format!("{f}: provider: not supported by mesh"),
            &format!("{f}: action: CUSTOM is not supported by mesh"),
            &format!("{f}: {from}.requestPrincipals: not supported by mesh"),
            &format!("{f}: {from}.remoteIpBlocks: not supported by mesh"),
            &format!("{f}: {to}.hosts: {l7}"),
            &format!("{f}: {to}.methods: {l7}"),
            &format!("{f}: {to}.paths: {l7}"),
            &format!("{f}: rules[0].when: not supported by mesh"),
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
