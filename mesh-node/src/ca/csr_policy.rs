//! What a CSR's key must be before the CA signs it: ECDSA P-256, ECDSA P-384 or RSA of 2048 to
//! 8192 bits, signed with the algorithm that goes with that key (the leaf embeds the key with
//! the algorithm identifier the CSR's signature names, so a mismatch would make a broken
//! certificate). Checked on the DER before anything else reads the CSR.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, Oid,
};
use x509_parser::prelude::FromDer as _;

use super::error::CaError;

/// Smallest RSA modulus accepted (NIST SP 800-57: 112-bit security).
pub const RSA_MIN_BITS: usize = 2048;
/// Largest RSA modulus accepted: verifying a bigger one is CPU any caller could make the CA
/// spend for nothing.
pub const RSA_MAX_BITS: usize = 8192;

const ACCEPTED: &str = "the CA accepts ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits";

/// The key of a CSR, as the policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKey {
    P256,
    P384,
    Rsa(usize),
}

impl std::fmt::Display for CsrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CsrKey::P256 => f.write_str("ECDSA P-256"),
            CsrKey::P384 => f.write_str("ECDSA P-384"),
            CsrKey::Rsa(bits) => write!(f, "RSA {bits}-bit"),
        }
    }
}

/// Checks the key and signature algorithm of a DER CSR; the signature itself is verified by
/// the parser that follows.
pub fn check(der: &[u8]) -> Result<CsrKey, CaError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CaError::InvalidCsr(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCsr(format!("{} bytes after the request", rest.len())));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_alg = &spki.algorithm.algorithm;
    let key = if *key_alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => CsrKey::P256,
            Some(c) if c == OID_NIST_EC_P384 => CsrKey::P384,
            Some(c) => return Err(weak(format!("ECDSA key on curve {} is not accepted", oid_name(&c)))),
            None => return Err(weak("ECDSA key without a named curve is not accepted".into())),
        }
    } else if *key_alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
            _ => return Err(CaError::InvalidCsr("the RSA public key cannot be read".into())),
        };
        if bits < RSA_MIN_BITS {
            return Err(weak(format!("RSA key of {bits} bits is too weak")));
        }
        if bits > RSA_MAX_BITS {
            return Err(weak(format!("RSA key of {bits} bits is larger than {RSA_MAX_BITS}")));
        }
        CsrKey::Rsa(bits)
    } else {
        return Err(weak(format!("{} key is not accepted", oid_name(key_alg))));
    };
    let sig = &csr.signature_algorithm.algorithm;
    let matches = match key {
        CsrKey::P256 => *sig == OID_SIG_ECDSA_WITH_SHA256,
        CsrKey::P384 => *sig == OID_SIG_ECDSA_WITH_SHA384,
        CsrKey::Rsa(_) => [OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA].contains(sig),
    };
    if !matches {
        let expected = match key {
            CsrKey::P256 => "ecdsa-with-SHA256",
            CsrKey::P384 => "ecdsa-with-SHA384",
            CsrKey::Rsa(_) => "sha256WithRSAEncryption, sha384WithRSAEncryption or sha512WithRSAEncryption",
        };
        return Err(CaError::WeakKey(format!(
            "CSR signature algorithm {} does not match its {key} key (expected {expected})",
            oid_name(sig)
        )));
    }
    Ok(key)
}

fn weak(what: String) -> CaError {
    CaError::WeakKey(format!("CSR {what}; {ACCEPTED}"))
}

/// Bits of a big-endian unsigned modulus (leading zero bytes and bits not counted).
fn modulus_bits(modulus: &[u8]) -> usize {
    let digits = match modulus.iter().position(|b| *b != 0) {
        Some(first) => &modulus[first..],
        None => return 0,
    };
    digits.len() * 8 - digits[0].leading_zeros() as usize
}

/// The registry's short name of an OID (`secp256k1`, `ed25519`), else its dotted form.
fn oid_name(oid: &Oid<'_>) -> String {
    static REGISTRY: std::sync::LazyLock<x509_parser::oid_registry::OidRegistry<'static>> =
        std::sync::LazyLock::new(|| x509_parser::oid_registry::OidRegistry::default().with_all_crypto().with_x962());
    REGISTRY
        .get(oid)
        .map(|entry| entry.sn().to_string())
        .unwrap_or_else(|| {
            let id = oid.to_id_string();
            // Curves the registry does not name.
            match id.as_str() {
                "1.3.132.0.10" => "secp256k1".into(),
                "1.3.101.112" => "Ed25519".into(),
                "1.3.101.113" => "Ed448".into(),
                "1.2.840.10040.4.1" => "DSA".into(),
                "1.3.132.0.33" => "secp224r1".into(),
                "1.3.132.0.35" => "secp521r1".into(),
                "1.2.840.10045.3.1.1" => "prime192v1".into(),
                _ => id,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_bits_ignore_leading_zeros() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(modulus_bits(&[0x00, 0x00]), 0);
        assert_eq!(modulus_bits(&[]), 0);
    }
}
