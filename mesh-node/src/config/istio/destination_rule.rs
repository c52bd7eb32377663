//! `DestinationRule`: the validated model and its checks.

use std::collections::BTreeMap;
use std::time::Duration;

use super::raw;
use super::{common, unsupported};
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;

#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    /// As written; short names are relative to `namespace`.
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    /// Empty means exported everywhere (Istio's default). `workloadSelector`
    /// is not supported, so a rule applies to every client.
    pub export_to: Vec<String>,
    /// The mesh's own extensions, from `metadata.annotations["mesh.io/*"]`.
    pub mesh: MeshPolicy,
    /// `metadata.creationTimestamp` (seconds since the epoch); breaks ties between equally
    /// specific rules of one namespace (the older wins). `None` orders first.
    pub created: Option<i64>,
}

/// Options Istio's schema has no field for, set by annotations on the DestinationRule and
/// applied to every port and subset of its host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshPolicy {
    /// `mesh.io/load-balancer: peak-ewma`: latency-aware balancing instead of the
    /// `trafficPolicy.loadBalancer` policy (the two cannot be combined).
    pub peak_ewma: bool,
    /// `mesh.io/rate-limit` (and `mesh.io/rate-limit-burst`): one token bucket per Service
    /// on each node.
    pub rate_limit: Option<RateLimit>,
    /// `mesh.io/adaptive-concurrency: "on"` (and `mesh.io/adaptive-concurrency-max`): one
    /// gradient concurrency limiter per Service on each node; the value is its upper bound.
    pub adaptive_concurrency: Option<u32>,
}

/// Default upper bound of an adaptive concurrency limit.
pub const DEFAULT_ADAPTIVE_CONCURRENCY_MAX: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket size: requests admitted at once after a quiet spell.
    pub burst: u32,
}

pub const ANNOTATION_LOAD_BALANCER: &str = "mesh.io/load-balancer";
pub const ANNOTATION_RATE_LIMIT: &str = "mesh.io/rate-limit";
pub const ANNOTATION_RATE_LIMIT_BURST: &str = "mesh.io/rate-limit-burst";
pub const ANNOTATION_ADAPTIVE_CONCURRENCY: &str = "mesh.io/adaptive-concurrency";
pub const ANNOTATION_ADAPTIVE_CONCURRENCY_MAX: &str = "mesh.io/adaptive-concurrency-max";
const MESH_ANNOTATIONS: [&str; 5] = [
    ANNOTATION_LOAD_BALANCER,
    ANNOTATION_RATE_LIMIT,
    ANNOTATION_RATE_LIMIT_BURST,
    ANNOTATION_ADAPTIVE_CONCURRENCY,
    ANNOTATION_ADAPTIVE_CONCURRENCY_MAX,
];

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub name: String,
    /// Pods of the Service that also carry these labels form the subset.
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy for this subset.
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Every part is optional: `None` means "not configured" and the proxy
/// applies Istio's default documented on each field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

