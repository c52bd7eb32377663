//! Istio fields the proxy does not apply. Such a field is a validation error, never
//! silently ignored (the one exception: the HTTP attributes of AuthorizationPolicy rules,
//! applied in their most restrictive reading and reported as warnings, see
//! `authorization_policy::l7_fields`): each one found is reported as
//! `<field.path>: not supported by mesh` (or `<VALUE> is not supported by mesh`
//! for an enum value), and the converters leave these fields out of the model.
//!
//! The raw layer accepts these fields (most typed `raw::Ignored`) only so they
//! are named here rather than reported as unknown. To support one, convert it
//! in the validated model and delete its line here.
//!
//! The `retryOn` conditions the proxy does not implement are checked where the
//! list is parsed (`virtual_service::retries`).

use super::raw;
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;

pub(super) const NOT_SUPPORTED: &str = "not supported by mesh";

/// Reports `path.field` for each field that is set.
fn reject(r: &mut Reporter<'_>, path: &FieldPath, fields: &[(&str, bool)]) {
    for (field, set) in fields {
        if *set {
            r.at(&path.key(*field), NOT_SUPPORTED);
        }
    }
}

fn reject_value(r: &mut Reporter<'_>, path: &FieldPath, value: &str) {
    r.at(path, format!("{value} is {NOT_SUPPORTED}"));
}

// ---------------------------------------------------------------- VirtualService

pub(super) fn virtual_service(r: &mut Reporter<'_>, spec: &raw::VirtualServiceSpec) {
    let root = FieldPath::root();
    reject(r, &root, &[("tls", !spec.tls.is_empty())]);
    for (i, h) in spec.http.iter().enumerate() {
        http_route(r, &root.key("http").index(i), h);
    }
    for (i, t) in spec.tcp.iter().enumerate() {
        for (j, m) in t.matches.iter().enumerate() {
            let path = root.key("tcp").index(i).key("match").index(j);
            reject(
                r,
                &path,
                &[("destinationSubnets", !m.destination_subnets.is_empty())],
            );
            // The proxy only serves mesh traffic: a match limited to other
            // gateways would wrongly apply to it.
            if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
                r.at(
                    &path.key("gateways"),
                    format!("gateways other than \"mesh\" are {NOT_SUPPORTED} in tcp matches"),
                );
            }
        }
    }
}

fn http_route(r: &mut Reporter<'_>, path: &FieldPath, h: &raw::HttpRoute) {
    for (i, m) in h.matches.iter().enumerate() {
        let set = m.stat_prefix.is_some();
        reject(r, &path.key("match").index(i), &[("statPrefix", set)]);
    }
    reject(
        r,
        path,
        &[
            ("mirror", h.mirror.is_some()),
            ("mirrors", h.mirrors.is_some()),
            ("mirrorPercentage", h.mirror_percentage.is_some()),
            ("mirrorPercent", h.mirror_percent.is_some()),
            ("corsPolicy", h.cors_policy.is_some()),
            ("delegate", h.delegate.is_some()),
            ("directResponse", h.direct_response.is_some()),
        ],
    );
    if let Some(rt) = &h.retries {
        let set = rt.retry_remote_localities == Some(true);
        reject(r, &path.key("retries"), &[("retryRemoteLocalities", set)]);
    }
}

// ---------------------------------------------------------------- DestinationRule

pub(super) fn destination_rule(r: &mut Reporter<'_>, spec: &raw::DestinationRuleSpec) {
    let root = FieldPath::root();
    let set = spec.workload_selector.is_some();
    reject(r, &root, &[("workloadSelector", set)]);
    if let Some(tp) = &spec.traffic_policy {
        traffic_policy(r, &root.key("trafficPolicy"), tp);
    }
    for (i, s) in spec.subsets.iter().enumerate() {
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(r, &root.key("subsets").index(i).key("trafficPolicy"), tp);
        }
    }
}

fn traffic_policy(r: &mut Reporter<'_>, path: &FieldPath, tp: &raw::TrafficPolicy) {
    policy_parts(
        r,
        path,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.tls.as_ref(),
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        policy_parts(
            r,
            &path.key("portLevelSettings").index(i),
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.tls.as_ref(),
        );
    }
    reject(
        r,
        path,
        &[
            ("proxyProtocol", tp.proxy_protocol.is_some()),
            ("tunnel", tp.tunnel.is_some()),
        ],
    );
}

