//! The Istio conformance table (`docs/conformance.md`): for every field of DestinationRule,
//! VirtualService, PeerAuthentication and AuthorizationPolicy, a test that shows what the proxy
//! does with it. Applied fields: the decoded model value, and the routing, retry, mTLS or
//! authorization decision where that is cheap to show here. Refused fields: the exact problem
//! line. The last test checks that every row of the table names a test that exists.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::request::Parts;

use super::*;
use crate::authz::{Request, evaluate};
use crate::config::TunnelMode;
use crate::http::retry::{Attempt, RetryPolicy};
use crate::http::router::{RequestInfo, Selected, select};

const FILE: &str = "conf.yaml";

/// One object `lemo-dev/conf` of `kind` with `spec` (lines indented by two spaces).
fn doc(kind: &str, spec: &str) -> String {
    let api = match kind {
        "DestinationRule" | "VirtualService" => "networking.istio.io/v1",
        _ => "security.istio.io/v1",
    };
    format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{namespace: lemo-dev, name: conf}}\nspec:\n{spec}")
}

/// The lemo-dev sample plus the object; it must load (warnings allowed).
fn load(kind: &str, spec: &str) -> Cluster {
    let text = doc(kind, spec);
    let mut files = sample_files();
    files.push((FILE, &text));
    Cluster::from_yaml_files(files).unwrap_or_else(|e| panic!("must load:\n{e}"))
}

/// The object is refused with exactly this one problem (`field.path: message`).
fn refused(kind: &str, spec: &str, want: &str) {
    let text = doc(kind, spec);
    assert_problems(&[(FILE, &text)], &[&format!("{FILE}: {kind} lemo-dev/conf: {want}")]);
}

fn warnings_of(c: &Cluster) -> Vec<String> {
    c.warnings().iter().map(ToString::to_string).collect()
}

fn rank(c: &Cluster) -> &Service {
    c.service("lemo-dev", "rank").expect("rank")
}

// ------------------------------------------------------------ DestinationRule

const DR: &str = "DestinationRule";

/// A DestinationRule for `rank` (the sample has none), `body` after `host`.
fn dr(body: &str) -> DestinationRule {
    let c = load(DR, &format!("  host: rank\n{body}"));
    c.destination_rules().find(|d| d.name == "conf").cloned().expect("conf")
}

/// The rule's `trafficPolicy`, written as a YAML flow mapping.
fn tp(flow: &str) -> TrafficPolicy {
    dr(&format!("  trafficPolicy: {flow}\n")).traffic_policy.expect("trafficPolicy")
}

fn dr_refused(body: &str, want: &str) {
    refused(DR, &format!("  host: rank\n{body}"), want);
}

fn tp_refused(flow: &str, want: &str) {
    dr_refused(&format!("  trafficPolicy: {flow}\n"), &format!("trafficPolicy.{want}"));
}

#[test]
fn dr_host_selects_the_service() {
    let c = load(DR, "  host: rank\n");
    let rule = c.destination_rule_for(rank(&c), None).expect("rule for rank");
    assert_eq!((rule.name.as_str(), rule.host.as_str()), ("conf", "rank"));
    assert!(c.destination_rule_for(c.service("lemo-dev", "rerank").expect("rerank"), None).is_none());
}

#[test]
fn dr_export_to() {
    let c = load(DR, "  host: rank\n  exportTo: [\".\"]\n");
    let rule = c.destination_rules().find(|d| d.name == "conf").expect("conf");
    assert_eq!(rule.export_to, ["."]);
    assert!(c.destination_rule_for(rank(&c), Some("lemo-dev")).is_some());
    assert!(c.destination_rule_for(rank(&c), Some("elsewhere")).is_none());
}

#[test]
fn dr_workload_selector_refused() {
    dr_refused("  workloadSelector: {matchLabels: {app: bff}}\n", "workloadSelector: not supported by mesh");
}

#[test]
fn dr_subsets_name_and_labels() {
    let rule = dr("  subsets: [{name: canary, labels: {version: v2}}]\n");
    let subset = rule.subset("canary").expect("subset");
    assert_eq!(subset.labels, BTreeMap::from([("version".to_string(), "v2".to_string())]));
}

#[test]
fn dr_subset_traffic_policy() {
    let rule = dr("  subsets: [{name: canary, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}]\n");
    let policy = rule.subset("canary").and_then(|s| s.traffic_policy.clone()).expect("subset policy");
    assert_eq!(policy.load_balancer, Some(LoadBalancer { policy: LbPolicy::Simple(SimpleLb::Random) }));
}

#[test]
fn dr_load_balancer_simple() {
    for (written, want) in [
        ("UNSPECIFIED", SimpleLb::Unspecified),
        ("ROUND_ROBIN", SimpleLb::RoundRobin),
        ("LEAST_REQUEST", SimpleLb::LeastRequest),
        ("LEAST_CONN", SimpleLb::LeastRequest),
        ("RANDOM", SimpleLb::Random),
    ] {
        let lb = tp(&format!("{{loadBalancer: {{simple: {written}}}}}")).load_balancer;
        assert_eq!(lb, Some(LoadBalancer { policy: LbPolicy::Simple(want) }), "{written}");
    }
}

#[test]
fn dr_load_balancer_simple_passthrough_refused() {
    tp_refused("{loadBalancer: {simple: PASSTHROUGH}}", "loadBalancer.simple: PASSTHROUGH is not supported by mesh");
}

fn hash(flow: &str) -> ConsistentHash {
    match tp(&format!("{{loadBalancer: {{consistentHash: {flow}}}}}")).load_balancer.map(|l| l.policy) {
        Some(LbPolicy::ConsistentHash(ch)) => ch,
        other => panic!("not a consistent hash: {other:?}"),
    }
}

#[test]
fn dr_consistent_hash_keys() {
    assert_eq!(hash("{httpHeaderName: x-user}").key, HashKey::HttpHeaderName("x-user".into()));
    assert_eq!(
        hash("{httpCookie: {name: session, path: /, ttl: 60s}}").key,
        HashKey::HttpCookie { name: "session".into(), ttl: Some(Duration::from_secs(60)), path: Some("/".into()) }
    );
    assert_eq!(hash("{useSourceIp: true}").key, HashKey::UseSourceIp);
    assert_eq!(hash("{httpQueryParameterName: user}").key, HashKey::HttpQueryParameterName("user".into()));
    assert_eq!(hash("{useSourceIp: true}").algorithm, None, "Istio's default: ring hash");
}

