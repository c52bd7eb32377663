//! Kubernetes mode: a new AuthorizationPolicy or PeerAuthentication that cannot be read is
//! still applied, in its most restrictive reading, so creating a broken policy never leaves
//! the workloads it was meant to protect open (ztunnel, too, reads a policy it cannot fully
//! apply in its most restrictive way). Only the selector and the action are read, from the
//! raw object; whatever else it says is unknown, so:
//! - an ALLOW AuthorizationPolicy allows nothing (no rules), a DENY one denies everything (one
//!   empty rule), and one whose action cannot be read allows nothing;
//! - a PeerAuthentication is STRICT, without port exceptions.
//!
//! A selector that cannot be read counts as absent: the policy then covers its whole
//! namespace (the whole mesh in the root namespace), more than it meant, never less.
//! An update of an object that was applied before keeps its last good version instead
//! (`assemble_per_object`).

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::decode::{Kind, Object, Origin};
use super::istio::{AuthorizationPolicy, AuthzAction, AuthzRule, MtlsMode, PeerAuthentication};

/// The object applied in place of a rejected new `origin`, for the policy kinds.
pub(crate) fn stand_in(origin: &Origin, value: &Value) -> Option<Object> {
    let spec = value.get("spec");
    let selector = spec.and_then(selector);
    match origin.kind {
        Kind::AuthorizationPolicy => {
            let deny = spec.and_then(|s| s.get("action")).and_then(Value::as_str) == Some("DENY");
            let (action, rules) = if deny {
                (AuthzAction::Deny, vec![AuthzRule::default()])
            } else {
                (AuthzAction::Allow, Vec::new())
            };
            Some(Object::AuthorizationPolicy(Box::new(AuthorizationPolicy {
                namespace: origin.namespace.clone(),
                name: origin.name.clone(),
                selector,
                action,
                rules,
            })))
        }
        Kind::PeerAuthentication => Some(Object::PeerAuthentication(Box::new(PeerAuthentication {
            namespace: origin.namespace.clone(),
            name: origin.name.clone(),
            selector,
            mtls: Some(MtlsMode::Strict),
            port_level_mtls: BTreeMap::new(),
        }))),
        _ => None,
    }
}

/// `selector.matchLabels` when it is a non-empty map of strings.
fn selector(spec: &Value) -> Option<BTreeMap<String, String>> {
    let labels = spec.get("selector")?.get("matchLabels")?.as_mapping()?;
    labels
        .iter()
        .map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect::<Option<BTreeMap<_, _>>>()
        .filter(|labels| !labels.is_empty())
}

/// How a stand-in reads, for reports.
pub(crate) fn describe(object: &str) -> &'static str {
    if object.starts_with("PeerAuthentication ") {
        "applied as STRICT for what it selects"
    } else {
        "applied as deny-all for what it selects"
    }
}