impl TrafficPolicy {
    /// The settings for `port`: a matching `portLevelSettings` entry replaces
    /// each part it sets, as in Istio.
    pub fn for_port(&self, port: u16) -> TrafficPolicy {
        let mut out = TrafficPolicy {
            port_level_settings: Vec::new(),
            ..self.clone()
        };
        if let Some(p) = self.port_level_settings.iter().find(|p| p.port == port) {
            if p.load_balancer.is_some() {
                out.load_balancer = p.load_balancer.clone();
            }
            if p.connection_pool.is_some() {
                out.connection_pool = p.connection_pool.clone();
            }
            if p.outlier_detection.is_some() {
                out.outlier_detection = p.outlier_detection.clone();
            }
            if p.tls.is_some() {
                out.tls = p.tls.clone();
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortTrafficPolicy {
    pub port: u16,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

/// `warmupDurationSecs`, `warmup` and `localityLbSetting` are not supported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancer {
    pub policy: LbPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbPolicy {
    Simple(SimpleLb),
    ConsistentHash(ConsistentHash),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimpleLb {
    /// Istio picks its default, which is `LeastRequest`.
    Unspecified,
    RoundRobin,
    /// Also written `LEAST_CONN` (deprecated alias).
    LeastRequest,
    Random,
    /// Not supported (rejected by validation, never in a loaded config); kept
    /// for the balancer's exhaustive match.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistentHash {
    pub key: HashKey,
    /// `None` = Istio's default (ring hash, 1024 entries).
    pub algorithm: Option<HashAlgorithm>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    HttpHeaderName(String),
    HttpCookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
    },
    UseSourceIp,
    HttpQueryParameterName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// From `ringHash.minimumRingSize` or the deprecated top-level `minimumRingSize`.
    RingHash {
        minimum_ring_size: Option<u64>,
    },
    Maglev {
        table_size: Option<u64>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

/// `None` fields: Envoy's defaults (2^32-1 connections, 10s connect timeout).
/// `tcpKeepalive`, `maxConnectionDuration` and `idleTimeout` are not supported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    /// Always `None`: `tcp.idleTimeout` is rejected until L4 connections
    /// enforce it (`limits` already reads this field).
    pub idle_timeout: Option<Duration>,
}

/// `None` fields: unlimited, except `idle_timeout` (1h in Istio).
/// `maxConcurrentStreams` is not supported. `useClientProtocol: true` is what the proxy always
/// does (forward in the client's HTTP version); `false` is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    /// 0 or `None` = unlimited; 1 disables keep-alive.
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: H2UpgradePolicy,
    /// `useClientProtocol: true`: requests go upstream in the client's HTTP version.
    pub use_client_protocol: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum H2UpgradePolicy {
    /// Mesh-wide default (Istio: do not upgrade).
    #[default]
    Default,
    DoNotUpgrade,
    // UPGRADE is not supported.
}

/// `None` fields take Istio's defaults: 5 consecutive 5xx errors, 10s
/// interval, 30s base ejection time, 10% max ejection, 0% min health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Also set by the deprecated `consecutiveErrors`.
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: bool,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

impl OutlierDetection {
    pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
}

/// Only `mode` is supported; every other `tls` field is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// Required by Istio; a `tls` block without it is an error.
    pub mode: TlsMode,
}

/// Only ISTIO_MUTUAL, which is how the proxy always reaches mesh pods (HBONE tunnels with the
/// workloads' certificates; refused without a CA). DISABLE, SIMPLE and MUTUAL are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    IstioMutual,
}

pub(crate) fn convert(
    spec: &raw::DestinationRuleSpec,
    namespace: &str,
    name: &str,
    annotations: &BTreeMap<String, String>,
    r: &mut Reporter<'_>,
) -> DestinationRule {
    unsupported::destination_rule(r, spec);
    let root = FieldPath::root();
    if spec.host.trim().is_empty() {
        r.at(&root.key("host"), "is required");
    }
    let traffic_policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| policy(r, &root.key("trafficPolicy"), tp));
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let path = root.key("subsets").index(i);
        if !common::is_dns_label(&s.name) {
            r.at(
                &path.key("name"),
                format!("{:?} is not a valid subset name (DNS-1123 label)", s.name),
            );
        } else if subsets.iter().any(|seen| seen.name == s.name) {
            r.at(
                &path.key("name"),
                format!("duplicate subset name {:?}", s.name),
            );
        }
        let traffic_policy = s
            .traffic_policy
            .as_ref()
            .map(|tp| policy(r, &path.key("trafficPolicy"), tp));
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            traffic_policy,
        });
    }
    DestinationRule {
        namespace: namespace.to_string(),
        name: name.to_string(),
        host: spec.host.clone(),
        traffic_policy,
        subsets,
        export_to: common::export_to(r, &root.key("exportTo"), &spec.export_to),
        mesh: mesh_policy(r, annotations, spec),
        created: None,
    }
}

