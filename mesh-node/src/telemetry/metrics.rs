//! Istio's standard metrics, with Istio's names, labels and buckets, so the Istio Grafana
//! dashboards and Kiali's graph read them unchanged.
use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex},
};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, core::Collector};

use super::{
    TelemetryError,
    workload::{ServiceLabels, Workload},
};

/// Envoy's default histogram buckets, which Istio's proxies use for durations (ms) and sizes.
pub const BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's cluster label value for a single-cluster mesh.
pub const CLUSTER_ID: &str = "Kubernetes";

const PEER_LABELS: [&str; 16] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
];

fn http_labels() -> Vec<&'static str> {
    let mut l = PEER_LABELS.to_vec();
    l.extend(["request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy"]);
    l
}

fn tcp_labels() -> Vec<&'static str> {
    let mut l = PEER_LABELS.to_vec();
    l.extend(["request_protocol", "response_flags", "connection_security_policy"]);
    l
}

/// Which proxy reports: the caller's side or the callee's, as Istio's `reporter` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// `connection_security_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    /// Through a mutual-TLS tunnel between node proxies.
    MutualTls,
    /// Between mesh workloads without mutual TLS (same node, or tunnels in plaintext).
    None,
    /// To a destination outside the mesh, passed through as plain TCP.
    Unknown,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
            Security::Unknown => "unknown",
        }
    }

    /// What a connection from this node's proxy (`node`, tunnels in mutual TLS when `mtls`)
    /// to `destination` is: tunnelled only when the destination is a mesh pod on another node.
    pub fn toward(destination: &Workload, node: &str, mtls: bool) -> Security {
        if !destination.in_mesh {
            Security::Unknown
        } else if mtls && destination.node != node {
            Security::MutualTls
        } else {
            Security::None
        }
    }
}

/// The peers and route of one request or connection.
pub struct Peering<'a> {
    pub reporter: Reporter,
    pub source: &'a Workload,
    pub destination: &'a Workload,
    pub service: &'a ServiceLabels,
    pub security: Security,
}

impl Peering<'_> {
    fn values(&self) -> [&str; 16] {
        let (s, d) = (self.source, self.destination);
        [
            self.reporter.as_str(),
            &s.name,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            CLUSTER_ID,
            &d.name,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &self.service.fqdn,
            &self.service.name,
            &self.service.namespace,
            CLUSTER_ID,
        ]
    }
}

/// The result of one HTTP request.
pub struct RequestOutcome<'a> {
    pub protocol: &'a str,
    pub code: &'a str,
    pub grpc_status: &'a str,
    pub flags: &'a str,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// A TCP connection's series, looked up once when it opens: byte counts then add to them
/// as the bytes flow.
#[derive(Clone)]
pub struct TcpSeries {
    pub received: IntCounter,
    pub sent: IntCounter,
    closed: IntCounter,
}

impl TcpSeries {
    pub fn close(&self) {
        self.closed.inc();
    }
}

/// The four HTTP series of one label set, looked up once and then reused: `with_label_values`
/// hashes all 21 label values (FNV, byte by byte) and takes a read lock, four times per
/// request, which showed up in the node proxy's profile. The handles update the very same
/// series, so what `/metrics` shows is unchanged.
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// A request series' labels in cheap-to-compare form: the peers by identity (the [`Workload`]
/// and [`ServiceLabels`] of a config snapshot are shared `Arc`s; the entry holds them, so an
/// address cannot be reused by another value while it is cached) and the outcome's strings.
struct SeriesKey {
    reporter: Reporter,
    security: Security,
    source: Arc<Workload>,
    destination: Arc<Workload>,
    service: Arc<ServiceLabels>,
    protocol: Box<str>,
    code: Box<str>,
    grpc_status: Box<str>,
    flags: Box<str>,
}

