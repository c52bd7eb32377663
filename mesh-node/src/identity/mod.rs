//! Workload identities and their certificates, node side.
//!
//! A pod's identity is the SPIFFE ID of its namespace and service account ([`Identity`]). The
//! node proxy generates a key per identity, asks the CA to sign a CSR for it ([`CaClient`]),
//! caches the result and renews it at half its lifetime ([`CertManager`]). The TLS side
//! ([`tls`], [`verify`]) turns a [`WorkloadCert`] into rustls configs whose verifiers check
//! the chain against the mesh roots and the SPIFFE ID instead of a host name.
//!
//! Files: `spiffe` (the ID), `names` (Kubernetes name rules), `sni` (identities as TLS server
//! names), `csr` (keys and CSRs), `cert` (issued certificates, reading the ID out of one),
//! `verify` (rustls verifiers), `tls` (configs), `ca_client` (gRPC client),
//! `manager` (cache and single-flight issuance), `rotation` (renewal task), `trust` (the
//! reloadable trust bundle), `error`.

mod ca_client;
mod cert;
mod csr;
mod error;
mod manager;
pub(crate) mod names;
mod rotation;
pub mod sni;
mod spiffe;
pub mod trust;
pub mod tls;
pub mod verify;

#[cfg(test)]
mod tests;

pub use ca_client::{CaClient, CaClientConfig};
pub use cert::{WorkloadCert, identity_from_cert};
pub use csr::{KeyAndCsr, new_csr};
pub use error::IdentityError;
pub use manager::{CertManager, CertManagerConfig, load_roots};
pub use rotation::RotationConfig;
pub use sni::{SniError, identity_from_sni, sni_for};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, Identity};
pub use trust::TrustBundle;
pub use verify::{MeshClientVerifier, MeshServerVerifier, PeerRejected};