/// Reads and checks the `mesh.io/*` annotations; other annotations are not ours to judge.
fn mesh_policy(r: &mut Reporter<'_>, annotations: &BTreeMap<String, String>, spec: &raw::DestinationRuleSpec) -> MeshPolicy {
    let path = |key: &str| FieldPath::of(&["metadata", "annotations"]).key(key);
    for key in annotations.keys().filter(|k| k.starts_with("mesh.io/")) {
        if !MESH_ANNOTATIONS.contains(&key.as_str()) {
            r.at(&path(key), format!("unknown mesh annotation (expected one of: {})", MESH_ANNOTATIONS.join(", ")));
        }
    }
    let peak_ewma = match annotations.get(ANNOTATION_LOAD_BALANCER).map(String::as_str) {
        None => false,
        Some("peak-ewma") => {
            let tp_has_lb = |tp: &raw::TrafficPolicy| {
                tp.load_balancer.is_some() || tp.port_level_settings.iter().any(|p| p.load_balancer.is_some())
            };
            let conflict = spec.traffic_policy.as_ref().is_some_and(tp_has_lb)
                || spec.subsets.iter().any(|s| s.traffic_policy.as_ref().is_some_and(tp_has_lb));
            if conflict {
                r.at(&path(ANNOTATION_LOAD_BALANCER), "peak-ewma cannot be combined with a loadBalancer in the trafficPolicy");
            }
            true
        }
        Some(other) => {
            r.at(&path(ANNOTATION_LOAD_BALANCER), format!("{other:?} is not one of peak-ewma"));
            false
        }
    };
    let per_second = annotations.get(ANNOTATION_RATE_LIMIT).and_then(|v| match parse_rate(v) {
        Some(rate) => Some(rate),
        None => {
            r.at(&path(ANNOTATION_RATE_LIMIT), format!("{v:?} is not a rate like \"100/s\" or \"600/m\""));
            None
        }
    });
    let burst = annotations.get(ANNOTATION_RATE_LIMIT_BURST).and_then(|v| {
        if !annotations.contains_key(ANNOTATION_RATE_LIMIT) {
            r.at(&path(ANNOTATION_RATE_LIMIT_BURST), format!("needs {ANNOTATION_RATE_LIMIT}"));
            return None;
        }
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                r.at(&path(ANNOTATION_RATE_LIMIT_BURST), format!("{v:?} is not a positive whole number of requests"));
                None
            }
        }
    });
    let rate_limit = per_second.map(|per_second| RateLimit {
        per_second,
        // One second's worth of tokens, and at least one request.
        burst: burst.unwrap_or_else(|| (per_second.ceil() as u32).max(1)),
    });
    let adaptive = match annotations.get(ANNOTATION_ADAPTIVE_CONCURRENCY).map(|v| v.trim()) {
        None | Some("off") => false,
        Some("on") => true,
        Some(other) => {
            r.at(&path(ANNOTATION_ADAPTIVE_CONCURRENCY), format!("{other:?} is not one of on, off"));
            false
        }
    };
    let max = annotations.get(ANNOTATION_ADAPTIVE_CONCURRENCY_MAX).and_then(|v| {
        if !adaptive {
            r.at(&path(ANNOTATION_ADAPTIVE_CONCURRENCY_MAX), format!("needs {ANNOTATION_ADAPTIVE_CONCURRENCY}: \"on\""));
            return None;
        }
        match v.trim().parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                r.at(&path(ANNOTATION_ADAPTIVE_CONCURRENCY_MAX), format!("{v:?} is not a positive whole number of requests"));
                None
            }
        }
    });
    let adaptive_concurrency = adaptive.then(|| max.unwrap_or(DEFAULT_ADAPTIVE_CONCURRENCY_MAX));
    MeshPolicy { peak_ewma, rate_limit, adaptive_concurrency }
}

/// `"<n>/s"` or `"<n>/m"` with a positive whole `n`, as requests per second.
fn parse_rate(text: &str) -> Option<f64> {
    let (n, unit) = text.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|&n| n > 0)?;
    match unit.trim() {
        "s" => Some(f64::from(n)),
        "m" => Some(f64::from(n) / 60.0),
        _ => None,
    }
}

fn policy(r: &mut Reporter<'_>, path: &FieldPath, tp: &raw::TrafficPolicy) -> TrafficPolicy {
    let mut port_level_settings: Vec<PortTrafficPolicy> = Vec::new();
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let path = path.key("portLevelSettings").index(i);
        let Some(selector) = p.port else {
            r.at(&path.key("port"), "is required");
            continue;
        };
        let Some(port) = common::port(r, &path.key("port").key("number"), selector.number) else {
            continue;
        };
        if port_level_settings.iter().any(|seen| seen.port == port) {
            r.at(
                &path.key("port").key("number"),
                format!("port {port} has settings already"),
            );
        }
        port_level_settings.push(PortTrafficPolicy {
            port,
            load_balancer: p
                .load_balancer
                .as_ref()
                .map(|lb| load_balancer(r, &path.key("loadBalancer"), lb)),
            connection_pool: p
                .connection_pool
                .as_ref()
                .map(|cp| connection_pool(r, &path.key("connectionPool"), cp)),
            outlier_detection: p
                .outlier_detection
                .as_ref()
                .map(|od| outlier_detection(r, &path.key("outlierDetection"), od)),
            tls: p
                .tls
                .as_ref()
                .and_then(|t| client_tls(r, &path.key("tls"), t)),
        });
    }
    TrafficPolicy {
        load_balancer: tp
            .load_balancer
            .as_ref()
            .map(|lb| load_balancer(r, &path.key("loadBalancer"), lb)),
        connection_pool: tp
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(r, &path.key("connectionPool"), cp)),
        outlier_detection: tp
            .outlier_detection
            .as_ref()
            .map(|od| outlier_detection(r, &path.key("outlierDetection"), od)),
        tls: tp
            .tls
            .as_ref()
            .and_then(|t| client_tls(r, &path.key("tls"), t)),
        port_level_settings,
    }
}

