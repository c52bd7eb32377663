//! Issued workload certificates and reading the SPIFFE ID out of a certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use super::error::IdentityError;
use super::spiffe::Identity;
use super::tls::crypto_provider;

/// A workload certificate with its private key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// As issued: leaf first, root last.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf's serial number, hex; tells two issuances apart.
    pub serial: String,
    /// Local time the certificate arrived; renewal is planned from it because `not_before` is
    /// backdated by the CA for clock skew.
    pub issued_at: SystemTime,
    key: PrivateKeyDer<'static>,
    certified: Arc<CertifiedKey>,
}

impl WorkloadCert {
    /// Builds from a PEM chain (leaf first) and the key the CSR was made with. Checks that the
    /// leaf names `identity` and carries the key, so a confused CA cannot hand us someone
    /// else's certificate.
    pub fn from_pem_chain(
        identity: Identity,
        chain_pem: &[String],
        key: PrivateKeyDer<'static>,
    ) -> Result<WorkloadCert, IdentityError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| IdentityError::Certificate(format!("PEM chain: {e}")))?);
            }
        }
        let leaf = chain.first().ok_or_else(|| IdentityError::Certificate("empty chain".into()))?;
        let actual = identity_from_cert(leaf)?;
        if actual != identity {
            return Err(IdentityError::WrongIdentity { expected: Box::new(identity), actual: Box::new(actual) });
        }
        let (not_before, not_after, serial) = with_parsed(leaf, |cert| {
            (
                to_system_time(cert.validity().not_before.timestamp()),
                to_system_time(cert.validity().not_after.timestamp()),
                cert.raw_serial_as_string(),
            )
        })?;
        let certified = CertifiedKey::from_der(tls_chain(&chain), key.clone_key(), &crypto_provider())
            .map_err(|e| IdentityError::Certificate(format!("key does not fit the certificate: {e}")))?;
        Ok(WorkloadCert {
            identity,
            chain,
            not_before,
            not_after,
            serial,
            issued_at: SystemTime::now(),
            key,
            certified: Arc::new(certified),
        })
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_pem_chain` refuses an empty chain.
        &self.chain[0]
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The chain to present in a handshake (without the root) and the signing key.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    pub fn is_valid_at(&self, t: SystemTime) -> bool {
        self.not_before <= t && t < self.not_after
    }

    /// When to renew: half-way between arrival and expiry, as ztunnel does.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.issued_at).unwrap_or(Duration::ZERO);
        self.issued_at + lifetime / 2
    }
}

/// The chain a peer needs: everything but a trailing root, which the peer has already.
fn tls_chain(chain: &[CertificateDer<'static>]) -> Vec<CertificateDer<'static>> {
    match chain.len() {
        0 | 1 => chain.to_vec(),
        n => chain[..n - 1].to_vec(),
    }
}

/// The SPIFFE identity of a certificate: its one URI SAN (the SPIFFE X.509-SVID rule: an
/// SVID has exactly one URI SAN).
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let uris = with_parsed(cert, |cert| -> Result<Vec<String>, IdentityError> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(format!("subjectAltName: {e}")))?
            .ok_or_else(|| IdentityError::NoSpiffeId("no subjectAltName".into()))?;
        Ok(san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_string()),
                _ => None,
            })
            .collect())
    })??;
    match uris.as_slice() {
        [uri] => uri.parse(),
        [] => Err(IdentityError::NoSpiffeId("no URI SAN".into())),
        _ => Err(IdentityError::NoSpiffeId(format!("{} URI SANs, an SVID has one", uris.len()))),
    }
}

fn with_parsed<T>(cert: &CertificateDer<'_>, f: impl FnOnce(&X509Certificate<'_>) -> T) -> Result<T, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::Certificate(format!("not an X.509 certificate: {e}")))?;
    Ok(f(&parsed))
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}
