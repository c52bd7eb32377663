//! Metrics, traces, access logs and the live-connections list, fed from the data path.
//!
//! Files: `metrics` (Istio's standard metrics), `mesh_metrics` (the mesh's own, read at scrape
//! time), `workload` (peer labels per config snapshot), `request` (an HTTP request, recorded at
//! the end of its response body), `tcp` (a TCP connection), `connections` (live list and byte
//! counting), `propagation` (W3C and B3 headers), `trace` (sampling and spans), `otlp` (span
//! export), `access_log`, `server` (`/metrics` on 15020).
pub mod access_log;
pub mod connections;
pub mod mesh_metrics;
pub mod metrics;
pub mod otlp;
pub mod plaintext;
pub mod propagation;
pub mod request;
pub mod server;
pub mod tcp;
pub mod trace;
pub mod workload;

use std::{net::SocketAddr, sync::Arc};

use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::sync::{mpsc, watch};
use tracing::info;

pub use access_log::AccessLogFormat;
pub use connections::LiveConnection;
pub use mesh_metrics::{MeshSources, outlier_ejected};
pub use request::{HttpExchange, RouteOutcome};
pub use tcp::{TcpConnection, TcpRoute};

use crate::config::Cluster;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("OTLP endpoint {endpoint:?}: {reason}")]
    OtlpEndpoint { endpoint: String, reason: String },
    #[error("access log format {0:?} is not one of off, text, json")]
    AccessLogFormat(String),
    #[error("trace sampling {0} is not between 0 and 1")]
    Sampling(f64),
    #[error("encoding metrics: {0}")]
    Encode(String),
}

/// What `mesh-node run` is told about telemetry.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// Where `/metrics` listens; `None` turns the Istio metrics off entirely.
    pub metrics: Option<SocketAddr>,
    /// OTLP/gRPC collector; `None` turns tracing off (trace headers then pass untouched).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (a caller's decision is always kept).
    pub trace_sampling: f64,
    pub access_log: AccessLogFormat,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        Self { metrics: Some(SocketAddr::from(([0, 0, 0, 0], 15020))), otlp_endpoint: None, trace_sampling: 0.01, access_log: AccessLogFormat::Off }
    }
}

/// The node's telemetry, shared by every connection handler (`ProxyContext::telemetry`).
pub struct Telemetry {
    node: String,
    config: watch::Receiver<Arc<Cluster>>,
    /// Tunnels between nodes are mutual TLS.
    mtls: bool,
    registry: Registry,
    metrics: Option<metrics::IstioMetrics>,
    plaintext: Option<plaintext::PlaintextMetrics>,
    workloads: workload::WorkloadCache,
    access_log: access_log::AccessLog,
    tracer: Option<trace::Tracer>,
    connections: Arc<connections::ConnectionRegistry>,
}

impl Telemetry {
    /// Sets up what `opts` turns on; starts the span exporter (inside a Tokio runtime).
    pub fn new(opts: &TelemetryOptions, node: &str, config: watch::Receiver<Arc<Cluster>>, trust_domain: &str, mtls: bool) -> Result<Self, TelemetryError> {
        if !(0.0..=1.0).contains(&opts.trace_sampling) {
            return Err(TelemetryError::Sampling(opts.trace_sampling));
        }
        let registry = Registry::new();
        let (metrics, plaintext) = match opts.metrics {
            Some(_) => {
                registry.register(Box::new(mesh_metrics::OUTLIER_EJECTIONS.clone()))?;
                registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
                (Some(metrics::IstioMetrics::register(&registry)?), Some(plaintext::PlaintextMetrics::register(&registry)?))
            }
            None => (None, None),
        };
        let tracer = match &opts.otlp_endpoint {
            Some(endpoint) => {
                let (tx, rx) = mpsc::channel(otlp::QUEUE);
                otlp::spawn(endpoint, node, rx)?;
                info!(collector = %endpoint, sampling = opts.trace_sampling, "tracing: spans exported over OTLP/gRPC");
                Some(trace::Tracer::new(opts.trace_sampling, tx))
            }
            None => None,
        };
        let workloads = workload::WorkloadCache::new(&config.borrow(), trust_domain, mtls);
        Ok(Self {
            node: node.to_string(),
            config,
            mtls,
            registry,
            metrics,
            plaintext,
            workloads,
            access_log: access_log::AccessLog::new(opts.access_log),
            tracer,
            connections: Arc::default(),
        })
    }

    /// Adds the mesh's own metrics, read from their sources at each scrape.
    pub fn register_mesh(&self, sources: MeshSources) -> Result<(), TelemetryError> {
        if self.metrics.is_some() {
            self.registry.register(Box::new(mesh_metrics::MeshCollector::new(sources)))?;
        }
        Ok(())
    }

    /// Writes out buffered access log lines (at shutdown).
    pub fn flush(&self) {
        self.access_log.flush();
    }

    /// Whether HTTP requests need an [`HttpExchange`] at all.
    pub fn http_enabled(&self) -> bool {
        self.metrics.is_some() || self.access_log.enabled() || self.tracer.is_some()
    }

    /// Connections the proxy carries now, oldest first (the admin API's `/connections`).
    pub fn live_connections(&self) -> Vec<LiveConnection> {
        self.connections.snapshot()
    }

    pub(crate) fn connections(&self) -> &Arc<connections::ConnectionRegistry> {
        &self.connections
    }

    /// Prometheus text exposition of every metric.
    pub fn gather(&self) -> Result<String, TelemetryError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(|e| TelemetryError::Encode(e.to_string()))?;
        String::from_utf8(buf).map_err(|e| TelemetryError::Encode(e.to_string()))
    }

    /// After a config change: forgets the series of workloads that left, so label cardinality
    /// follows the cluster instead of growing with every pod that ever existed.
    pub fn on_config(&self, cluster: &Cluster) {
        let peers = self.workloads.get(cluster);
        if let Some(m) = &self.metrics {
            let removed = m.retain_workloads(&peers.workload_keys());
            if removed > 0 {
                info!(removed, "metrics: dropped the series of workloads no longer in the config");
            }
        }
    }

    /// Turns the kernel's counts of plaintext connection attempts to this node's mesh pods into
    /// series (see [`plaintext`]).
    pub fn plaintext_inbound(&self, counts: &std::collections::BTreeMap<std::net::Ipv4Addr, mesh_common::PlaintextStats>) {
        if let (Some(istio), Some(p)) = (&self.metrics, &self.plaintext) {
            p.record(istio, &self.workloads.get(&self.cluster()), counts);
        }
    }

    /// `namespace/workload` of the pod at `ip`, or `unknown/unknown`.
    pub(crate) fn workload_of(&self, ip: std::net::IpAddr) -> String {
        let peers = self.workloads.get(&self.cluster());
        let w = peers.workload(ip);
        format!("{}/{}", w.namespace, w.name)
    }

    fn cluster(&self) -> Arc<Cluster> {
        self.config.borrow().clone()
    }
}

/// Counts config changes the watcher rejected. The watcher only logs them (and config/ is not
/// telemetry's to change), so this log layer turns that log line into a counter.
pub struct ConfigErrorCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ConfigErrorCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::ERROR || !meta.target().starts_with("mesh_node::config") {
            return;
        }
        struct Rejected(bool);
        impl tracing::field::Visit for Rejected {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}").starts_with("config change rejected") {
                    self.0 = true;
                }
            }
        }
        let mut v = Rejected(false);
        event.record(&mut v);
        if v.0 {
            mesh_metrics::CONFIG_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