fn load_balancer(r: &mut Reporter<'_>, path: &FieldPath, lb: &raw::LoadBalancer) -> LoadBalancer {
    let policy = match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            r.at(path, "only one of simple or consistentHash may be set");
            LbPolicy::Simple(SimpleLb::Unspecified)
        }
        // PASSTHROUGH is reported by `unsupported`.
        (Some(simple), None) => LbPolicy::Simple(match simple {
            raw::SimpleLb::Unspecified => SimpleLb::Unspecified,
            raw::SimpleLb::RoundRobin => SimpleLb::RoundRobin,
            raw::SimpleLb::LeastRequest => SimpleLb::LeastRequest,
            raw::SimpleLb::Random => SimpleLb::Random,
            raw::SimpleLb::Passthrough => SimpleLb::Passthrough,
        }),
        (None, Some(ch)) => match consistent_hash(r, &path.key("consistentHash"), ch) {
            Some(ch) => LbPolicy::ConsistentHash(ch),
            None => LbPolicy::Simple(SimpleLb::Unspecified),
        },
        (None, None) => LbPolicy::Simple(SimpleLb::Unspecified),
    };
    LoadBalancer { policy }
}

fn consistent_hash(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    ch: &raw::ConsistentHash,
) -> Option<ConsistentHash> {
    let mut keys: Vec<HashKey> = Vec::new();
    if let Some(h) = &ch.http_header_name {
        if h.is_empty() {
            r.at(&path.key("httpHeaderName"), "must not be empty");
        }
        keys.push(HashKey::HttpHeaderName(h.clone()));
    }
    if let Some(c) = &ch.http_cookie {
        let cpath = path.key("httpCookie");
        if c.name.is_empty() {
            r.at(&cpath.key("name"), "is required");
        }
        // A zero TTL is meaningful for cookies (session cookie), so only the
        // format is checked, not Istio's 1ms minimum.
        let ttl =
            c.ttl
                .as_ref()
                .and_then(|t| match crate::config::duration::parse_duration(&t.0) {
                    Ok(d) => Some(d),
                    Err(m) => {
                        r.at(&cpath.key("ttl"), m);
                        None
                    }
                });
        keys.push(HashKey::HttpCookie {
            name: c.name.clone(),
            ttl,
            path: c.path.clone(),
        });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::UseSourceIp);
    }
    if let Some(q) = &ch.http_query_parameter_name {
        if q.is_empty() {
            r.at(&path.key("httpQueryParameterName"), "must not be empty");
        }
        keys.push(HashKey::HttpQueryParameterName(q.clone()));
    }
    if keys.len() > 1 {
        r.at(
            path,
            "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
        );
        return None;
    }
    let Some(key) = keys.pop() else {
        r.at(
            path,
            "one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required",
        );
        return None;
    };
    // Each table is built per upstream cluster by any tenant's rule: its size is capped
    // (ring entries take 16 bytes, Maglev slots 4), with an error rather than a silent clamp.
    let ring = |r: &mut Reporter<'_>, p: &FieldPath, v: Option<i64>| {
        if let Some(v) = v
            && v > MAX_HASH_TABLE_SIZE
        {
            r.at(p, format!("{v} is over the node proxy's cap of {MAX_HASH_TABLE_SIZE} entries per upstream cluster (memory is shared by every workload of the node)"));
            return None;
        }
        common::int_in(r, p, v, 0, MAX_HASH_TABLE_SIZE).map(u64::from)
    };
    let algorithms = [
        ch.minimum_ring_size.is_some(),
        ch.ring_hash.is_some(),
        ch.maglev.is_some(),
    ];
    if algorithms.iter().filter(|set| **set).count() > 1 {
        r.at(
            path,
            "only one of minimumRingSize, ringHash or maglev may be set",
        );
        return None;
    }
    let algorithm = if let Some(size) = ch.minimum_ring_size {
        Some(HashAlgorithm::RingHash {
            minimum_ring_size: ring(r, &path.key("minimumRingSize"), Some(size)),
        })
    } else if let Some(rh) = &ch.ring_hash {
        Some(HashAlgorithm::RingHash {
            minimum_ring_size: ring(
                r,
                &path.key("ringHash").key("minimumRingSize"),
                rh.minimum_ring_size,
            ),
        })
    } else {
        ch.maglev.as_ref().map(|m| HashAlgorithm::Maglev {
            table_size: ring(r, &path.key("maglev").key("tableSize"), m.table_size),
        })
    };
    Some(ConsistentHash { key, algorithm })
}

