//! mesh node daemon: captures pod connections with eBPF and proxies them between nodes.
//!
//! A connection's path through the modules: [`capture`] (eBPF redirect and original
//! destination) -> [`listener`] (outbound accept) -> [`protocol`] (HTTP or TCP, by port name or
//! sniffing) -> for HTTP, [`http`] (per request: [`http::router`] VirtualService routes, faults,
//! retries) ; for TCP, [`route`] (VirtualService tcp routes) -> [`destination`] (Service port and
//! subset: endpoints, DestinationRule policy) -> [`balance`] (pick an endpoint, outlier
//! detection) under [`limits`] (circuit breakers) -> [`l4`]: [`upstream`] (a local mesh pod
//! after [`authz`], or a destination outside the mesh) or [`tunnel`] (over [`hbone`], to another
//! node's proxy), and on the far node [`listener::inbound`] -> [`upstream`].
//! [`telemetry`] (metrics on 15020, traces, access logs, live connections) hooks into each step.
pub mod admin;
pub mod balance;
pub mod ca;
pub mod capture;
pub mod concurrency;
pub mod config;
pub mod daemon;
pub mod destination;
pub mod discovery;
pub mod flags;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod l4;
pub mod limits;
pub mod memory;
pub mod listener;
pub mod protocol;
pub mod rate_limit;
pub mod signals;
pub mod stats;
pub mod telemetry;
#[cfg(test)]
mod test_http;

/// The L4 modules under their established names.
pub use l4::{authz, hbone, route, tunnel, upstream};
