//! Istio's CA API (`security/v1alpha1/ca.proto`), written by hand because protoc is not
//! available: the two messages with the field numbers Istio uses, and the method path.

/// `istio.v1.auth.IstioCertificateRequest`. Field 2 (`metadata`, a Struct) is not used.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds; 0 means the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

pub const SERVICE_NAME: &str = "istio.v1.auth.IstioCertificateService";
pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Metadata naming the calling node.
pub const NODE_HEADER: &str = "x-mesh-node";