impl SeriesKey {
    fn is(&self, p: &CachedPeering, o: &RequestOutcome) -> bool {
        self.reporter == p.reporter
            && self.security == p.security
            && Arc::ptr_eq(&self.source, p.source)
            && Arc::ptr_eq(&self.destination, p.destination)
            && Arc::ptr_eq(&self.service, p.service)
            && *self.protocol == *o.protocol
            && *self.code == *o.code
            && *self.grpc_status == *o.grpc_status
            && *self.flags == *o.flags
    }
}

/// A cached request peering: like [`Peering`], with the shared label sets themselves.
pub struct CachedPeering<'a> {
    pub reporter: Reporter,
    pub source: &'a Arc<Workload>,
    pub destination: &'a Arc<Workload>,
    pub service: &'a Arc<ServiceLabels>,
    pub security: Security,
}

/// The cache is keyed by an already mixed 64-bit hash.
#[derive(Default)]
struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type SeriesCache = HashMap<u64, Vec<(SeriesKey, Arc<RequestSeries>)>, BuildHasherDefault<U64Hasher>>;

/// Past this many label sets the cache starts over (a bound, never reached by a normal
/// cluster: entries are cleared at each config change anyway).
const SERIES_CACHE_MAX: usize = 4096;

/// Request series (label sets of `istio_requests_total` and its histograms) one proxy exports
/// at most; requests that would open a new one past it are counted in
/// `mesh_metric_series_overflow_total` instead of recorded.
pub const MAX_REQUEST_SERIES: usize = 20_000;

/// Requests not recorded because their series would pass [`MAX_REQUEST_SERIES`].
pub static SERIES_OVERFLOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
}

fn mix_str(mut h: u64, s: &str) -> u64 {
    for chunk in s.as_bytes().chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(w));
    }
    mix(h, s.len() as u64)
}

fn series_hash(p: &CachedPeering, o: &RequestOutcome) -> u64 {
    let mut h = mix(0, p.reporter as u64 | ((p.security as u64) << 8));
    h = mix(h, Arc::as_ptr(p.source) as u64);
    h = mix(h, Arc::as_ptr(p.destination) as u64);
    h = mix(h, Arc::as_ptr(p.service) as u64);
    for s in [o.protocol, o.code, o.grpc_status, o.flags] {
        h = mix_str(h, s);
    }
    h
}

pub struct IstioMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
    /// Handles of the HTTP series recorded so far; see [`RequestSeries`].
    series: Mutex<(SeriesCache, usize)>,
    /// Hashes of the request label sets recorded since the last prune, and how many series
    /// were left by that prune (counted against the cap too: conservative, since a series
    /// left by the prune is counted again when it is next recorded).
    exported: Mutex<(HashSet<u64>, usize)>,
    /// [`MAX_REQUEST_SERIES`], smaller in tests.
    series_cap: usize,
}

