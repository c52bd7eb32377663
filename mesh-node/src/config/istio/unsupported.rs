//! Istio fields the proxy does not apply. Such a field is a validation error, never
//! silently ignored (the one exception: the HTTP attributes of AuthorizationPolicy rules,
//! applied in their most restrictive reading and reported as warnings, see
//! `authorization_policy::l7_fields`): each one found is reported as
//! `<field.path>: not supported by mesh` (or `<VALUE> is not supported by mesh`
//! for an enum value, and `not supported by mesh (<why, or what to write instead>)` where
//! there is something to say), and the converters leave these fields out of the model.
//! docs/conformance.md lists every field with what the proxy does and its test.
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

/// Reports `path.field`, when set, as not supported, saying why (and what to write instead).
fn reject_why(r: &mut Reporter<'_>, path: &FieldPath, field: &str, set: bool, why: &str) {
    if set {
        r.at(&path.key(field), format!("{NOT_SUPPORTED} ({why})"));
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
            reject_why(
                r,
                &path,
                "sourceSubnet",
                m.source_subnet.is_some(),
                "match callers with sourceLabels or sourceNamespace",
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
        let path = path.key("retries");
        let set = rt.retry_remote_localities == Some(true);
        reject(r, &path, &[("retryRemoteLocalities", set)]);
        if rt.retry_ignore_previous_hosts == Some(false) {
            r.at(
                &path.key("retryIgnorePreviousHosts"),
                "false is not supported (a retry always goes to a host not tried yet while one is left, which is what true, Istio's default, asks for: set true or leave it out)",
            );
        }
        reject_why(
            r,
            &path,
            "backoff",
            rt.backoff.is_some(),
            "retries wait Envoy's default backoff: 25ms base, exponential with jitter, capped at 250ms",
        );
    }
    if let Some(rw) = &h.rewrite {
        reject_why(
            r,
            &path.key("rewrite"),
            "uriRegexRewrite",
            rw.uri_regex_rewrite.is_some(),
            "only rewrite.uri (the matched prefix or the whole path) and rewrite.authority are implemented",
        );
    }
    if let Some(rd) = &h.redirect {
        let path = path.key("redirect");
        reject_why(r, &path, "derivePort", rd.derive_port.is_some(), "set redirect.port instead");
        reject_why(r, &path, "prefixRewrite", rd.prefix_rewrite.is_some(), "set redirect.uri instead");
    }
    if let Some(f) = &h.fault {
        let path = path.key("fault");
        if let Some(d) = &f.delay {
            let set = d.exponential_delay.is_some();
            reject_why(r, &path.key("delay"), "exponentialDelay", set, "Istio does not implement it either: use fixedDelay");
        }
        if let Some(a) = &f.abort {
            let set = a.http2_error.is_some();
            reject_why(r, &path.key("abort"), "http2Error", set, "Istio does not implement it either: use httpStatus or grpcStatus");
        }
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
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        policy_parts(
            r,
            &path.key("portLevelSettings").index(i),
            p.load_balancer.as_ref(),
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
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
    reject_why(
        r,
        path,
        "retryBudget",
        tp.retry_budget.is_some(),
        "bound concurrent retries with connectionPool.http.maxRetries",
    );
}

/// The parts a policy and a `portLevelSettings` entry have in common.
fn policy_parts(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    lb: Option<&raw::LoadBalancer>,
    pool: Option<&raw::ConnectionPool>,
    outlier: Option<&raw::OutlierDetection>,
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
        reject_why(
            r,
            &path,
            "zoneAwareLbSetting",
            lb.zone_aware_lb_setting.is_some(),
            "the proxy balances over every endpoint whatever its zone",
        );
        if let Some(cookie) = lb.consistent_hash.as_ref().and_then(|c| c.http_cookie.as_ref()) {
            reject_why(
                r,
                &path.key("consistentHash").key("httpCookie"),
                "attributes",
                cookie.attributes.is_some(),
                "a generated cookie carries Max-Age, Path and HttpOnly only",
            );
        }
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
        let set = http.http2_keep_alive.is_some();
        reject_why(r, &path, "http2KeepAlive", set, "the proxy sends no HTTP/2 PINGs upstream");
        if http.use_client_protocol == Some(false) {
            r.at(
                &path.key("useClientProtocol"),
                "false is not supported (the proxy always forwards a request in the HTTP version the client used, which is what true asks for: set true or leave it out)",
            );
        }
    }
    if let Some(od) = outlier {
        reject_why(
            r,
            &path.key("outlierDetection"),
            "outlierDetectionHttpErrorCodes",
            od.outlier_detection_http_error_codes.is_some(),
            "5xx responses count as errors, as Istio counts them when this is not set",
        );
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
    // Source fields newer than the proxy: refused rather than read as "any source".
    const ACCOUNTS: &str = "write principals: [<trust-domain>/ns/<namespace>/sa/<name>] instead";
    const DOMAINS: &str = "write principals: [<trust-domain>/*] instead";
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let Some(s) = &from.source else { continue };
            let path = root.key("rules").index(i).key("from").index(j).key("source");
            reject_why(r, &path, "serviceAccounts", !s.service_accounts.is_empty(), ACCOUNTS);
            reject_why(r, &path, "notServiceAccounts", !s.not_service_accounts.is_empty(), ACCOUNTS);
            reject_why(r, &path, "trustDomains", !s.trust_domains.is_empty(), DOMAINS);
            reject_why(r, &path, "notTrustDomains", !s.not_trust_domains.is_empty(), DOMAINS);
        }
    }
}
