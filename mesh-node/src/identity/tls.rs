//! rustls configs for mesh connections: TLS 1.3 only, ALPN h2 (HBONE), ring provider, and the
//! SPIFFE verifiers of [`super::verify`].

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};

use super::cert::{WorkloadCert, identity_from_cert};
use super::error::IdentityError;
use super::spiffe::Identity;
use super::verify::{MeshClientVerifier, MeshServerVerifier};

/// ALPN of HBONE (HTTP/2 CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// The provider every mesh config uses. Explicit rather than the process default so that a
/// second provider appearing in the dependency graph cannot make config building panic.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config presenting `cert` and requiring a client certificate of the mesh.
pub fn server_config(cert: &WorkloadCert, roots: Arc<RootCertStore>) -> Result<ServerConfig, IdentityError> {
    let verifier = MeshClientVerifier::new(roots, cert.identity.trust_domain.clone())?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client config presenting `cert` and accepting only a server that presents `expected`.
/// The server name given to `connect` is not checked (use the target IP or anything).
pub fn client_config(
    cert: &WorkloadCert,
    roots: Arc<RootCertStore>,
    expected: Identity,
) -> Result<ClientConfig, IdentityError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier::new(roots, expected)))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The verified identity of the peer of an established connection (either side).
pub fn peer_identity(conn: &CommonState) -> Result<Identity, IdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| IdentityError::NoSpiffeId("peer presented no certificate".into()))?;
    identity_from_cert(leaf)
}