#[test]
fn dr_consistent_hash_algorithms() {
    let ring = |n| Some(HashAlgorithm::RingHash { minimum_ring_size: Some(n) });
    assert_eq!(hash("{useSourceIp: true, ringHash: {minimumRingSize: 2048}}").algorithm, ring(2048));
    assert_eq!(hash("{useSourceIp: true, minimumRingSize: 512}").algorithm, ring(512));
    assert_eq!(
        hash("{useSourceIp: true, maglev: {tableSize: 131}}").algorithm,
        Some(HashAlgorithm::Maglev { table_size: Some(131) })
    );
}

#[test]
fn dr_http_cookie_attributes_refused() {
    tp_refused(
        "{loadBalancer: {consistentHash: {httpCookie: {name: s, ttl: 1s, attributes: [{name: SameSite, value: Strict}]}}}}",
        "loadBalancer.consistentHash.httpCookie.attributes: not supported by mesh (a generated cookie carries Max-Age, Path and HttpOnly only)",
    );
}

#[test]
fn dr_load_balancer_locality_and_warmup_refused() {
    for (field, value, want) in [
        ("localityLbSetting", "{enabled: true}", "not supported by mesh"),
        (
            "zoneAwareLbSetting",
            "{enabled: true}",
            "not supported by mesh (the proxy balances over every endpoint whatever its zone)",
        ),
        ("warmupDurationSecs", "60s", "not supported by mesh"),
        ("warmup", "{duration: 60s}", "not supported by mesh"),
    ] {
        tp_refused(&format!("{{loadBalancer: {{{field}: {value}}}}}"), &format!("loadBalancer.{field}: {want}"));
    }
}

fn pool(flow: &str) -> ConnectionPool {
    tp(&format!("{{connectionPool: {flow}}}")).connection_pool.expect("connectionPool")
}

#[test]
fn dr_connection_pool_tcp() {
    let tcp = pool("{tcp: {maxConnections: 7, connectTimeout: 250ms}}").tcp.expect("tcp");
    assert_eq!(tcp.max_connections, Some(7));
    assert_eq!(tcp.connect_timeout, Some(Duration::from_millis(250)));
}

#[test]
fn dr_connection_pool_tcp_refused() {
    for (field, value) in [("tcpKeepalive", "{time: 60s}"), ("maxConnectionDuration", "1h"), ("idleTimeout", "5m")] {
        tp_refused(
            &format!("{{connectionPool: {{tcp: {{{field}: {value}}}}}}}"),
            &format!("connectionPool.tcp.{field}: not supported by mesh"),
        );
    }
}