/// The largest `minimumRingSize` / `maglev.tableSize` a rule may ask for: 2^20 entries (a
/// 16 MiB ring, a 4 MiB Maglev table per upstream cluster). Envoy's own ceiling is 8M ring
/// entries; a node proxy shared by every workload of the node cannot give one tenant that.
pub const MAX_HASH_TABLE_SIZE: i64 = 1 << 20;

fn connection_pool(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    cp: &raw::ConnectionPool,
) -> ConnectionPool {
    let tcp = cp.tcp.as_ref().map(|t| {
        let p = path.key("tcp");
        TcpSettings {
            max_connections: common::non_negative(r, &p.key("maxConnections"), t.max_connections),
            connect_timeout: common::duration(
                r,
                &p.key("connectTimeout"),
                t.connect_timeout.as_ref(),
            ),
            idle_timeout: None,
        }
    });
    let http = cp.http.as_ref().map(|h| {
        let p = path.key("http");
        HttpSettings {
            http1_max_pending_requests: common::non_negative(
                r,
                &p.key("http1MaxPendingRequests"),
                h.http1_max_pending_requests,
            ),
            http2_max_requests: common::non_negative(
                r,
                &p.key("http2MaxRequests"),
                h.http2_max_requests,
            ),
            max_requests_per_connection: common::non_negative(
                r,
                &p.key("maxRequestsPerConnection"),
                h.max_requests_per_connection,
            ),
            max_retries: common::non_negative(r, &p.key("maxRetries"), h.max_retries),
            idle_timeout: common::duration(r, &p.key("idleTimeout"), h.idle_timeout.as_ref()),
            h2_upgrade_policy: match h.h2_upgrade_policy {
                // UPGRADE is reported by `unsupported`.
                None | Some(raw::H2UpgradePolicy::Default | raw::H2UpgradePolicy::Upgrade) => {
                    H2UpgradePolicy::Default
                }
                Some(raw::H2UpgradePolicy::DoNotUpgrade) => H2UpgradePolicy::DoNotUpgrade,
            },
            use_client_protocol: h.use_client_protocol == Some(true),
        }
    });
    ConnectionPool { tcp, http }
}

fn outlier_detection(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    od: &raw::OutlierDetection,
) -> OutlierDetection {
    let five_xx = match (od.consecutive_5xx_errors, od.consecutive_errors) {
        (Some(_), Some(_)) => {
            r.at(
                &path.key("consecutiveErrors"),
                "is a deprecated alias of consecutive5xxErrors; set only one",
            );
            None
        }
        (Some(v), None) => common::non_negative(r, &path.key("consecutive5xxErrors"), Some(v)),
        (None, legacy) => common::non_negative(r, &path.key("consecutiveErrors"), legacy),
    };
    OutlierDetection {
        consecutive_5xx_errors: five_xx,
        consecutive_gateway_errors: common::non_negative(
            r,
            &path.key("consecutiveGatewayErrors"),
            od.consecutive_gateway_errors,
        ),
        consecutive_local_origin_failures: common::non_negative(
            r,
            &path.key("consecutiveLocalOriginFailures"),
            od.consecutive_local_origin_failures,
        ),
        split_external_local_origin_errors: od.split_external_local_origin_errors.unwrap_or(false),
        interval: common::duration(r, &path.key("interval"), od.interval.as_ref()),
        base_ejection_time: common::duration(
            r,
            &path.key("baseEjectionTime"),
            od.base_ejection_time.as_ref(),
        ),
        max_ejection_percent: common::int_in(
            r,
            &path.key("maxEjectionPercent"),
            od.max_ejection_percent,
            0,
            100,
        ),
        min_health_percent: common::int_in(
            r,
            &path.key("minHealthPercent"),
            od.min_health_percent,
            0,
            100,
        ),
    }
}

fn client_tls(r: &mut Reporter<'_>, path: &FieldPath, tls: &raw::ClientTls) -> Option<ClientTls> {
    let mode = match tls.mode {
        None => {
            r.at(&path.key("mode"), "is required");
            return None;
        }
        Some(raw::TlsMode::IstioMutual) => TlsMode::IstioMutual,
        // Reported by `unsupported`.
        Some(raw::TlsMode::Disable | raw::TlsMode::Simple | raw::TlsMode::Mutual) => return None,
    };
    Some(ClientTls { mode })
}
