//! The mesh CA: signs short-lived workload certificates from CSRs over Istio's gRPC CA API,
//! for node proxies that prove who they are with a per-node token, and only for identities of
//! pods scheduled on the calling node.
//!
//! Files: `signer` (root key and certificate issuance), `store` (state directory, file
//! permissions), `tokens` (node credentials), `proto` (the API's messages), `service` (the gRPC
//! method: authentication and authorization), `server` (TLS listener, options), `cli`
//! (`mesh-node ca`), `error`.

mod cli;
mod error;
pub mod proto;
mod server;
mod service;
mod signer;
mod store;
mod tokens;

#[cfg(test)]
mod tests;

pub use cli::{CaArgs, run_cli};
pub use error::CaError;
pub use server::{CaOptions, CaServer, serve};
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
