//! `AuthorizationPolicy`, L4 part: the validated model and its checks. The
//! evaluation lives in `crate::authz`.

use std::collections::BTreeMap;

use super::authz_values::{IpBlock, Wildcard};
use super::{common, raw, unsupported};
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    /// `selector.matchLabels`; `None` (or empty) applies to the whole
    /// namespace, or to the whole mesh when in the root namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: AuthzAction,
    /// No rules: an ALLOW policy allows nothing, a DENY policy denies nothing.
    pub rules: Vec<AuthzRule>,
}

impl AuthorizationPolicy {
    /// `namespace/name`, how decisions and logs name the policy.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// AUDIT and CUSTOM are rejected by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// Matches when some `from` entry and some `to` entry match; an empty list
/// matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzRule {
    pub from: Vec<AuthzSource>,
    pub to: Vec<AuthzOperation>,
}

/// Every non-empty field must match; a list matches when any element does,
/// a `not_*` list when none does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzSource {
    /// `cluster.local/ns/<ns>/sa/<sa>`, without `spiffe://`, as Istio writes them.
    pub principals: Vec<Wildcard>,
    pub not_principals: Vec<Wildcard>,
    pub namespaces: Vec<Wildcard>,
    pub not_namespaces: Vec<Wildcard>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
}

/// Destination ports: the workload's container port the connection is for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzOperation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

pub(crate) fn convert(
    spec: &raw::AuthorizationPolicySpec,
    namespace: &str,
    name: &str,
    r: &mut Reporter<'_>,
) -> AuthorizationPolicy {
    unsupported::authorization_policy(r, spec);
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|labels| !labels.is_empty());
    let action = match spec.action {
        Some(raw::AuthorizationAction::Deny) => AuthzAction::Deny,
        // AUDIT and CUSTOM were reported above; the value never reaches a
        // loaded config.
        _ => AuthzAction::Allow,
    };
    let rules_path = FieldPath::root().key("rules");
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let path = rules_path.index(i);
        // Converted even when dropped below, so malformed values stay errors.
        let converted = convert_rule(r, &path, rule);
        let l7 = l7_fields(&path, rule);
        for field in &l7 {
            r.warn(field, l7_message(action, &path));
        }
        // ztunnel: "L7 policies never match for ALLOW. For DENY they will always match, so it
        // is more restrictive" (istio/istio pilot/pkg/serviceregistry/kube/controller/ambient/
        // authorization.go, handleRule). An ALLOW rule naming an HTTP attribute is dropped, so
        // it allows nothing (an ALLOW policy left without rules allows nothing at all); a DENY
        // rule keeps its L4 fields (`convert_rule` never reads the HTTP ones), so it denies
        // every connection they match, whatever the request would have been.
        if action == AuthzAction::Deny || l7.is_empty() {
            rules.push(converted);
        }
    }
    AuthorizationPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        selector,
        action,
        rules,
    }
}

/// Every field of `rule` the proxy cannot check on a connection: the HTTP attributes of
/// `to.operation`, the request-level ones of `from.source`, and `when` (none of its keys is
/// evaluated here: the L4 keys Istio's ztunnel reads, `source.ip`, `source.namespace`,
/// `source.principal`, `destination.ip` and `destination.port`, are treated like the HTTP
/// ones, which is more restrictive than ztunnel, never less).
fn l7_fields(path: &FieldPath, rule: &raw::AuthorizationRule) -> Vec<FieldPath> {
    let mut out = Vec::new();
    let mut push = |base: &FieldPath, fields: &[(&str, bool)]| {
        out.extend(fields.iter().filter(|(_, set)| *set).map(|(f, _)| base.key(*f)));
    };
    for (j, from) in rule.from.iter().flatten().enumerate() {
        let Some(s) = &from.source else { continue };
        push(
            &path.key("from").index(j).key("source"),
            &[
                ("requestPrincipals", !s.request_principals.is_empty()),
                ("notRequestPrincipals", !s.not_request_principals.is_empty()),
                ("remoteIpBlocks", !s.remote_ip_blocks.is_empty()),
                ("notRemoteIpBlocks", !s.not_remote_ip_blocks.is_empty()),
            ],
        );
    }
    for (j, to) in rule.to.iter().flatten().enumerate() {
        let Some(o) = &to.operation else { continue };
        push(
            &path.key("to").index(j).key("operation"),
            &[
                ("hosts", !o.hosts.is_empty()),
                ("notHosts", !o.not_hosts.is_empty()),
                ("methods", !o.methods.is_empty()),
                ("notMethods", !o.not_methods.is_empty()),
                ("paths", !o.paths.is_empty()),
                ("notPaths", !o.not_paths.is_empty()),
            ],
        );
    }
    push(path, &[("when", !rule.when.is_empty())]);
    out
}

