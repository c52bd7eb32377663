//! The signing half of the CA: a root (or intermediate) key and certificate, and issuance of
//! workload certificates from CSRs.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, string::Ia5String,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::error::CaError;
use super::store;
use crate::identity::Identity;

/// Backdating of `not_before`, so a node whose clock is a little behind the CA's accepts a
/// certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Lifetimes the CA grants.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    /// Granted when a request asks for none.
    pub default: Duration,
    /// Longer requests are cut to this.
    pub max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> TtlPolicy {
        TtlPolicy { default: Duration::from_secs(24 * 3600), max: Duration::from_secs(24 * 3600) }
    }
}

impl TtlPolicy {
    fn grant(&self, requested: Duration) -> Duration {
        let wanted = if requested.is_zero() { self.default } else { requested };
        wanted.min(self.max).max(Duration::from_secs(1))
    }
}

pub struct CaSigner {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Signing certificate first, root last, PEM: appended to every issued leaf.
    chain_pem: Vec<String>,
    root: CertificateDer<'static>,
    ttl: TtlPolicy,
    rng: SystemRandom,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner").field("trust_domain", &self.trust_domain).field("ttl", &self.ttl).finish()
    }
}

impl CaSigner {
    /// A fresh in-memory root, nothing written anywhere (tests, throwaway CAs).
    pub fn generate(trust_domain: &str) -> Result<CaSigner, CaError> {
        let (cert_pem, key_pem) = new_root(trust_domain)?;
        CaSigner::from_pem(&cert_pem, &key_pem, trust_domain)
    }

    /// The root kept in `state_dir` (created there on first start: dir 0700, key 0600).
    pub fn load_or_create(state_dir: &Path, trust_domain: &str) -> Result<CaSigner, CaError> {
        store::load_or_create(state_dir, trust_domain)
    }

    /// A provided CA: `chain_pem` holds the signing certificate first, then any intermediates,
    /// then the root; `key_pem` the signing certificate's key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str, trust_domain: &str) -> Result<CaSigner, CaError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Key(format!("certificate PEM: {e}")))?;
        let (signing, root) = match (chain.first(), chain.last()) {
            (Some(first), Some(last)) => (first.clone(), last.clone()),
            _ => return Err(CaError::Key("no certificate in the CA certificate file".into())),
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Key(format!("key PEM: {e}")))?;
        check_ca_cert(&signing, &key)?;
        let issuer = Issuer::from_ca_cert_der(&signing, key).map_err(|e| CaError::Key(e.to_string()))?;
        Ok(CaSigner {
            trust_domain: trust_domain.to_string(),
            issuer,
            chain_pem: chain.iter().map(|c| to_pem(c)).collect(),
            root,
            ttl: TtlPolicy::default(),
            rng: SystemRandom::new(),
        })
    }

    pub fn with_ttl_policy(mut self, ttl: TtlPolicy) -> CaSigner {
        self.ttl = ttl;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl_policy(&self) -> TtlPolicy {
        self.ttl
    }

    pub fn root_cert(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    pub fn root_pem(&self) -> String {
        to_pem(&self.root)
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // The root parsed when the signer was built, so adding it cannot fail in practice;
        // if it did, an empty store fails closed.
        let _ = roots.add(self.root.clone());
        roots
    }

    /// Signs a CSR: checks its key (P-256, P-384 or RSA >= 2048 bits, with the signature
    /// algorithm of that key) and signature, takes its single SPIFFE URI SAN, requires this
    /// trust domain, refuses the CA's own identity, requires `identity_allowed`, and issues a leaf of at most the policy's max TTL
    /// (`requested_ttl` zero means the default). Everything else the CSR asks for is ignored.
    /// Returns the PEM chain, leaf first, root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity_allowed: impl Fn(&Identity) -> bool,
        requested_ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let der = csr_der(csr_pem)?;
        super::csr_policy::check(&der)?;
        let mut csr = CertificateSigningRequestParams::from_der(&der.into())
            .map_err(|e| CaError::InvalidCsr(e.to_string()))?;
        let identity = csr_identity(&csr.params.subject_alt_names)?;
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.to_string(),
                expected: self.trust_domain.clone(),
            });
        }
        // The CA's own identity (its serving certificate's): whoever held it could pose as
        // the CA to every node, so no workload gets it, whatever runs under that account.
        if identity == super::ca_identity(&self.trust_domain) {
            return Err(CaError::ReservedIdentity(identity.to_string()));
        }
        if !identity_allowed(&identity) {
            return Err(CaError::NotAllowed(identity.to_string()));
        }
        csr.params = self.leaf_params(&identity, Vec::new(), self.ttl.grant(requested_ttl))?;
        let leaf = csr.signed_by(&self.issuer).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        Ok(chain)
    }

    /// A certificate and key for a server run by the CA itself (its gRPC endpoint): the
    /// identity plus DNS and IP SANs. Returns the chain to present (leaf and intermediates).
    pub(crate) fn issue_with_key(
        &self,
        identity: &Identity,
        extra_sans: &[String],
        validity: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut sans = Vec::new();
        for name in extra_sans {
            sans.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    Ia5String::try_from(name.as_str()).map_err(|e| CaError::Signing(format!("SAN {name:?}: {e}")))?,
                ),
            });
        }
        let params = self.leaf_params(identity, sans, validity)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.der().clone()];
        let intermediates = self.chain_pem.len().saturating_sub(1);
        for pem in &self.chain_pem[..intermediates] {
            chain.push(CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::Key(e.to_string()))?);
        }
        Ok((chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    }

    fn leaf_params(&self, identity: &Identity, mut sans: Vec<SanType>, ttl: Duration) -> Result<CertificateParams, CaError> {
        let uri = Ia5String::try_from(identity.to_string()).map_err(|e| CaError::Signing(e.to_string()))?;
        sans.insert(0, SanType::URI(uri));
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // Empty subject as in Istio: the identity is the URI SAN (rcgen marks it critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.serial_number = Some(self.serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// 128 random bits, positive (RFC 5280 wants serials positive and unpredictable).
    fn serial(&self) -> Result<SerialNumber, CaError> {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).map_err(|_| CaError::Signing("random serial number".into()))?;
        bytes[0] = (bytes[0] & 0x7f) | 0x01;
        Ok(SerialNumber::from_slice(&bytes))
    }
}

