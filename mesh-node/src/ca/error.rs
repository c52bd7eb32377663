//! CA errors; each maps to the gRPC status a node sees.

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("CA key or certificate: {0}")]
    Key(String),
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("CSR identity {identity} is not in trust domain {expected:?}")]
    ForeignTrustDomain { identity: String, expected: String },
    #[error(
        "identity {0} is the CA's own (ServiceAccount {ns}/{sa}) and is never issued to workloads",
        ns = super::CA_NAMESPACE,
        sa = super::CA_SERVICE_ACCOUNT
    )]
    ReservedIdentity(String),
    /// The key or signature algorithm of a CSR is refused (the message says which and why).
    #[error("{0}")]
    WeakKey(String),
    #[error("identity {0} is not allowed for this node")]
    NotAllowed(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("tokens file {path}: {message}")]
    Tokens { path: String, message: String },
    #[error("cluster config: {0}")]
    Config(String),
    #[error("TokenReview settings: {0}")]
    Review(String),
    #[error("listen on {addr}: {message}")]
    Listen { addr: String, message: String },
    #[error("gRPC server: {0}")]
    Serve(String),
}

impl CaError {
    pub(crate) fn file(path: &std::path::Path, e: impl std::fmt::Display) -> CaError {
        CaError::File { path: path.display().to_string(), message: e.to_string() }
    }

    /// The status code a client gets for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            CaError::InvalidCsr(_) | CaError::InvalidRequest(_) | CaError::WeakKey(_) => tonic::Code::InvalidArgument,
            CaError::ForeignTrustDomain { .. } | CaError::NotAllowed(_) | CaError::ReservedIdentity(_) => {
                tonic::Code::PermissionDenied
            }
            _ => tonic::Code::Internal,
        }
    }
}