/// What the proxy does instead, said on each unenforceable field.
fn l7_message(action: AuthzAction, rule: &FieldPath) -> String {
    match action {
        AuthzAction::Allow => format!(
            "not enforceable at L4 (mesh authorizes connections, not requests): ALLOW rule {rule} matches nothing, as in ztunnel"
        ),
        AuthzAction::Deny => format!(
            "not enforceable at L4 (mesh authorizes connections, not requests): ignored, DENY rule {rule} denies every connection its L4 fields match, as in ztunnel"
        ),
    }
}

fn convert_rule(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    rule: &raw::AuthorizationRule,
) -> AuthzRule {
    // Istio refuses `from: []` and `to: []`: read as "any", they would widen
    // a rule the author meant to narrow.
    for (field, empty) in [
        ("from", rule.from.as_ref().is_some_and(Vec::is_empty)),
        ("to", rule.to.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            r.at(&path.key(field), "must not be empty");
        }
    }
    let mut out = AuthzRule::default();
    for (j, from) in rule.from.iter().flatten().enumerate() {
        let path = path.key("from").index(j).key("source");
        match &from.source {
            None => r.at(&path, "is required"),
            Some(s) => out.from.push(source(r, &path, s)),
        }
    }
    for (j, to) in rule.to.iter().flatten().enumerate() {
        let path = path.key("to").index(j).key("operation");
        match &to.operation {
            None => r.at(&path, "is required"),
            Some(o) => out.to.push(operation(r, &path, o)),
        }
    }
    out
}

fn source(r: &mut Reporter<'_>, path: &FieldPath, s: &raw::AuthorizationSource) -> AuthzSource {
    let set = [
        s.principals.len(),
        s.not_principals.len(),
        s.namespaces.len(),
        s.not_namespaces.len(),
        s.ip_blocks.len(),
        s.not_ip_blocks.len(),
        s.request_principals.len(),
        s.not_request_principals.len(),
        s.remote_ip_blocks.len(),
        s.not_remote_ip_blocks.len(),
        s.service_accounts.len(),
        s.not_service_accounts.len(),
        s.trust_domains.len(),
        s.not_trust_domains.len(),
    ];
    // An empty source would match every peer, which Istio refuses as a likely mistake.
    if set.iter().all(|n| *n == 0) {
        r.at(path, "must set at least one field");
    }
    AuthzSource {
        principals: principals(r, &path.key("principals"), &s.principals),
        not_principals: principals(r, &path.key("notPrincipals"), &s.not_principals),
        namespaces: wildcards(r, &path.key("namespaces"), &s.namespaces),
        not_namespaces: wildcards(r, &path.key("notNamespaces"), &s.not_namespaces),
        ip_blocks: ip_blocks(r, &path.key("ipBlocks"), &s.ip_blocks),
        not_ip_blocks: ip_blocks(r, &path.key("notIpBlocks"), &s.not_ip_blocks),
    }
}

/// Istio prepends `spiffe://` itself, so a principal written with the scheme
/// could never match: refuse it instead of silently denying (or allowing).
fn principals(r: &mut Reporter<'_>, path: &FieldPath, values: &[String]) -> Vec<Wildcard> {
    for (i, v) in values.iter().enumerate() {
        if v.starts_with("spiffe://") {
            r.at(
                &path.index(i),
                format!("{v:?} must not include spiffe:// (write <trust-domain>/ns/<ns>/sa/<sa>)"),
            );
        }
    }
    wildcards(r, path, values)
}

fn wildcards(r: &mut Reporter<'_>, path: &FieldPath, values: &[String]) -> Vec<Wildcard> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            Wildcard::parse(v)
                .map_err(|message| r.at(&path.index(i), message))
                .ok()
        })
        .collect()
}

fn ip_blocks(r: &mut Reporter<'_>, path: &FieldPath, values: &[String]) -> Vec<IpBlock> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let block = IpBlock::parse(v.trim());
            if block.is_none() {
                r.at(
                    &path.index(i),
                    format!("{v:?} is not an IP address or CIDR block"),
                );
            }
            block
        })
        .collect()
}

fn operation(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    o: &raw::AuthorizationOperation,
) -> AuthzOperation {
    let set = [
        o.ports.len(),
        o.not_ports.len(),
        o.hosts.len(),
        o.not_hosts.len(),
        o.methods.len(),
        o.not_methods.len(),
        o.paths.len(),
        o.not_paths.len(),
    ];
    if set.iter().all(|n| *n == 0) {
        r.at(path, "must set at least one field");
    }
    AuthzOperation {
        ports: ports(r, &path.key("ports"), &o.ports),
        not_ports: ports(r, &path.key("notPorts"), &o.not_ports),
    }
}

fn ports(r: &mut Reporter<'_>, path: &FieldPath, values: &[raw::MapKey]) -> Vec<u16> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let path = path.index(i);
            let text = v.0.trim();
            // Plain digits only: Istio reads these with ParseUint, so "+80" is not a port.
            let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            match text.parse::<i64>() {
                Ok(n) if digits => common::port(r, &path, n),
                _ => {
                    r.at(&path, format!("{:?} is not a port number", v.0));
                    None
                }
            }
        })
        .collect()
}