/// A new self-signed root for `trust_domain`: ECDSA P-256, CA:true, 10 years. Returns
/// (certificate PEM, PKCS#8 key PEM).
pub(crate) fn new_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Key(e.to_string()))?;
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).map_err(|_| CaError::Key("random serial number".into()))?;
    serial[0] = (serial[0] & 0x7f) | 0x01;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // Unique per root: two meshes of one trust domain would otherwise have roots of the same
    // name, and a peer of the other one would fail as "bad signature" instead of "unknown
    // issuer".
    let tag: String = serial[..4].iter().map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("mesh root CA {tag}"));
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ROOT_VALIDITY;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(|e| CaError::Key(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The signing certificate must be a CA and belong to the key, or every leaf would be junk.
fn check_ca_cert(cert: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CaError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CaError::Key(format!("CA certificate: {e}")))?;
    if !parsed.is_ca() {
        return Err(CaError::Key("the signing certificate is not a CA (basicConstraints CA:false or absent)".into()));
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::Key("the key does not belong to the signing certificate".into()));
    }
    Ok(())
}

/// The DER of a PEM CSR (`CERTIFICATE REQUEST`, or the older `NEW CERTIFICATE REQUEST`).
fn csr_der(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    let pem = pem::parse(csr_pem).map_err(|e| CaError::InvalidCsr(format!("PEM: {e}")))?;
    match pem.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(pem.into_contents()),
        other => Err(CaError::InvalidCsr(format!("PEM block is {other:?}, expected \"CERTIFICATE REQUEST\""))),
    }
}

/// The identity a CSR asks for: exactly one SAN, a SPIFFE URI whose namespace and service
/// account are names Kubernetes accepts (service accounts may have dots and 253 characters).
fn csr_identity(sans: &[SanType]) -> Result<Identity, CaError> {
    match sans {
        [SanType::URI(uri)] => {
            let identity: Identity = uri.as_str().parse().map_err(|e| CaError::InvalidCsr(format!("{e}")))?;
            identity.check_kubernetes_names().map_err(|e| CaError::InvalidCsr(e.to_string()))?;
            Ok(identity)
        }
        [] => Err(CaError::InvalidCsr("no subjectAltName; expected one SPIFFE URI".into())),
        [_] => Err(CaError::InvalidCsr("the subjectAltName is not a URI; expected one SPIFFE URI".into())),
        _ => Err(CaError::InvalidCsr(format!("{} subjectAltNames; expected one SPIFFE URI", sans.len()))),
    }
}

pub(crate) fn to_pem(cert: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()), config)
}