#[test]
fn dr_connection_pool_http() {
    let http = pool(
        "{http: {http1MaxPendingRequests: 1, http2MaxRequests: 2, maxRequestsPerConnection: 3, maxRetries: 4, idleTimeout: 5s}}",
    )
    .http
    .expect("http");
    assert_eq!(http.http1_max_pending_requests, Some(1));
    assert_eq!(http.http2_max_requests, Some(2));
    assert_eq!(http.max_requests_per_connection, Some(3));
    assert_eq!(http.max_retries, Some(4));
    assert_eq!(http.idle_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn dr_h2_upgrade_policy() {
    for (written, want) in [("DEFAULT", H2UpgradePolicy::Default), ("DO_NOT_UPGRADE", H2UpgradePolicy::DoNotUpgrade)] {
        let http = pool(&format!("{{http: {{h2UpgradePolicy: {written}}}}}")).http.expect("http");
        assert_eq!(http.h2_upgrade_policy, want, "{written}");
    }
    tp_refused(
        "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}",
        "connectionPool.http.h2UpgradePolicy: UPGRADE is not supported by mesh",
    );
}

#[test]
fn dr_use_client_protocol() {
    assert!(pool("{http: {useClientProtocol: true}}").http.expect("http").use_client_protocol);
    tp_refused(
        "{connectionPool: {http: {useClientProtocol: false}}}",
        "connectionPool.http.useClientProtocol: false is not supported (the proxy always forwards a request in the HTTP version the client used, which is what true asks for: set true or leave it out)",
    );
}

#[test]
fn dr_connection_pool_http_refused() {
    tp_refused(
        "{connectionPool: {http: {maxConcurrentStreams: 100}}}",
        "connectionPool.http.maxConcurrentStreams: not supported by mesh",
    );
    tp_refused(
        "{connectionPool: {http: {http2KeepAlive: {interval: 10s}}}}",
        "connectionPool.http.http2KeepAlive: not supported by mesh (the proxy sends no HTTP/2 PINGs upstream)",
    );
}

#[test]
fn dr_outlier_detection() {
    let od = tp(
        "{outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, consecutiveLocalOriginFailures: 4, splitExternalLocalOriginErrors: true, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50, minHealthPercent: 20}}",
    )
    .outlier_detection
    .expect("outlierDetection");
    assert_eq!(
        od,
        OutlierDetection {
            consecutive_5xx_errors: Some(3),
            consecutive_gateway_errors: Some(2),
            consecutive_local_origin_failures: Some(4),
            split_external_local_origin_errors: true,
            interval: Some(Duration::from_secs(5)),
            base_ejection_time: Some(Duration::from_secs(60)),
            max_ejection_percent: Some(50),
            min_health_percent: Some(20),
        }
    );
}

#[test]
fn dr_outlier_detection_consecutive_errors_alias() {
    let od = tp("{outlierDetection: {consecutiveErrors: 7}}").outlier_detection.expect("outlierDetection");
    assert_eq!(od.consecutive_5xx_errors, Some(7));
}

#[test]
fn dr_outlier_detection_http_error_codes_refused() {
    tp_refused(
        "{outlierDetection: {outlierDetectionHttpErrorCodes: [500]}}",
        "outlierDetection.outlierDetectionHttpErrorCodes: not supported by mesh (5xx responses count as errors, as Istio counts them when this is not set)",
    );
}

#[test]
fn dr_tls_istio_mutual() {
    assert_eq!(tp("{tls: {mode: ISTIO_MUTUAL}}").tls, Some(ClientTls { mode: TlsMode::IstioMutual }));
    // Without a CA the node cannot give mutual TLS: refused there.
    let mut text: String = sample_files().iter().map(|(_, t)| format!("{t}\n---\n")).collect();
    text.push_str(&doc(DR, "  host: rank\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n"));
    let e = Cluster::from_yaml_files_in([(FILE, text.as_str())], TunnelMode::Plaintext).expect_err("no CA");
    assert!(
        e.problems().iter().any(|l| l.starts_with(&format!(
            "{FILE}: DestinationRule lemo-dev/conf: trafficPolicy.tls.mode: ISTIO_MUTUAL cannot be enforced without mutual TLS"
        ))),
        "{:?}",
        e.problems()
    );
}

#[test]
fn dr_tls_mode_refused() {
    const ORIGINATION: &str = "TLS origination to a server of its own is not implemented; between mesh pods the proxy always uses mutual TLS (ISTIO_MUTUAL)";
    tp_refused("{tls: {mode: SIMPLE}}", &format!("tls.mode: SIMPLE is not supported ({ORIGINATION})"));
    tp_refused("{tls: {mode: MUTUAL}}", &format!("tls.mode: MUTUAL is not supported ({ORIGINATION})"));
    tp_refused(
        "{tls: {mode: DISABLE}}",
        "tls.mode: DISABLE is not supported (traffic between mesh pods always goes through mutual TLS tunnels (HBONE), as in Istio ambient, and traffic to pods outside the mesh is plaintext already: remove tls, or use ISTIO_MUTUAL)",
    );
}

#[test]
fn dr_tls_origination_fields_refused() {
    for (field, value) in [
        ("clientCertificate", "/c.pem"),
        ("privateKey", "/k.pem"),
        ("caCertificates", "/ca.pem"),
        ("caCrl", "/crl.pem"),
        ("credentialName", "rank-cert"),
        ("subjectAltNames", "[rank.example]"),
        ("sni", "rank.example"),
        ("insecureSkipVerify", "true"),
    ] {
        tp_refused(&format!("{{tls: {{mode: ISTIO_MUTUAL, {field}: {value}}}}}"), &format!("tls.{field}: not supported by mesh"));
    }
}

#[test]
fn dr_port_level_settings() {
    let policy = tp(
        "{loadBalancer: {simple: ROUND_ROBIN}, portLevelSettings: [{port: {number: 50061}, loadBalancer: {simple: RANDOM}, connectionPool: {tcp: {maxConnections: 9}}, outlierDetection: {consecutive5xxErrors: 2}, tls: {mode: ISTIO_MUTUAL}}]}",
    );
    let on_port = policy.for_port(50061);
    assert_eq!(on_port.load_balancer, Some(LoadBalancer { policy: LbPolicy::Simple(SimpleLb::Random) }));
    assert_eq!(on_port.connection_pool.and_then(|p| p.tcp).and_then(|t| t.max_connections), Some(9));
    assert_eq!(on_port.outlier_detection.and_then(|o| o.consecutive_5xx_errors), Some(2));
    assert_eq!(on_port.tls, Some(ClientTls { mode: TlsMode::IstioMutual }));
    // Another port keeps the rule's own settings.
    let other = policy.for_port(8080);
    assert_eq!(other.load_balancer, Some(LoadBalancer { policy: LbPolicy::Simple(SimpleLb::RoundRobin) }));
    assert_eq!(other.outlier_detection, None);
}

#[test]
fn dr_traffic_policy_refused() {
    tp_refused("{tunnel: {protocol: CONNECT, targetHost: x, targetPort: 443}}", "tunnel: not supported by mesh");
    tp_refused("{proxyProtocol: {version: V1}}", "proxyProtocol: not supported by mesh");
    tp_refused(
        "{retryBudget: {percent: 20}}",
        "retryBudget: not supported by mesh (bound concurrent retries with connectionPool.http.maxRetries)",
    );
}

// ------------------------------------------------------------ VirtualService

const VS: &str = "VirtualService";
const TO_RANK: &str = "route: [{destination: {host: rank}}]";

/// A VirtualService for `rank` (the sample has none) with one `http` route, written as a YAML
/// flow mapping.
fn http_spec(route: &str) -> String {
    format!("  hosts: [rank]\n  http:\n  - {route}\n")
}

fn http_route(route: &str) -> HttpRoute {
    let c = load(VS, &http_spec(route));
    let vs = c.virtual_services().find(|v| v.name == "conf").expect("conf");
    vs.http[0].clone()
}

fn http_refused(route: &str, want: &str) {
    refused(VS, &http_spec(route), &format!("http[0].{want}"));
}

fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

/// Whether a request on `port` from the pod `source` (in lemo-dev) takes the route guarded by
/// the one `match` entry (a YAML flow mapping).
fn takes(match_: &str, parts: &Parts, port: u16, source: Option<&str>) -> bool {
    let c = load(VS, &http_spec(&format!("{{match: [{match_}], {TO_RANK}}}")));
    let source = source.map(|name| c.pod("lemo-dev", name).expect("source pod"));
    let vss = c.virtual_services_for(rank(&c), source.map(|p| p.namespace.as_str()));
    match select(&vss, &RequestInfo { parts, port, source }) {
        Selected::Route { .. } => true,
        Selected::NoMatch => false,
        Selected::Default => panic!("the VirtualService does not apply"),
    }
}

fn get(uri: &str) -> Parts {
    request("GET", uri, &[])
}

#[test]
fn vs_hosts() {
    for host in ["rank", "rank.lemo-dev", "rank.lemo-dev.svc.cluster.local"] {
        let c = load(VS, &format!("  hosts: [{host}]\n  http:\n  - {{{TO_RANK}}}\n"));
        let names: Vec<&str> = c.virtual_services_for(rank(&c), None).iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["conf"], "{host}");
    }
}

#[test]
fn vs_gateways() {
    let spec = |gateways: &str| format!("  hosts: [rank]\n  gateways: {gateways}\n  http:\n  - {{{TO_RANK}}}\n");
    for applies in ["[mesh]", "[mesh, istio-system/public]"] {
        let c = load(VS, &spec(applies));
        assert_eq!(c.virtual_services_for(rank(&c), None).len(), 1, "{applies}");
    }
    let c = load(VS, &spec("[istio-system/public]"));
    assert!(c.virtual_services_for(rank(&c), None).is_empty());
    assert_eq!(
        warnings_of(&c),
        [format!(
            "{FILE}: VirtualService lemo-dev/conf: gateways: bound only to gateway(s) istio-system/public (not \"mesh\"): not applied by mesh, which routes mesh traffic only (add \"mesh\" to apply it to mesh traffic too)"
        )]
    );
}

#[test]
fn vs_export_to() {
    let c = load(VS, &format!("  hosts: [rank]\n  exportTo: [\".\"]\n  http:\n  - {{{TO_RANK}}}\n"));
    assert_eq!(c.virtual_services_for(rank(&c), Some("lemo-dev")).len(), 1);
    assert!(c.virtual_services_for(rank(&c), Some("elsewhere")).is_empty());
}

#[test]
fn vs_names_are_labels() {
    let route = http_route(&format!("{{name: main, match: [{{name: api, uri: {{prefix: /}}}}], {TO_RANK}}}"));
    assert_eq!(route.name.as_deref(), Some("main"));
    assert_eq!(route.matches[0].name.as_deref(), Some("api"));
    // Names change no decision: the route is taken as without them.
    assert!(takes("{name: api, uri: {prefix: /}}", &get("/x"), 50061, None));
}

#[test]
fn vs_match_uri() {
    assert!(takes("{uri: {exact: /a}}", &get("/a"), 50061, None));
    assert!(!takes("{uri: {exact: /a}}", &get("/a/b"), 50061, None));
    assert!(takes("{uri: {prefix: /a}}", &get("/a/b"), 50061, None));
    assert!(takes("{uri: {regex: \"/v[0-9]+\"}}", &get("/v12"), 50061, None));
    assert!(!takes("{uri: {regex: \"/v[0-9]+\"}}", &get("/v12/x"), 50061, None));
}

#[test]
fn vs_match_scheme() {
    assert!(takes("{scheme: {exact: http}}", &get("/"), 50061, None));
    assert!(!takes("{scheme: {exact: https}}", &get("/"), 50061, None));
}

#[test]
fn vs_match_method() {
    assert!(takes("{method: {exact: POST}}", &request("POST", "/", &[]), 50061, None));
    assert!(!takes("{method: {exact: POST}}", &get("/"), 50061, None));
}

#[test]
fn vs_match_authority() {
    let host = |h| request("GET", "/", &[("host", h)]);
    assert!(takes("{authority: {prefix: rank}}", &host("rank.lemo-dev:50061"), 50061, None));
    assert!(!takes("{authority: {prefix: rank}}", &host("recall:50051"), 50061, None));
}

#[test]
fn vs_match_headers() {
    let m = "{headers: {x-canary: {exact: \"true\"}, x-user: {}}}";
    assert!(takes(m, &request("GET", "/", &[("x-canary", "true"), ("x-user", "")]), 50061, None));
    assert!(!takes(m, &request("GET", "/", &[("x-canary", "true")]), 50061, None));
    assert!(!takes(m, &request("GET", "/", &[("x-canary", "false"), ("x-user", "u")]), 50061, None));
}

#[test]
fn vs_match_without_headers() {
    let m = "{withoutHeaders: {x-canary: {exact: \"true\"}}}";
    assert!(takes(m, &get("/"), 50061, None));
    assert!(!takes(m, &request("GET", "/", &[("x-canary", "true")]), 50061, None));
}

#[test]
fn vs_match_query_params() {
    let m = "{queryParams: {debug: {exact: \"1\"}}}";
    assert!(takes(m, &get("/x?a=2&debug=1"), 50061, None));
    assert!(!takes(m, &get("/x?debug=0"), 50061, None));
}

#[test]
fn vs_match_port() {
    assert!(takes("{port: 50061}", &get("/"), 50061, None));
    assert!(!takes("{port: 8080}", &get("/"), 50061, None));
}

#[test]
fn vs_match_source_labels() {
    assert!(takes("{sourceLabels: {app: bff}}", &get("/"), 50061, Some("bff-0")));
    assert!(!takes("{sourceLabels: {app: bff}}", &get("/"), 50061, Some("recall-0")));
    assert!(!takes("{sourceLabels: {app: bff}}", &get("/"), 50061, None));
}

#[test]
fn vs_match_source_namespace() {
    assert!(takes("{sourceNamespace: lemo-dev}", &get("/"), 50061, Some("bff-0")));
    assert!(!takes("{sourceNamespace: other}", &get("/"), 50061, Some("bff-0")));
}

#[test]
fn vs_match_gateways() {
    assert!(takes("{gateways: [mesh]}", &get("/"), 50061, None));
    assert!(!takes("{gateways: [istio-system/public]}", &get("/"), 50061, None));
}

#[test]
fn vs_match_ignore_uri_case() {
    assert!(takes("{uri: {prefix: /API}, ignoreUriCase: true}", &get("/api/x"), 50061, None));
    assert!(!takes("{uri: {prefix: /API}}", &get("/api/x"), 50061, None));
}

#[test]
fn vs_match_stat_prefix_refused() {
    http_refused(
        &format!("{{match: [{{uri: {{prefix: /}}, statPrefix: api}}], {TO_RANK}}}"),
        "match[0].statPrefix: not supported by mesh",
    );
}

#[test]
fn vs_route_destination() {
    let route = http_route("{route: [{destination: {host: recall, subset: v2, port: {number: 8081}}}]}");
    assert_eq!(
        route.route[0].destination,
        Destination { host: "recall".into(), subset: Some("v2".into()), port: Some(8081) }
    );
}

#[test]
fn vs_route_weight() {
    let route = http_route(
        "{route: [{destination: {host: recall, subset: v1}, weight: 90}, {destination: {host: recall, subset: v2}, weight: 10}]}",
    );
    assert_eq!(route.effective_weights(), [90, 10]);
}

/// `set`, `add` and `remove` of `request` and `response`, as the model holds them, and what
/// they do to a header map (the proxy applies both with `http::headers::apply`).
fn assert_header_operations(headers: &Headers) {
    let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    assert_eq!(headers.request, HeaderOperations { set: map(&[("x-a", "1")]), add: map(&[("x-b", "2")]), remove: vec!["x-c".into()] });
    assert_eq!(headers.response, HeaderOperations { set: map(&[("x-d", "4")]), add: map(&[("x-e", "5")]), remove: vec!["server".into()] });
    for ops in [&headers.request, &headers.response] {
        let mut m = http::HeaderMap::new();
        for name in ["x-a", "x-b", "x-c", "x-d", "x-e", "server"] {
            m.insert(name, "old".parse().expect("value"));
        }
        crate::http::headers::apply(ops, &mut m);
        for (name, value) in &ops.set {
            assert_eq!(m.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect::<Vec<_>>(), [value.as_bytes()], "set replaces");
        }
        for (name, value) in &ops.add {
            assert_eq!(m.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect::<Vec<_>>(), [&b"old"[..], value.as_bytes()], "add appends");
        }
        for name in &ops.remove {
            assert!(m.get(name.as_str()).is_none(), "remove");
        }
    }
}

const HEADERS: &str = "{request: {set: {x-a: \"1\"}, add: {x-b: \"2\"}, remove: [x-c]}, response: {set: {x-d: \"4\"}, add: {x-e: \"5\"}, remove: [server]}}";

#[test]
fn vs_route_destination_headers() {
    let route = http_route(&format!("{{route: [{{destination: {{host: rank}}, headers: {HEADERS}}}]}}"));
    assert_header_operations(route.route[0].headers.as_ref().expect("headers"));
}

#[test]
fn vs_headers() {
    let route = http_route(&format!("{{{TO_RANK}, headers: {HEADERS}}}"));
    assert_header_operations(route.headers.as_ref().expect("headers"));
}

#[test]
fn vs_redirect() {
    let route = http_route("{redirect: {uri: /new, authority: other.example, port: 8080, scheme: https, redirectCode: 302}}");
    assert_eq!(
        route.redirect,
        Some(HttpRedirect {
            uri: Some("/new".into()),
            authority: Some("other.example".into()),
            port: Some(8080),
            scheme: Some("https".into()),
            redirect_code: 302,
        })
    );
    assert_eq!(http_route("{redirect: {uri: /new}}").redirect.map(|r| r.redirect_code), Some(301));
}

#[test]
fn vs_redirect_refused() {
    http_refused(
        "{redirect: {uri: /new, derivePort: FROM_REQUEST_PORT}}",
        "redirect.derivePort: not supported by mesh (set redirect.port instead)",
    );
    http_refused(
        "{redirect: {prefixRewrite: /new}}",
        "redirect.prefixRewrite: not supported by mesh (set redirect.uri instead)",
    );
}

#[test]
fn vs_rewrite() {
    let route = http_route(&format!("{{{TO_RANK}, rewrite: {{uri: /v2, authority: rank.internal}}}}"));
    assert_eq!(route.rewrite, Some(HttpRewrite { uri: Some("/v2".into()), authority: Some("rank.internal".into()) }));
}

#[test]
fn vs_rewrite_uri_regex_refused() {
    http_refused(
        &format!("{{{TO_RANK}, rewrite: {{uriRegexRewrite: {{match: \"^/a(.*)\", rewrite: \"/b\\\\1\"}}}}}}"),
        "rewrite.uriRegexRewrite: not supported by mesh (only rewrite.uri (the matched prefix or the whole path) and rewrite.authority are implemented)",
    );
}

#[test]
fn vs_timeout() {
    assert_eq!(http_route(&format!("{{{TO_RANK}, timeout: 2s}}")).timeout, Some(Duration::from_secs(2)));
    assert_eq!(http_route(&format!("{{{TO_RANK}}}")).timeout, None);
}

#[test]
fn vs_retries() {
    let route = http_route(&format!(
        "{{{TO_RANK}, retries: {{attempts: 3, perTryTimeout: 1s, retryOn: \"gateway-error,connect-failure,409\"}}}}"
    ));
    let retries = route.retries.expect("retries");
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(1)));
    assert_eq!(retries.retry_on, [RetryOn::GatewayError, RetryOn::ConnectFailure, RetryOn::Status(409)]);
    let policy = RetryPolicy::from_route(Some(&retries));
    assert!(policy.should_retry(Attempt::Response { status: 503, grpc: None }));
    assert!(policy.should_retry(Attempt::Response { status: 409, grpc: None }));
    assert!(!policy.should_retry(Attempt::Response { status: 500, grpc: None }));
}

