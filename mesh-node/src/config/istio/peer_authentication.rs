//! `PeerAuthentication`: the validated model and its checks.

use std::collections::BTreeMap;

use super::common;
use super::raw;
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `selector.matchLabels`; `None` (or empty) applies to the whole namespace,
    /// or the whole mesh when in the root namespace.
    pub selector: Option<BTreeMap<String, String>>,
    /// `None` when the rule sets no mode (same as `Unset`: inherit).
    pub mtls: Option<MtlsMode>,
    /// Per-port override by container port; only allowed with a selector.
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit from the parent scope (workload → namespace → mesh).
    Unset,
    Disable,
    /// Accept both mTLS and plaintext; Istio's default when nothing is set.
    Permissive,
    Strict,
}

fn mode(m: raw::Mtls) -> Option<MtlsMode> {
    m.mode.map(|m| match m {
        raw::MtlsMode::Unset => MtlsMode::Unset,
        raw::MtlsMode::Disable => MtlsMode::Disable,
        raw::MtlsMode::Permissive => MtlsMode::Permissive,
        raw::MtlsMode::Strict => MtlsMode::Strict,
    })
}

pub(crate) fn convert(
    spec: &raw::PeerAuthenticationSpec,
    namespace: &str,
    name: &str,
    r: &mut Reporter<'_>,
) -> PeerAuthentication {
    let root = FieldPath::root();
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|labels| !labels.is_empty());
    if !spec.port_level_mtls.is_empty() && selector.is_none() {
        r.at(
            &root.key("portLevelMtls"),
            "requires a workload selector (selector.matchLabels)",
        );
    }
    let mut port_level_mtls = BTreeMap::new();
    for (key, m) in &spec.port_level_mtls {
        let path = root.key("portLevelMtls").key(key.0.clone());
        let Some(port) = key
            .0
            .parse::<i64>()
            .ok()
            .and_then(|p| common::port(r, &path, p))
        else {
            if key.0.parse::<i64>().is_err() {
                r.at(&path, format!("{:?} is not a port number", key.0));
            }
            continue;
        };
        match mode(*m) {
            Some(mode) => {
                port_level_mtls.insert(port, mode);
            }
            None => r.at(&path.key("mode"), "is required"),
        }
    }
    // Istio ambient does not support DISABLE (mesh traffic is always mutual TLS between node
    // proxies) and reads it like PERMISSIVE: it lifts STRICT, so plaintext from outside the
    // mesh is accepted. Applied so, and said, since the name promises more.
    let disable_note = "DISABLE is applied as Istio ambient applies it, like PERMISSIVE: plaintext from outside the mesh is accepted (it lifts a STRICT mode), while traffic from mesh pods still arrives over mutual TLS";
    if spec.mtls.and_then(mode) == Some(MtlsMode::Disable) {
        r.warn(&root.key("mtls").key("mode"), disable_note);
    }
    for (port, m) in &port_level_mtls {
        if *m == MtlsMode::Disable {
            r.warn(&root.key("portLevelMtls").key(port.to_string()).key("mode"), disable_note);
        }
    }
    PeerAuthentication {
        namespace: namespace.to_string(),
        name: name.to_string(),
        selector,
        mtls: spec.mtls.and_then(mode),
        port_level_mtls,
    }
}