/// The parts a policy and a `portLevelSettings` entry have in common.
fn policy_parts(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    lb: Option<&raw::LoadBalancer>,
    pool: Option<&raw::ConnectionPool>,
    tls: Option<&raw::ClientTls>,
) {
    if let Some(lb) = lb {
        let path = path.key("loadBalancer");
        if lb.simple == Some(raw::SimpleLb::Passthrough) {
            reject_value(r, &path.key("simple"), "PASSTHROUGH");
        }
        reject(
            r,
            &path,
            &[
                ("warmupDurationSecs", lb.warmup_duration_secs.is_some()),
                ("warmup", lb.warmup.is_some()),
                ("localityLbSetting", lb.locality_lb_setting.is_some()),
            ],
        );
    }
    if let Some(tcp) = pool.and_then(|p| p.tcp.as_ref()) {
        let path = path.key("connectionPool").key("tcp");
        reject(
            r,
            &path,
            &[
                ("tcpKeepalive", tcp.tcp_keepalive.is_some()),
                (
                    "maxConnectionDuration",
                    tcp.max_connection_duration.is_some(),
                ),
                ("idleTimeout", tcp.idle_timeout.is_some()),
            ],
        );
    }
    if let Some(http) = pool.and_then(|p| p.http.as_ref()) {
        let path = path.key("connectionPool").key("http");
        if http.h2_upgrade_policy == Some(raw::H2UpgradePolicy::Upgrade) {
            reject_value(r, &path.key("h2UpgradePolicy"), "UPGRADE");
        }
        let set = http.max_concurrent_streams.is_some();
        reject(r, &path, &[("maxConcurrentStreams", set)]);
        if http.use_client_protocol == Some(false) {
            r.at(
                &path.key("useClientProtocol"),
                "false is not supported (the proxy always forwards a request in the HTTP version the client used, which is what true asks for: set true or leave it out)",
            );
        }
    }
    if let Some(tls) = tls {
        let path = path.key("tls");
        const ORIGINATION: &str = "TLS origination to a server of its own is not implemented; between mesh pods the proxy always uses mutual TLS (ISTIO_MUTUAL)";
        match tls.mode {
            Some(raw::TlsMode::Simple) => r.at(&path.key("mode"), format!("SIMPLE is not supported ({ORIGINATION})")),
            Some(raw::TlsMode::Mutual) => r.at(&path.key("mode"), format!("MUTUAL is not supported ({ORIGINATION})")),
            Some(raw::TlsMode::Disable) => r.at(
                &path.key("mode"),
                "DISABLE is not supported (traffic between mesh pods always goes through mutual TLS tunnels (HBONE), as in Istio ambient, and traffic to pods outside the mesh is plaintext already: remove tls, or use ISTIO_MUTUAL)",
            ),
            Some(raw::TlsMode::IstioMutual) | None => {}
        }
        reject(
            r,
            &path,
            &[
                ("clientCertificate", tls.client_certificate.is_some()),
                ("privateKey", tls.private_key.is_some()),
                ("caCertificates", tls.ca_certificates.is_some()),
                ("caCrl", tls.ca_crl.is_some()),
                ("credentialName", tls.credential_name.is_some()),
                ("subjectAltNames", tls.subject_alt_names.is_some()),
                ("sni", tls.sni.is_some()),
                ("insecureSkipVerify", tls.insecure_skip_verify.is_some()),
            ],
        );
    }
}

// ---------------------------------------------------------------- AuthorizationPolicy

/// The policy-level fields the proxy cannot apply at all. The HTTP attributes inside rules
/// (`paths`, `requestPrincipals`, `when`, ...) are not errors: the policy is applied in its
/// most restrictive reading, as ztunnel does (`authorization_policy::l7_fields`).
pub(super) fn authorization_policy(r: &mut Reporter<'_>, spec: &raw::AuthorizationPolicySpec) {
    let root = FieldPath::root();
    reject(
        r,
        &root,
        &[
            ("targetRef", spec.target_ref.is_some()),
            ("targetRefs", spec.target_refs.is_some()),
            ("provider", spec.provider.is_some()),
        ],
    );
    match spec.action {
        Some(raw::AuthorizationAction::Audit) => reject_value(r, &root.key("action"), "AUDIT"),
        Some(raw::AuthorizationAction::Custom) => reject_value(r, &root.key("action"), "CUSTOM"),
        Some(raw::AuthorizationAction::Allow | raw::AuthorizationAction::Deny) | None => {}
    }
}
