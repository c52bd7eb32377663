//! The mesh's own metrics: outlier ejections, retries, eBPF capture counters, config reloads
//! and errors, workload certificate expiry. Most are read from where they are already counted
//! when Prometheus scrapes, so the data path pays nothing extra for them.
use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use prometheus::{
    IntCounterVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use tokio::sync::watch;

use crate::{capture::{Counters, FastPathState, FastPathView}, config::Cluster, hbone::MeshTls, stats::ProxyStats};

/// Ejections by upstream cluster. Global because the balancers that eject know nothing of
/// telemetry, and an ejection is rare enough that a shared counter costs nothing.
pub static OUTLIER_EJECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    IntCounterVec::new(Opts::new("mesh_outlier_ejections_total", "Hosts ejected by outlier detection"), &["cluster"]).expect("static metric definition is valid")
});

/// Counts an outlier ejection of a host of `cluster` (Envoy's cluster name).
pub fn outlier_ejected(cluster: &str) {
    OUTLIER_EJECTIONS.with_label_values(&[cluster]).inc();
}

/// Config changes rejected by validation. The watcher (config/) only logs them, so a log layer
/// counts them ([`super::ConfigErrorCounter`]).
pub static CONFIG_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Where the scrape-time metrics are read from.
pub struct MeshSources {
    pub node: String,
    pub stats: Arc<ProxyStats>,
    pub capture: Option<Arc<Counters>>,
    /// The socket fast path (`--sockmap`).
    pub fast_path: Option<Arc<FastPathView>>,
    pub tls: Option<Arc<MeshTls>>,
    pub config: watch::Receiver<Arc<Cluster>>,
}

pub struct MeshCollector {
    sources: MeshSources,
    descs: Vec<Desc>,
}

impl MeshCollector {
    pub fn new(sources: MeshSources) -> Self {
        Self { sources, descs: Vec::new() }
    }

    fn counter(name: &str, help: &str, value: u64) -> MetricFamily {
        let c = prometheus::IntCounter::new(name, help).expect("valid metric name");
        c.inc_by(value);
        c.collect().pop().expect("a counter collects one family")
    }

    /// Objects in the live config of kinds the mesh does not apply (ServiceEntry, Gateway,
    /// ...), by kind; `changes_routing` marks kinds that route mesh traffic in Istio.
    fn not_applied(&self) -> Option<MetricFamily> {
        let cluster = self.sources.config.borrow().clone();
        let gauge = prometheus::IntGaugeVec::new(
            Opts::new("mesh_config_not_applied_objects", "Objects of kinds the mesh does not apply (ServiceEntry, Sidecar, Gateway, ...), by kind"),
            &["kind", "changes_routing"],
        )
        .ok()?;
        for u in cluster.unapplied() {
            gauge.with_label_values(&[u.kind.as_str(), if u.changes_routing { "true" } else { "false" }]).inc();
        }
        // An empty family still names the metric, so dashboards see 0 rather than nothing.
        gauge.collect().pop().or_else(|| {
            let mut family = MetricFamily::default();
            family.set_name("mesh_config_not_applied_objects".into());
            family.set_help("Objects of kinds the mesh does not apply (ServiceEntry, Sidecar, Gateway, ...), by kind".into());
            family.set_field_type(prometheus::proto::MetricType::GAUGE);
            Some(family)
        })
    }

    fn certificate_expiry(&self) -> Option<MetricFamily> {
        let tls = self.sources.tls.as_ref()?;
        let cluster = self.sources.config.borrow().clone();
        let gauge = prometheus::GaugeVec::new(
            Opts::new("mesh_certificate_expiry_seconds", "Seconds until the workload certificate expires (negative: expired)"),
            &["identity"],
        )
        .ok()?;
        let now = SystemTime::now();
        let ids: std::collections::BTreeSet<_> =
            cluster.pods().filter(|p| p.node == self.sources.node && cluster.is_enrolled(p)).map(|p| tls.identity_of(p)).collect();
        for id in ids {
            let Some(cert) = tls.certs().cached(&id) else { continue };
            let left = match cert.not_after.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            gauge.with_label_values(&[&id.to_string()]).set(left);
        }
        gauge.collect().pop()
    }
}

impl Collector for MeshCollector {
    fn desc(&self) -> Vec<&Desc> {
        // Unchecked collector: families vary with the config (capture counters, identities).
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = &self.sources.stats;
        let mut out = vec![
            Self::counter("mesh_retries_total", "HTTP request retries", stats.http_retries.get()),
            Self::counter("mesh_config_reloads_total", "Config snapshots loaded", stats.config_reloads.get()),
            Self::counter("mesh_policy_closed_connections_total", "Open connections closed because a policy change denies them", stats.policy_closed_connections.get()),
            Self::counter("mesh_config_errors_total", "Config changes rejected by validation", CONFIG_ERRORS.load(Ordering::Relaxed)),
            Self::counter(
                "mesh_replay_budget_exhausted_total",
                "Requests that stopped being buffered for retries because the node-wide replay budget was spent",
                crate::http::replay::BUDGET_EXHAUSTED.load(Ordering::Relaxed),
            ),
            Self::counter(
                "mesh_metric_series_overflow_total",
                "Requests not recorded in the Istio metrics because they would open a series past the per-proxy cap",
                super::metrics::SERIES_OVERFLOW.load(Ordering::Relaxed),
            ),
        ];
        if let Some(capture) = &self.sources.capture {
            for (name, value) in capture.read() {
                out.push(Self::counter(&format!("mesh_capture_{name}_total"), &format!("eBPF capture counter {name}"), value));
            }
        }
        if let Some(fast) = &self.sources.fast_path {
            for (name, value) in fast.counters() {
                out.push(Self::counter(&format!("mesh_sockmap_{name}_total"), &format!("eBPF socket fast path counter {name}"), value));
            }
            let g = prometheus::IntGauge::new("mesh_sockmap_active", "1 when the socket fast path is on (--sockmap and the kernel took it), else 0").expect("valid metric name");
            g.set(i64::from(*fast.state() == FastPathState::Active));
            out.extend(g.collect());
            let g = prometheus::IntGauge::new("mesh_sockmap_sockets", "Sockets in the fast path's map (two per accelerated connection)").expect("valid metric name");
            g.set(fast.sockets() as i64);
            out.extend(g.collect());
        }
        out.extend(self.certificate_expiry());
        out.extend(self.not_applied());
        out
    }
}