impl IstioMetrics {
    pub fn register(registry: &Registry) -> Result<Self, TelemetryError> {
        let (http, tcp) = (http_labels(), tcp_labels());
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let histogram = |name: &str, help: &str| HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), &http);
        let m = Self {
            requests: counter("istio_requests_total", "Requests processed by the proxy", &http)?,
            duration: histogram("istio_request_duration_milliseconds", "Duration of requests, in milliseconds")?,
            request_bytes: histogram("istio_request_bytes", "Request body sizes, in bytes")?,
            response_bytes: histogram("istio_response_bytes", "Response body sizes, in bytes")?,
            tcp_sent: counter("istio_tcp_sent_bytes_total", "Bytes sent to the downstream (response direction) of TCP connections", &tcp)?,
            tcp_received: counter("istio_tcp_received_bytes_total", "Bytes received from the downstream (request direction) of TCP connections", &tcp)?,
            tcp_opened: counter("istio_tcp_connections_opened_total", "TCP connections opened", &tcp)?,
            tcp_closed: counter("istio_tcp_connections_closed_total", "TCP connections closed", &tcp)?,
            series: Mutex::default(),
            exported: Mutex::default(),
            series_cap: MAX_REQUEST_SERIES,
        };
        for c in m.collectors() {
            registry.register(c)?;
        }
        Ok(m)
    }

    fn collectors(&self) -> [Box<dyn Collector>; 8] {
        [
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.request_bytes.clone()),
            Box::new(self.response_bytes.clone()),
            Box::new(self.tcp_sent.clone()),
            Box::new(self.tcp_received.clone()),
            Box::new(self.tcp_opened.clone()),
            Box::new(self.tcp_closed.clone()),
        ]
    }

    /// Records one request like [`Self::record_request`], through cached series handles.
    pub fn record_request_cached(&self, peering: &CachedPeering, outcome: &RequestOutcome) {
        let hash = series_hash(peering, outcome);
        let mut guard = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let (cache, len) = &mut *guard;
        let found = cache.get(&hash).and_then(|b| b.iter().find(|(k, _)| k.is(peering, outcome))).map(|(_, s)| s.clone());
        let series = match found {
            Some(s) => s,
            None => {
                if *len >= SERIES_CACHE_MAX {
                    cache.clear();
                    *len = 0;
                }
                let plain = Peering {
                    reporter: peering.reporter,
                    source: peering.source,
                    destination: peering.destination,
                    service: peering.service,
                    security: peering.security,
                };
                let v = Self::request_labels(&plain, outcome);
                if !self.admit_series(&v) {
                    SERIES_OVERFLOW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                let s = Arc::new(RequestSeries {
                    requests: self.requests.with_label_values(&v),
                    duration: self.duration.with_label_values(&v),
                    request_bytes: self.request_bytes.with_label_values(&v),
                    response_bytes: self.response_bytes.with_label_values(&v),
                });
                let key = SeriesKey {
                    reporter: peering.reporter,
                    security: peering.security,
                    source: peering.source.clone(),
                    destination: peering.destination.clone(),
                    service: peering.service.clone(),
                    protocol: outcome.protocol.into(),
                    code: outcome.code.into(),
                    grpc_status: outcome.grpc_status.into(),
                    flags: outcome.flags.into(),
                };
                cache.entry(hash).or_default().push((key, s.clone()));
                *len += 1;
                s
            }
        };
        // Recorded under the lock: `retain_workloads` takes it too, so no update can land in a
        // series it has just removed.
        series.requests.inc();
        series.duration.observe(outcome.duration_ms);
        series.request_bytes.observe(outcome.request_bytes as f64);
        series.response_bytes.observe(outcome.response_bytes as f64);
    }

    fn request_labels<'a>(peering: &'a Peering, outcome: &'a RequestOutcome) -> [&'a str; 21] {
        let p = peering.values();
        let mut v: [&str; 21] = [""; 21];
        v[..16].copy_from_slice(&p);
        v[16] = outcome.protocol;
        v[17] = outcome.code;
        v[18] = outcome.grpc_status;
        v[19] = outcome.flags;
        v[20] = peering.security.as_str();
        v
    }

    /// Whether the label set `v` is exported already or may be added under the cap.
    fn admit_series(&self, v: &[&str]) -> bool {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        v.hash(&mut h);
        let hash = h.finish();
        let mut guard = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let (exported, base) = &mut *guard;
        if exported.contains(&hash) {
            return true;
        }
        if exported.len() + *base >= self.series_cap {
            return false;
        }
        exported.insert(hash)
    }

    pub fn record_request(&self, peering: &Peering, outcome: &RequestOutcome) {
        let v = Self::request_labels(peering, outcome);
        if !self.admit_series(&v) {
            SERIES_OVERFLOW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        self.requests.with_label_values(&v).inc();
        self.duration.with_label_values(&v).observe(outcome.duration_ms);
        self.request_bytes.with_label_values(&v).observe(outcome.request_bytes as f64);
        self.response_bytes.with_label_values(&v).observe(outcome.response_bytes as f64);
    }

    /// Counts `n` TCP connections as opened that no proxy carries (the kernel judged them).
    pub fn count_tcp_opened(&self, peering: &Peering, flags: &str, n: u64) {
        let p = peering.values();
        let mut v: [&str; 19] = [""; 19];
        v[..16].copy_from_slice(&p);
        v[16] = "tcp";
        v[17] = flags;
        v[18] = peering.security.as_str();
        self.tcp_opened.with_label_values(&v).inc_by(n);
    }

    /// Counts a TCP connection as opened and returns its series.
    pub fn open_tcp(&self, peering: &Peering, flags: &str) -> TcpSeries {
        let p = peering.values();
        let mut v: [&str; 19] = [""; 19];
        v[..16].copy_from_slice(&p);
        v[16] = "tcp";
        v[17] = flags;
        v[18] = peering.security.as_str();
        self.tcp_opened.with_label_values(&v).inc();
        TcpSeries { received: self.tcp_received.with_label_values(&v), sent: self.tcp_sent.with_label_values(&v), closed: self.tcp_closed.with_label_values(&v) }
    }

    /// Drops every series whose source or destination workload is not in `live` (namespace,
    /// name), so workloads that left the config leave the registry too. Series of "unknown"
    /// peers stay: they are bounded by the label values they can take.
    pub fn retain_workloads(&self, live: &HashSet<(String, String)>) -> usize {
        // Cached handles of removed series would count into series no longer exported: start
        // the cache over, holding its lock so no request records in between.
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        *series = Default::default();
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for vec in [&self.requests, &self.tcp_sent, &self.tcp_received, &self.tcp_opened, &self.tcp_closed] {
            removed += retain(vec, live, |v, labels| v.remove(labels).is_ok());
        }
        for vec in [&self.duration, &self.request_bytes, &self.response_bytes] {
            removed += retain(vec, live, |v, labels| v.remove(labels).is_ok());
        }
        let left = self.requests.collect().first().map_or(0, |f| f.get_metric().len());
        *exported = (HashSet::new(), left);
        removed
    }
}

