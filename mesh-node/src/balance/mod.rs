//! Choosing one endpoint of an upstream cluster (a Service port, optionally a subset) with
//! Istio DestinationRule semantics as Envoy applies them: ROUND_ROBIN, RANDOM, LEAST_REQUEST
//! (Istio's default), ring hash and Maglev consistent hashing, outlier ejection and panic mode,
//! plus the mesh's own latency-aware PEAK_EWMA (`mesh.io/load-balancer: peak-ewma`).
//!
//! [`ClusterBalancer`] holds one cluster's state; [`Balancers`] keeps them by name across
//! config reloads. [`Balancer`] is the older per-route round robin the L4 path still uses.
mod algorithms;
mod clock;
mod cluster;
mod hash;
mod least_request;
mod maglev;
mod outlier;
mod peak_ewma;
mod registry;
mod ring_hash;
mod rng;
#[cfg(test)]
mod tests;

pub use clock::{Clock, SystemClock};
pub use cluster::{ClusterBalancer, ClusterSnapshot, EndpointSnapshot};
pub use hash::hash_key;
pub use least_request::ActiveRequest;
pub use registry::Balancers;

use crate::config::Endpoint;

/// The chosen endpoint. Keep `guard` (move it into the response body) until the request ends:
/// LEAST_REQUEST counts it as active until then.
#[derive(Debug)]
pub struct Pick {
    /// Shared with the balancer's host: a pick costs a reference count, not a copy of the
    /// endpoint's strings, per request.
    pub endpoint: std::sync::Arc<Endpoint>,
    pub guard: ActiveRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no endpoints")]
    NoEndpoints,
    /// Every endpoint is ejected and panic mode is off: Envoy's "no healthy upstream".
    #[error("no healthy upstream")]
    NoHealthyUpstream,
}

/// What happened to one attempt, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished without an HTTP status to judge (e.g. an L4 connection that connected).
    Success,
    /// Any status the upstream itself returned.
    HttpStatus(u16),
    /// Connect failure, reset or timeout before a response.
    LocalOriginFailure,
}