#[test]
fn vs_retry_remote_localities() {
    let route = http_route(&format!("{{{TO_RANK}, retries: {{attempts: 1, retryRemoteLocalities: false}}}}"));
    assert!(!route.retries.expect("retries").retry_remote_localities);
    http_refused(
        &format!("{{{TO_RANK}, retries: {{attempts: 1, retryRemoteLocalities: true}}}}"),
        "retries.retryRemoteLocalities: not supported by mesh",
    );
}

#[test]
fn vs_retry_ignore_previous_hosts() {
    let route = http_route(&format!("{{{TO_RANK}, retries: {{attempts: 1, retryIgnorePreviousHosts: true}}}}"));
    assert_eq!(route.retries.map(|r| r.attempts), Some(1));
    http_refused(
        &format!("{{{TO_RANK}, retries: {{attempts: 1, retryIgnorePreviousHosts: false}}}}"),
        "retries.retryIgnorePreviousHosts: false is not supported (a retry always goes to a host not tried yet while one is left, which is what true, Istio's default, asks for: set true or leave it out)",
    );
}

#[test]
fn vs_retry_backoff_refused() {
    http_refused(
        &format!("{{{TO_RANK}, retries: {{attempts: 2, backoff: 1s}}}}"),
        "retries.backoff: not supported by mesh (retries wait Envoy's default backoff: 25ms base, exponential with jitter, capped at 250ms)",
    );
}

