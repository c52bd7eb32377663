//! rustls verifiers for mesh peers: the chain must lead to the mesh roots and the leaf must
//! carry a SPIFFE ID. Host names play no part; the SPIFFE ID replaces them.
//!
//! Failures keep rustls' own certificate errors (expired, unknown issuer, ...) so the reason is
//! distinguishable in logs; identity problems come back as `CertificateError::Other` wrapping
//! an [`IdentityError`].

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::cert::identity_from_cert;
use super::error::IdentityError;
use super::spiffe::Identity;
use super::tls::crypto_provider;
use super::trust::TrustBundle;

/// The reason a verifier refused a peer, carried in `CertificateError::Other`. rustls prints
/// that variant with `Debug`, so `Debug` here is the readable message; downcast the
/// `OtherError` to this type to get the [`IdentityError`] back.
pub struct PeerRejected(pub IdentityError);

impl std::fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for PeerRejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn rejected(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRejected(e)))))
}

/// webpki reports a certificate of a foreign CA as `UnknownIssuer`, or as `BadSignature`
/// when that CA's name happens to equal one of ours; both mean "not our CA", said plainly.
/// Other failures (expired, not yet valid, wrong usage) keep rustls' own wording.
fn chain_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(
            reason @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
        ) => rejected(IdentityError::UntrustedIssuer(format!("{reason:?}"))),
        other => other,
    }
}

/// Where a verifier gets its roots: fixed, or the node's reloadable trust bundle (read at each
/// handshake, so a reload applies to the next one).
#[derive(Debug, Clone)]
enum RootSource {
    Fixed(Arc<RootCertStore>),
    Bundle(Arc<TrustBundle>),
}

impl RootSource {
    fn current(&self) -> Arc<RootCertStore> {
        match self {
            RootSource::Fixed(roots) => roots.clone(),
            RootSource::Bundle(bundle) => bundle.current(),
        }
    }

    fn version(&self) -> u64 {
        match self {
            RootSource::Fixed(_) => 0,
            RootSource::Bundle(bundle) => bundle.version(),
        }
    }
}

/// Client side: the server must chain to the mesh roots and present exactly `expected`.
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: RootSource,
    expected: Identity,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Identity) -> MeshServerVerifier {
        MeshServerVerifier { roots: RootSource::Fixed(roots), expected, provider: crypto_provider() }
    }

    /// Verifies against the bundle's roots of the moment.
    pub fn reloading(bundle: Arc<TrustBundle>, expected: Identity) -> MeshServerVerifier {
        MeshServerVerifier { roots: RootSource::Bundle(bundle), expected, provider: crypto_provider() }
    }

    pub fn expected(&self) -> &Identity {
        &self.expected
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots.current(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(chain_error)?;
        let actual = identity_from_cert(end_entity).map_err(rejected)?;
        if actual != self.expected {
            return Err(rejected(IdentityError::WrongIdentity { expected: Box::new(self.expected.clone()), actual: Box::new(actual) }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is mandatory, must chain to the mesh roots and carry a
/// SPIFFE ID of this trust domain. Which identities may connect is the policy layer's call;
/// read the verified one with [`super::tls::peer_identity`].
#[derive(Debug)]
pub struct MeshClientVerifier {
    roots: RootSource,
    /// webpki's verifier for the roots of `version`; rebuilt when the bundle changes.
    inner: RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: impl Into<String>) -> Result<MeshClientVerifier, IdentityError> {
        MeshClientVerifier::from_source(RootSource::Fixed(roots), trust_domain.into())
    }

    /// Verifies against the bundle's roots of the moment.
    pub fn reloading(bundle: Arc<TrustBundle>, trust_domain: impl Into<String>) -> Result<MeshClientVerifier, IdentityError> {
        MeshClientVerifier::from_source(RootSource::Bundle(bundle), trust_domain.into())
    }

    fn from_source(roots: RootSource, trust_domain: String) -> Result<MeshClientVerifier, IdentityError> {
        let version = roots.version();
        let inner = webpki_client_verifier(roots.current())?;
        Ok(MeshClientVerifier { roots, inner: RwLock::new((version, inner)), trust_domain })
    }

    /// The verifier for the roots in force, rebuilt if they changed since the last handshake.
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let version = self.roots.version();
        {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            if inner.0 == version {
                return Ok(inner.1.clone());
            }
        }
        let fresh = webpki_client_verifier(self.roots.current()).map_err(|e| rustls::Error::General(e.to_string()))?;
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = (version, fresh.clone());
        Ok(fresh)
    }
}

fn webpki_client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    WebPkiClientVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| IdentityError::Tls(format!("client verifier: {e}")))
}

impl ClientCertVerifier for MeshClientVerifier {
    /// No hints: they would have to follow the reloadable roots, and mesh clients present
    /// their workload's certificate whatever the server hints.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?.verify_client_cert(end_entity, intermediates, now).map_err(chain_error)?;
        let identity = identity_from_cert(end_entity).map_err(rejected)?;
        if identity.trust_domain != self.trust_domain {
            return Err(rejected(IdentityError::ForeignTrustDomain { identity: Box::new(identity), expected: self.trust_domain.clone() }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).1.supported_verify_schemes()
    }
}