fn retain<V: Collector>(vec: &V, live: &HashSet<(String, String)>, remove: impl Fn(&V, &HashMap<&str, &str>) -> bool) -> usize {
    let is_stale = |ns: &str, name: &str| name != super::workload::UNKNOWN && !live.contains(&(ns.to_string(), name.to_string()));
    let mut removed = 0;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric.get_label().iter().map(|l| (l.name(), l.value())).collect();
            let get = |k: &str| labels.get(k).copied().unwrap_or_default();
            let stale = is_stale(get("source_workload_namespace"), get("source_workload"))
                || is_stale(get("destination_workload_namespace"), get("destination_workload"));
            if stale && remove(vec, &labels) {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus::{Encoder as _, Registry, TextEncoder};

    use super::*;

    fn text(registry: &Registry) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn workload(name: &str) -> Arc<Workload> {
        Arc::new(Workload { name: name.into(), namespace: "ns".into(), node: "n".into(), ..Workload::unknown() })
    }

    /// The cached handles export exactly what per-request label lookups export.
    #[test]
    fn cached_series_record_what_label_lookups_record() {
        let (plain_reg, cached_reg) = (Registry::new(), Registry::new());
        let (plain, cached) = (IstioMetrics::register(&plain_reg).unwrap(), IstioMetrics::register(&cached_reg).unwrap());
        let (a, b, svc) = (workload("a"), workload("b"), Arc::new(ServiceLabels::unknown()));
        for (i, (code, grpc, flags)) in [("200", "", "-"), ("200", "", "-"), ("503", "", "UF"), ("200", "0", "-"), ("200", "14", "-"), ("200", "0", "-")].into_iter().enumerate() {
            let outcome = RequestOutcome {
                protocol: if grpc.is_empty() { "http" } else { "grpc" },
                code,
                grpc_status: grpc,
                flags,
                duration_ms: i as f64 * 3.0,
                request_bytes: 1024,
                response_bytes: 100 * i as u64,
            };
            for (reporter, src, dst) in [(Reporter::Source, &a, &b), (Reporter::Destination, &a, &b), (Reporter::Source, &b, &a)] {
                plain.record_request(&Peering { reporter, source: src, destination: dst, service: &svc, security: Security::MutualTls }, &outcome);
                cached.record_request_cached(&CachedPeering { reporter, source: src, destination: dst, service: &svc, security: Security::MutualTls }, &outcome);
            }
        }
        assert_eq!(text(&plain_reg), text(&cached_reg));
        assert!(text(&cached_reg).contains("istio_requests_total"));
    }

    /// Principals are label values as they are: dots and 253-character service accounts
    /// included, nothing cut.
    #[test]
    fn principals_with_dots_and_the_longest_names_are_exported_whole() {
        let registry = Registry::new();
        let m = IstioMetrics::register(&registry).unwrap();
        let long = format!("spiffe://cluster.local/ns/n{}/sa/{}.{}", "s".repeat(62), "a".repeat(126), "b".repeat(126));
        let with_principal = |name: &str, principal: &str| Arc::new(Workload { name: name.into(), principal: principal.into(), ..Workload::unknown() });
        let (a, b) = (with_principal("a", "spiffe://cluster.local/ns/lemo-dev/sa/recall.reader"), with_principal("b", &long));
        let svc = Arc::new(ServiceLabels::unknown());
        let outcome = RequestOutcome { protocol: "http", code: "200", grpc_status: "", flags: "-", duration_ms: 1.0, request_bytes: 1, response_bytes: 1 };
        m.record_request_cached(&CachedPeering { reporter: Reporter::Destination, source: &a, destination: &b, service: &svc, security: Security::MutualTls }, &outcome);
        let text = text(&registry);
        let series = text.lines().find(|l| l.starts_with("istio_requests_total{")).unwrap_or_else(|| panic!("{text}"));
        assert!(series.contains("source_principal=\"spiffe://cluster.local/ns/lemo-dev/sa/recall.reader\""), "{series}");
        assert!(series.contains(&format!("destination_principal=\"{long}\"")), "{series}");
    }

    /// A series dropped by `retain_workloads` is recreated by the next request, not updated
    /// through a stale handle.
    #[test]
    fn retain_workloads_starts_the_cache_over() {
        let registry = Registry::new();
        let m = IstioMetrics::register(&registry).unwrap();
        let (a, b, svc) = (workload("a"), workload("b"), Arc::new(ServiceLabels::unknown()));
        let outcome = RequestOutcome { protocol: "http", code: "200", grpc_status: "", flags: "-", duration_ms: 1.0, request_bytes: 1, response_bytes: 1 };
        let peering = CachedPeering { reporter: Reporter::Source, source: &a, destination: &b, service: &svc, security: Security::None };
        m.record_request_cached(&peering, &outcome);
        assert_eq!(m.retain_workloads(&HashSet::new()), 4);
        assert!(!text(&registry).contains("istio_requests_total{"));
        m.record_request_cached(&peering, &outcome);
        assert!(text(&registry).contains("istio_requests_total{"));
        assert!(text(&registry).contains("istio_requests_total{") && text(&registry).lines().any(|l| l.starts_with("istio_requests_total{") && l.ends_with(" 1")));
    }
}

#[cfg(test)]
mod series_cap_tests {
    use super::*;
    use crate::telemetry::workload::{ServiceLabels, Workload};

    #[test]
    fn new_series_past_the_cap_are_counted_not_recorded() {
        let registry = Registry::new();
        let mut m = IstioMetrics::register(&registry).unwrap();
        m.series_cap = 10;
        let (w, svc) = (Workload::unknown(), ServiceLabels::unknown());
        let peering = Peering { reporter: Reporter::Source, source: &w, destination: &w, service: &svc, security: Security::None };
        let before = SERIES_OVERFLOW.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..15 {
            let code = format!("{}", 200 + i);
            let outcome = RequestOutcome { protocol: "http", code: &code, grpc_status: "", flags: "-", duration_ms: 1.0, request_bytes: 0, response_bytes: 0 };
            m.record_request(&peering, &outcome);
            // An existing series keeps counting.
            m.record_request(&peering, &outcome);
        }
        let series = m.requests.collect()[0].get_metric().len();
        assert_eq!(series, 10);
        assert!(SERIES_OVERFLOW.load(std::sync::atomic::Ordering::Relaxed) >= before + 10, "5 new series, twice each");
    }
}