#[test]
fn vs_fault_delay() {
    let delay = |flow: &str| http_route(&format!("{{{TO_RANK}, fault: {{delay: {flow}}}}}")).fault.and_then(|f| f.delay);
    assert_eq!(
        delay("{fixedDelay: 2s, percentage: {value: 12.5}}"),
        Some(FaultDelay { percentage: 12.5, fixed_delay: Duration::from_secs(2) })
    );
    // The deprecated integer `percent`, and `percentage` winning over it, as Istio reads them.
    assert_eq!(delay("{fixedDelay: 2s, percent: 30}").map(|d| d.percentage), Some(30.0));
    assert_eq!(delay("{fixedDelay: 2s, percent: 30, percentage: {value: 5}}").map(|d| d.percentage), Some(5.0));
}

#[test]
fn vs_fault_abort() {
    let abort = |flow: &str| http_route(&format!("{{{TO_RANK}, fault: {{abort: {flow}}}}}")).fault.and_then(|f| f.abort);
    assert_eq!(
        abort("{httpStatus: 503, percentage: {value: 100}}"),
        Some(FaultAbort { percentage: 100.0, status: AbortStatus::Http(503) })
    );
    assert_eq!(
        abort("{grpcStatus: UNAVAILABLE, percentage: {value: 50}}"),
        Some(FaultAbort { percentage: 50.0, status: AbortStatus::Grpc(14) })
    );
}

