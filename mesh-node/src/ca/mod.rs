//! The mesh CA: signs short-lived workload certificates from CSRs over Istio's gRPC CA API,
//! for node proxies that prove which node they are, and only for identities of pods scheduled
//! on the calling node.
//!
//! Two modes. File mode: pods from a watched config directory, nodes present a static per-node
//! token. Kubernetes mode: pods listed and watched from the API server, nodes present their
//! projected ServiceAccount token, checked with TokenReview, which also names the node.
//!
//! Files: `signer` (root key and certificate issuance), `store` (state directory, file
//! permissions), `tokens` (static node tokens), `review` (TokenReview), `proto` (the API's
//! messages), `service` (the gRPC method: authentication and authorization), `server` (TLS
//! listener, options), `cli` (`mesh-node ca`), `error`.

mod cli;
pub mod csr_policy;
mod error;
mod limits;
pub mod proto;
mod review;
mod server;
mod service;
mod signer;
mod store;
mod tokens;

#[cfg(test)]
mod review_tests;
#[cfg(test)]
mod tests;

pub use cli::{CaArgs, run_cli};
pub use error::CaError;
pub use limits::RequestLimits;
pub use review::{NODE_NAME_EXTRA, ReviewError, ReviewOptions, ReviewedNode};
pub use server::{CaOptions, CaServer, NodeAuthOptions, PodsFrom, serve};
pub use signer::{CaSigner, TtlPolicy};
pub use tokens::NodeTokens;

use crate::identity::Identity;

/// Namespace and service account of the CA's own serving identity (Istio's istiod lives in
/// the same namespace).
pub const CA_NAMESPACE: &str = "istio-system";
pub const CA_SERVICE_ACCOUNT: &str = "mesh-ca";

/// The SPIFFE ID the CA serves with; node clients require it.
pub fn ca_identity(trust_domain: &str) -> Identity {
    Identity::new(trust_domain, CA_NAMESPACE, CA_SERVICE_ACCOUNT)
}
