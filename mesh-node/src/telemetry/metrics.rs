//! Istio's standard metrics, with Istio's names, labels and buckets, so the Istio Grafana
//! dashboards and Kiali's graph read them unchanged.
use std::collections::{HashMap, HashSet};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, core::Collector};

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
pub fn security_policy(mtls: bool) -> &'static str {
    if mtls { "mutual_tls" } else { "none" }
}

/// The peers and route of one request or connection.
pub struct Peering<'a> {
    pub reporter: Reporter,
    pub source: &'a Workload,
    pub destination: &'a Workload,
    pub service: &'a ServiceLabels,
    pub mtls: bool,
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

pub struct IstioMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    tcp_sent: IntCounterVec,
    tcp_received: IntCounterVec,
    tcp_opened: IntCounterVec,
    tcp_closed: IntCounterVec,
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

    pub fn record_request(&self, peering: &Peering, outcome: &RequestOutcome) {
        let p = peering.values();
        let mut v: [&str; 21] = [""; 21];
        v[..16].copy_from_slice(&p);
        v[16] = outcome.protocol;
        v[17] = outcome.code;
        v[18] = outcome.grpc_status;
        v[19] = outcome.flags;
        v[20] = security_policy(peering.mtls);
        self.requests.with_label_values(&v).inc();
        self.duration.with_label_values(&v).observe(outcome.duration_ms);
        self.request_bytes.with_label_values(&v).observe(outcome.request_bytes as f64);
        self.response_bytes.with_label_values(&v).observe(outcome.response_bytes as f64);
    }

    /// Counts a TCP connection as opened and returns its series.
    pub fn open_tcp(&self, peering: &Peering, flags: &str) -> TcpSeries {
        let p = peering.values();
        let mut v: [&str; 19] = [""; 19];
        v[..16].copy_from_slice(&p);
        v[16] = "tcp";
        v[17] = flags;
        v[18] = security_policy(peering.mtls);
        self.tcp_opened.with_label_values(&v).inc();
        TcpSeries { received: self.tcp_received.with_label_values(&v), sent: self.tcp_sent.with_label_values(&v), closed: self.tcp_closed.with_label_values(&v) }
    }

    /// Drops every series whose source or destination workload is not in `live` (namespace,
    /// name), so workloads that left the config leave the registry too. Series of "unknown"
    /// peers stay: they are bounded by the label values they can take.
    pub fn retain_workloads(&self, live: &HashSet<(String, String)>) -> usize {
        let mut removed = 0;
        for vec in [&self.requests, &self.tcp_sent, &self.tcp_received, &self.tcp_opened, &self.tcp_closed] {
            removed += retain(vec, live, |v, labels| v.remove(labels).is_ok());
        }
        for vec in [&self.duration, &self.request_bytes, &self.response_bytes] {
            removed += retain(vec, live, |v, labels| v.remove(labels).is_ok());
        }
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