#[test]
fn vs_fault_without_percentage_faults_nothing() {
    let c = load(VS, &http_spec(&format!("{{{TO_RANK}, fault: {{delay: {{fixedDelay: 1s}}, abort: {{httpStatus: 500}}}}}}")));
    let vs = c.virtual_services().find(|v| v.name == "conf").expect("conf");
    let fault = vs.http[0].fault.clone().expect("fault");
    assert_eq!(fault.delay.map(|d| d.percentage), Some(0.0));
    assert_eq!(fault.abort.map(|a| a.percentage), Some(0.0));
    let at = |what: &str, verb: &str| {
        format!(
            "{FILE}: VirtualService lemo-dev/conf: http[0].fault.{what}.percentage: not set: no request is {verb}, as in Istio (set percentage.value: 100 for every request)"
        )
    };
    assert_eq!(warnings_of(&c), [at("delay", "delayed"), at("abort", "aborted")]);
}

#[test]
fn vs_fault_refused() {
    http_refused(
        &format!("{{{TO_RANK}, fault: {{delay: {{exponentialDelay: 1s, percentage: {{value: 1}}}}}}}}"),
        "fault.delay.exponentialDelay: not supported by mesh (Istio does not implement it either: use fixedDelay)",
    );
    http_refused(
        &format!("{{{TO_RANK}, fault: {{abort: {{http2Error: REFUSED_STREAM, percentage: {{value: 1}}}}}}}}"),
        "fault.abort.http2Error: not supported by mesh (Istio does not implement it either: use httpStatus or grpcStatus)",
    );
}

#[test]
fn vs_http_refused() {
    for (field, value) in [
        ("mirror", "{host: recall}"),
        ("mirrors", "[{destination: {host: recall}}]"),
        ("mirrorPercentage", "{value: 5}"),
        ("mirrorPercent", "5"),
        ("corsPolicy", "{allowOrigins: [{exact: \"https://x\"}]}"),
    ] {
        http_refused(&format!("{{{TO_RANK}, {field}: {value}}}"), &format!("{field}: not supported by mesh"));
    }
    http_refused("{delegate: {name: rank-routes}}", "delegate: not supported by mesh");
    http_refused("{directResponse: {status: 503}}", "directResponse: not supported by mesh");
}

/// A VirtualService for `rank` with one `tcp` route guarded by `match_`.
fn tcp_spec(match_: &str) -> String {
    format!("  hosts: [rank]\n  tcp:\n  - {{match: [{match_}], route: [{{destination: {{host: rank}}}}]}}\n")
}

