//! The serde layer for the Istio CRDs: field names and shapes exactly as
//! Istio's YAML has them, with unknown fields rejected (Istio's validation does
//! the same). Durations stay strings and integers stay wide so the validated
//! layer can report range and format problems together, with their paths.
//!
//! Some fields are accepted here only so that `unsupported.rs` can reject them
//! by name (`mirrors: not supported by mesh`) instead of as unknown fields;
//! they are typed [`Ignored`] when their content does not matter.

use std::collections::BTreeMap;

use serde::Deserialize;

// ---------------------------------------------------------------- shared

/// A duration as written. Bare numbers (`baseEjectionTime: 30`) are kept as
/// text so the validator can say `"30" is not a duration` rather than a
/// serde type error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl serde::de::Visitor<'_> for TextVisitor {
            type Value = DurationText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"10s\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// A field Istio defines but the proxy does not apply: only its presence is
/// kept, for `unsupported.rs` to report.
pub type Ignored = serde::de::IgnoredAny;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: i64,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    pub proxy_protocol: Option<Ignored>,
    pub tunnel: Option<Ignored>,
    pub retry_budget: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHash>,
    pub warmup_duration_secs: Option<Ignored>,
    pub warmup: Option<Ignored>,
    pub locality_lb_setting: Option<Ignored>,
    pub zone_aware_lb_setting: Option<Ignored>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SimpleLb {
    #[serde(rename = "UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "ROUND_ROBIN")]
    RoundRobin,
    #[serde(rename = "LEAST_REQUEST", alias = "LEAST_CONN")]
    LeastRequest,
    #[serde(rename = "RANDOM")]
    Random,
    #[serde(rename = "PASSTHROUGH")]
    Passthrough,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub minimum_ring_size: Option<i64>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    pub ttl: Option<DurationText>,
    pub path: Option<String>,
    pub attributes: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    pub minimum_ring_size: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    pub table_size: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<DurationText>,
    pub tcp_keepalive: Option<Ignored>,
    pub max_connection_duration: Option<Ignored>,
    pub idle_timeout: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<DurationText>,
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// `true` is what the proxy always does; `false` is refused (`unsupported`).
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<Ignored>,
    pub http2_keep_alive: Option<Ignored>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub consecutive_local_origin_failures: Option<i64>,
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<DurationText>,
    pub base_ejection_time: Option<DurationText>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
    pub outlier_detection_http_error_codes: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    pub mode: Option<TlsMode>,
    pub client_certificate: Option<Ignored>,
    pub private_key: Option<Ignored>,
    pub ca_certificates: Option<Ignored>,
    pub ca_crl: Option<Ignored>,
    pub credential_name: Option<Ignored>,
    pub subject_alt_names: Option<Ignored>,
    pub sni: Option<Ignored>,
    pub insecure_skip_verify: Option<Ignored>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

// ---------------------------------------------------------------- VirtualService

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub tls: Vec<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<DurationText>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub headers: Option<Headers>,
    pub mirror: Option<Ignored>,
    pub mirrors: Option<Ignored>,
    pub mirror_percentage: Option<Ignored>,
    pub mirror_percent: Option<Ignored>,
    pub cors_policy: Option<Ignored>,
    pub delegate: Option<Ignored>,
    pub direct_response: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<i64>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub ignore_uri_case: Option<bool>,
    pub stat_prefix: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<i64>,
    pub scheme: Option<String>,
    pub redirect_code: Option<i64>,
    pub derive_port: Option<Ignored>,
    pub prefix_rewrite: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<DurationText>,
    pub retry_on: Option<String>,
    /// `false` (the default) is accepted; `true` is rejected.
    pub retry_remote_localities: Option<bool>,
    /// `true` (the default) is what the proxy always does; `false` is rejected.
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub percentage: Option<Percent>,
    pub fixed_delay: Option<DurationText>,
    /// Deprecated integer form of `percentage`, used when `percentage` is not set.
    pub percent: Option<i64>,
    pub exponential_delay: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub percentage: Option<Percent>,
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Match {
    pub port: Option<i64>,
    #[serde(default)]
    pub destination_subnets: Vec<Ignored>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    pub source_subnet: Option<Ignored>,
}

// ---------------------------------------------------------------- PeerAuthentication

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<MapKey, Mtls>,
}

/// A port written either as a YAML number (`8080`) or a string (`"8080"`):
/// protobuf JSON writes integer map keys as strings, and AuthorizationPolicy
/// ports are strings in Istio's schema. The validator parses it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapKey(pub String);

impl<'de> Deserialize<'de> for MapKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = MapKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    pub mode: Option<MtlsMode>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<Ignored>,
    pub target_refs: Option<Ignored>,
    pub action: Option<AuthorizationAction>,
    pub provider: Option<Ignored>,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    Allow,
    Deny,
    Audit,
    Custom,
}

/// `from`/`to` stay `Option` because Istio rejects a present but empty list
/// (`from: []`), which would otherwise read as "any source".
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    pub from: Option<Vec<RuleFrom>>,
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Vec<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Option<AuthorizationSource>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationSource {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<Ignored>,
    #[serde(default)]
    pub not_request_principals: Vec<Ignored>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<Ignored>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<Ignored>,
    #[serde(default)]
    pub service_accounts: Vec<Ignored>,
    #[serde(default)]
    pub not_service_accounts: Vec<Ignored>,
    #[serde(default)]
    pub trust_domains: Vec<Ignored>,
    #[serde(default)]
    pub not_trust_domains: Vec<Ignored>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Option<AuthorizationOperation>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationOperation {
    #[serde(default)]
    pub ports: Vec<MapKey>,
    #[serde(default)]
    pub not_ports: Vec<MapKey>,
    #[serde(default)]
    pub hosts: Vec<Ignored>,
    #[serde(default)]
    pub not_hosts: Vec<Ignored>,
    #[serde(default)]
    pub methods: Vec<Ignored>,
    #[serde(default)]
    pub not_methods: Vec<Ignored>,
    #[serde(default)]
    pub paths: Vec<Ignored>,
    #[serde(default)]
    pub not_paths: Vec<Ignored>,
}
