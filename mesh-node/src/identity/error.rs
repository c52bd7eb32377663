//! Errors of the identity layer. `Clone` because one failed CA request is reported to every
//! caller that was waiting on it. Identities are boxed to keep the error (and every `Result`
//! of this module) small.

use super::spiffe::Identity;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    InvalidSpiffeId { id: String, reason: String },
    #[error("{what} {name:?} of {identity} is not a valid Kubernetes name: it {reason}")]
    InvalidName { identity: Box<Identity>, what: &'static str, name: String, reason: String },
    #[error("identity {identity} is not in trust domain {expected:?}")]
    ForeignTrustDomain { identity: Box<Identity>, expected: String },
    #[error("peer identity is {actual}, expected {expected}")]
    WrongIdentity { expected: Box<Identity>, actual: Box<Identity> },
    #[error("certificate is not issued by a CA this mesh trusts ({0})")]
    UntrustedIssuer(String),
    #[error("certificate has no SPIFFE ID: {0}")]
    NoSpiffeId(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("key or CSR generation: {0}")]
    KeyGeneration(String),
    #[error("CA refused or failed the request ({code:?}): {message}")]
    Ca { code: tonic::Code, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl IdentityError {
    pub(crate) fn file(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        IdentityError::File { path: path.display().to_string(), message: e.to_string() }
    }
}
