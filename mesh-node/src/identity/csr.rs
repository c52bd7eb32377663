//! Node-side key generation: the private key is made here and only the CSR leaves the process.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, string::Ia5String};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::error::IdentityError;
use super::spiffe::Identity;

/// A fresh ECDSA P-256 key and a PEM CSR for one identity.
pub struct KeyAndCsr {
    pub key: PrivateKeyDer<'static>,
    pub csr_pem: String,
}

/// Generates a P-256 key and a CSR whose only SAN is the identity's SPIFFE URI (the subject is
/// empty, as in Istio's workload certificates: the SAN is the identity).
pub fn new_csr(identity: &Identity) -> Result<KeyAndCsr, IdentityError> {
    let gen_err = |e: rcgen::Error| IdentityError::KeyGeneration(e.to_string());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = Ia5String::try_from(identity.to_string()).map_err(gen_err)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr_pem = params.serialize_request(&key).and_then(|csr| csr.pem()).map_err(gen_err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(KeyAndCsr { key, csr_pem })
}
