//! The proxy's listening sockets: outbound (captured pod connections) and inbound (tunnels
//! from other node proxies).
pub mod accept;
pub mod drain;
pub mod inbound;
pub mod outbound;
pub mod penalty;

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{capture::OrigDstTable, config::Cluster, destination::Destinations, http::pool::Pool, stats::ProxyStats};

/// What every connection handler needs: the live config, this node's name, and shared state.
pub struct ProxyContext {
    pub node: String,
    pub config: watch::Receiver<Arc<Cluster>>,
    pub orig_dst: Arc<OrigDstTable>,
    pub stats: Arc<ProxyStats>,
    pub connect_timeout: Duration,
    pub inbound_port: u16,
    /// Upstream clusters (endpoints, policies, balancers) for the L7 path.
    pub destinations: Destinations,
    /// Pooled upstream HTTP connections.
    pub pool: Pool,
    /// How endpoints are reached: directly, or tunnelled through their node's proxy.
    pub connector: crate::upstream::Connector,
    /// Metrics, traces, access logs and the live-connections list.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Shutdown: every accepted connection is tracked, and told when to wind down.
    pub drain: Arc<drain::Drain>,
    /// The socket fast path's watch on accepted connections' queues (`--sockmap`).
    pub fast_path: Option<Arc<crate::capture::backpressure::Backpressure>>,
}

impl ProxyContext {
    pub fn cluster(&self) -> Arc<Cluster> {
        self.config.borrow().clone()
    }
}