/// Whether a connection to rank's VIP on `port` from the pod `source` takes the tcp route.
fn tcp_takes(match_: &str, port: u16, source: Option<&str>) -> bool {
    let c = load(VS, &tcp_spec(match_));
    let vip = rank(&c).cluster_ips[0];
    let source = source.map(|name| c.pod("lemo-dev", name).expect("source pod"));
    match crate::route::route(&c, SocketAddr::new(vip, port), source) {
        Ok(_) => true,
        Err(crate::route::RouteError::NoMatch { .. }) => false,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn vs_tcp_match() {
    assert!(tcp_takes("{port: 50061}", 50061, None));
    assert!(!tcp_takes("{port: 8080}", 50061, None));
    assert!(tcp_takes("{sourceLabels: {app: bff}}", 50061, Some("bff-0")));
    assert!(!tcp_takes("{sourceLabels: {app: bff}}", 50061, Some("recall-0")));
    assert!(tcp_takes("{sourceNamespace: lemo-dev}", 50061, Some("bff-0")));
    assert!(!tcp_takes("{sourceNamespace: other}", 50061, Some("bff-0")));
}

#[test]
fn vs_tcp_match_gateways() {
    assert!(tcp_takes("{gateways: [mesh, istio-system/public]}", 50061, None));
    refused(
        VS,
        &tcp_spec("{gateways: [istio-system/public]}"),
        "tcp[0].match[0].gateways: gateways other than \"mesh\" are not supported by mesh in tcp matches",
    );
}

#[test]
fn vs_tcp_match_refused() {
    refused(VS, &tcp_spec("{destinationSubnets: [10.0.0.0/8]}"), "tcp[0].match[0].destinationSubnets: not supported by mesh");
    refused(
        VS,
        &tcp_spec("{sourceSubnet: 10.0.0.0/8}"),
        "tcp[0].match[0].sourceSubnet: not supported by mesh (match callers with sourceLabels or sourceNamespace)",
    );
}

#[test]
fn vs_tcp_route() {
    let c = load(
        VS,
        "  hosts: [rank]\n  tcp:\n  - route: [{destination: {host: recall, subset: v1, port: {number: 50051}}, weight: 100}, {destination: {host: recall, subset: v2}, weight: 0}]\n",
    );
    let vs = c.virtual_services().find(|v| v.name == "conf").expect("conf");
    let route = &vs.tcp[0].route;
    assert_eq!(route[0].destination, Destination { host: "recall".into(), subset: Some("v1".into()), port: Some(50051) });
    assert_eq!((route[0].weight, route[1].weight), (Some(100), Some(0)));
    // Weight 100 / 0: every connection goes to v1 on 50051.
    for _ in 0..20 {
        match crate::route::route(&c, SocketAddr::new(rank(&c).cluster_ips[0], 50061), None) {
            Ok(crate::route::TcpTarget::Cluster(key)) => {
                assert_eq!((key.service.as_str(), key.port, key.subset.as_deref()), ("recall", 50051, Some("v1")));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn vs_tls_refused() {
    refused(
        VS,
        "  hosts: [rank]\n  tls:\n  - match: [{sniHosts: [rank]}]\n    route: [{destination: {host: rank}}]\n",
        "tls: not supported by mesh",
    );
}

// ------------------------------------------------------------ PeerAuthentication

const PA: &str = "PeerAuthentication";

/// The mode the rank pod gets on its port 50061 under the sample's namespace-wide STRICT and
/// a workload PeerAuthentication `spec`.
fn rank_mode(spec: &str) -> MtlsMode {
    let c = load(PA, spec);
    let pod = c.pod("lemo-dev", "rank-0").expect("rank-0");
    c.mtls_mode_for(pod, 50061)
}

#[test]
fn pa_selector() {
    assert_eq!(rank_mode("  selector: {matchLabels: {app: rank}}\n  mtls: {mode: PERMISSIVE}\n"), MtlsMode::Permissive);
    assert_eq!(rank_mode("  selector: {matchLabels: {app: bff}}\n  mtls: {mode: PERMISSIVE}\n"), MtlsMode::Strict);
}

#[test]
fn pa_mtls_mode() {
    let with = |mode: &str| rank_mode(&format!("  selector: {{matchLabels: {{app: rank}}}}\n  mtls: {{mode: {mode}}}\n"));
    assert_eq!(with("UNSET"), MtlsMode::Strict, "inherits the namespace's STRICT");
    assert_eq!(with("PERMISSIVE"), MtlsMode::Permissive);
    assert_eq!(with("STRICT"), MtlsMode::Strict);
}

#[test]
fn pa_mtls_disable_is_permissive_and_warns() {
    let spec = "  selector: {matchLabels: {app: rank}}\n  mtls: {mode: DISABLE}\n";
    assert_eq!(rank_mode(spec), MtlsMode::Disable);
    assert_eq!(
        warnings_of(&load(PA, spec)),
        [format!(
            "{FILE}: PeerAuthentication lemo-dev/conf: mtls.mode: DISABLE is applied as Istio ambient applies it, like PERMISSIVE: plaintext from outside the mesh is accepted (it lifts a STRICT mode), while traffic from mesh pods still arrives over mutual TLS"
        )]
    );
}

#[test]
fn pa_port_level_mtls() {
    let spec = "  selector: {matchLabels: {app: rank}}\n  portLevelMtls:\n    50061: {mode: PERMISSIVE}\n";
    assert_eq!(rank_mode(spec), MtlsMode::Permissive);
    refused(PA, "  portLevelMtls:\n    50061: {mode: PERMISSIVE}\n", "portLevelMtls: requires a workload selector (selector.matchLabels)");
}

// ------------------------------------------------------------ AuthorizationPolicy

const AP: &str = "AuthorizationPolicy";

/// Whether rank-0 admits a connection on 50061 from `sa` (in `namespace`, from 10.244.0.10)
/// under the sample's policies and `spec`.
fn admits(spec: &str, namespace: &str, sa: &str) -> bool {
    let c = load(AP, spec);
    admits_in(&c, namespace, sa)
}

fn admits_in(c: &Cluster, namespace: &str, sa: &str) -> bool {
    let pod = c.pod("lemo-dev", "rank-0").expect("rank-0");
    let principal = format!("cluster.local/ns/{namespace}/sa/{sa}");
    let req = Request {
        source_principal: Some(&principal),
        source_namespace: None,
        source_ip: ip("10.244.0.10").into(),
        destination_port: 50061,
    };
    evaluate(&c.authorization_policies_for(pod), &req).is_allow()
}

/// An ALLOW policy on rank with one rule whose source is `source` (a YAML flow mapping).
fn allow_from(source: &str) -> String {
    format!("  selector: {{matchLabels: {{app: rank}}}}\n  rules: [{{from: [{{source: {source}}}]}}]\n")
}

#[test]
fn ap_selector() {
    let spec = |app: &str| format!("  selector: {{matchLabels: {{app: {app}}}}}\n  action: DENY\n  rules: [{{}}]\n");
    assert!(!admits(&spec("rank"), "lemo-dev", "bff"));
    assert!(admits(&spec("bff"), "lemo-dev", "bff"));
}

#[test]
fn ap_action() {
    let from_bff = "rules: [{from: [{source: {principals: [cluster.local/ns/lemo-dev/sa/bff]}}]}]";
    let spec = |action: &str| format!("  selector: {{matchLabels: {{app: rank}}}}\n{action}  {from_bff}\n");
    // ALLOW (also when not written): only the listed principal.
    for action in ["  action: ALLOW\n", ""] {
        assert!(admits(&spec(action), "lemo-dev", "bff"), "{action}");
        assert!(!admits(&spec(action), "lemo-dev", "rank"), "{action}");
    }
    assert!(!admits(&spec("  action: DENY\n"), "lemo-dev", "bff"));
    assert!(admits(&spec("  action: DENY\n"), "lemo-dev", "rank"));
}

#[test]
fn ap_action_audit_and_custom_refused() {
    refused(AP, "  action: AUDIT\n", "action: AUDIT is not supported by mesh");
    refused(AP, "  action: CUSTOM\n", "action: CUSTOM is not supported by mesh");
}

#[test]
fn ap_policy_level_refused() {
    refused(AP, "  provider: {name: ext-authz}\n", "provider: not supported by mesh");
    refused(AP, "  targetRef: {kind: Service, name: rank}\n", "targetRef: not supported by mesh");
    refused(AP, "  targetRefs: [{kind: Service, name: rank}]\n", "targetRefs: not supported by mesh");
}

#[test]
fn ap_source_identity_fields() {
    let bff = "cluster.local/ns/lemo-dev/sa/bff";
    assert!(admits(&allow_from(&format!("{{principals: [{bff}]}}")), "lemo-dev", "bff"));
    assert!(!admits(&allow_from(&format!("{{principals: [{bff}]}}")), "lemo-dev", "rank"));
    assert!(!admits(&allow_from(&format!("{{principals: [\"*\"], notPrincipals: [{bff}]}}")), "lemo-dev", "bff"));
    assert!(admits(&allow_from(&format!("{{principals: [\"*\"], notPrincipals: [{bff}]}}")), "lemo-dev", "rank"));
    assert!(admits(&allow_from("{namespaces: [lemo-dev]}"), "lemo-dev", "bff"));
    assert!(!admits(&allow_from("{namespaces: [lemo-dev]}"), "other", "bff"));
    assert!(!admits(&allow_from("{notNamespaces: [lemo-dev]}"), "lemo-dev", "bff"));
    assert!(admits(&allow_from("{notNamespaces: [lemo-dev]}"), "other", "bff"));
}

#[test]
fn ap_source_ip_blocks() {
    // The caller is 10.244.0.10.
    assert!(admits(&allow_from("{ipBlocks: [10.244.0.0/24]}"), "lemo-dev", "bff"));
    assert!(!admits(&allow_from("{ipBlocks: [10.9.0.0/16]}"), "lemo-dev", "bff"));
    assert!(!admits(&allow_from("{notIpBlocks: [10.244.0.10]}"), "lemo-dev", "bff"));
    assert!(admits(&allow_from("{notIpBlocks: [10.9.0.0/16]}"), "lemo-dev", "bff"));
}

#[test]
fn ap_operation_ports() {
    let to = |op: &str| format!("  selector: {{matchLabels: {{app: rank}}}}\n  rules: [{{to: [{{operation: {op}}}]}}]\n");
    assert!(admits(&to("{ports: [\"50061\"]}"), "lemo-dev", "bff"));
    assert!(!admits(&to("{ports: [\"8080\"]}"), "lemo-dev", "bff"));
    assert!(!admits(&to("{notPorts: [\"50061\"]}"), "lemo-dev", "bff"));
    assert!(admits(&to("{notPorts: [\"8080\"]}"), "lemo-dev", "bff"));
}

/// The HTTP attributes: an ALLOW rule naming one matches nothing; a DENY rule naming one denies
/// every connection its L4 fields match (ztunnel's reading), and each says so in a warning.
#[test]
fn ap_http_attributes_are_read_as_ztunnel_does() {
    let bff = "principals: [cluster.local/ns/lemo-dev/sa/bff]";
    for (place, field, value) in [
        ("source", "requestPrincipals", "[\"*\"]"),
        ("source", "notRequestPrincipals", "[\"*\"]"),
        ("source", "remoteIpBlocks", "[10.0.0.0/8]"),
        ("source", "notRemoteIpBlocks", "[10.0.0.0/8]"),
        ("operation", "hosts", "[rank]"),
        ("operation", "notHosts", "[rank]"),
        ("operation", "methods", "[GET]"),
        ("operation", "notMethods", "[GET]"),
        ("operation", "paths", "[/admin]"),
        ("operation", "notPaths", "[/admin]"),
        ("rule", "when", "[{key: \"request.headers[x-user]\", values: [a]}]"),
    ] {
        let rule = match place {
            "source" => format!("{{from: [{{source: {{{bff}, {field}: {value}}}}}]}}"),
            "operation" => format!("{{from: [{{source: {{{bff}}}}}], to: [{{operation: {{{field}: {value}}}}}]}}"),
            _ => format!("{{from: [{{source: {{{bff}}}}}], {field}: {value}}}"),
        };
        let path = match place {
            "source" => format!("rules[0].from[0].source.{field}"),
            "operation" => format!("rules[0].to[0].operation.{field}"),
            _ => format!("rules[0].{field}"),
        };
        for (action, admitted) in [("ALLOW", false), ("DENY", false)] {
            let c = load(AP, &format!("  selector: {{matchLabels: {{app: rank}}}}\n  action: {action}\n  rules: [{rule}]\n"));
            assert_eq!(admits_in(&c, "lemo-dev", "bff"), admitted, "{action} {field}");
            let w = warnings_of(&c);
            assert_eq!(w.len(), 1, "{w:?}");
            let expect = format!("{FILE}: AuthorizationPolicy lemo-dev/conf: {path}: not enforceable at L4");
            assert!(w[0].starts_with(&expect), "{w:?}");
            // The DENY rule keeps its L4 fields: other principals are not denied by it.
            if action == "DENY" {
                assert!(admits_in(&c, "lemo-dev", "rank"), "{field}");
            }
        }
    }
}

#[test]
fn ap_source_fields_refused() {
    const ACCOUNTS: &str = "write principals: [<trust-domain>/ns/<namespace>/sa/<name>] instead";
    const DOMAINS: &str = "write principals: [<trust-domain>/*] instead";
    for (field, value, why) in [
        ("serviceAccounts", "[lemo-dev/bff]", ACCOUNTS),
        ("notServiceAccounts", "[lemo-dev/bff]", ACCOUNTS),
        ("trustDomains", "[cluster.local]", DOMAINS),
        ("notTrustDomains", "[cluster.local]", DOMAINS),
    ] {
        refused(
            AP,
            &allow_from(&format!("{{{field}: {value}}}")),
            &format!("rules[0].from[0].source.{field}: not supported by mesh ({why})"),
        );
    }
}

// ------------------------------------------------------------ the table

/// Every test the table names exists (`conformance::name` in this file, `path.rs::name` under
/// mesh-node/src or, for `tests/...`, the workspace), and every test of this file is named by
/// some row.
#[test]
fn every_row_names_a_test_that_exists() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root");
    let table = std::fs::read_to_string(root.join("docs/conformance.md")).expect("docs/conformance.md");
    let here = include_str!("conformance.rs");
    let defines = |source: &str, name: &str| source.contains(&format!("fn {name}("));
    let mut rows = 0;
    for line in table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| Kind") && !l.starts_with("|--")) {
        rows += 1;
        let cells: Vec<&str> = line.split(" | ").collect();
        assert_eq!(cells.len(), 4, "kind | field | status | test: {line}");
        let status = cells[2];
        assert!(
            ["applied", "applied, more restrictive", "no effect by design", "refused"]
                .iter()
                .any(|s| status.starts_with(&format!("**{s}**"))),
            "status of {line}"
        );
        let cites: Vec<&str> = cells[3].split('`').skip(1).step_by(2).filter(|c| c.contains("::")).collect();
        assert!(cites.iter().any(|c| c.starts_with("conformance::")), "no unit test of this file in: {line}");
        for cite in cites {
            let (file, name) = cite.rsplit_once("::").expect("file::name");
            let source = match file {
                "conformance" => here.to_string(),
                f if f.starts_with("tests/") => std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")),
                f => std::fs::read_to_string(manifest.join("src").join(f)).unwrap_or_else(|e| panic!("{f}: {e}")),
            };
            assert!(defines(&source, name), "{cite} names no test ({line})");
        }
    }
    assert!(rows > 100, "only {rows} rows");
    // The README's summary counts the same rows.
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(readme.contains(&format!("one row per field ({rows} rows)")), "README row count is not {rows}");
    for status in ["applied", "applied, more restrictive", "no effect by design", "refused"] {
        let n = table.lines().filter(|l| l.contains(&format!(" | **{status}**"))).count();
        assert!(readme.contains(&format!("| {status} | {n} |")), "README count of {status} is not {n}");
    }
    let mut cited = table.clone();
    cited.push_str("every_row_names_a_test_that_exists");
    for name in here.split("#[test]\nfn ").skip(1).filter_map(|t| t.split('(').next()) {
        assert!(cited.contains(&format!("conformance::{name}`")) || name == "every_row_names_a_test_that_exists", "conformance::{name} is in no row");
    }
}
