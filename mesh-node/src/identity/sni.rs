//! The TLS server name (SNI) of a tunnel names the destination identity: the destination proxy
//! holds a certificate for each workload on its node and presents the one asked for. A SPIFFE
//! ID is not a DNS name, so the identity is written as one, in the first of three forms that
//! fits (`<ns>` is the namespace, `<sa>` the ServiceAccount name):
//!
//! - plain, `<sa>.<ns>.identity.mesh`: a ServiceAccount name without dots of at most 63
//!   characters, i.e. nearly all of them. It is the only form of earlier releases, so during a
//!   rolling upgrade old and new proxies keep talking for these.
//! - dotted, `<sa>.<ns>.dotted.identity.mesh`: a name with dots whose labels have at most 63
//!   characters, when the whole fits in 253. Readable and reversible.
//! - hashed, `<prefix>-<hash>.<ns>.hashed.identity.mesh`: any other name (a dot-free name over
//!   63 characters, a longer label, too long overall). `<hash>` is 128 bits of SHA-256 of
//!   `<ns>/<sa>` in hex, `<prefix>` the name's first characters (dots as '-') for people reading
//!   logs. Not reversible: the destination finds the identity among those it holds
//!   certificates for, which are the only ones it could present anyway.
//!
//! Unambiguous: the plain form has exactly two labels before `identity.mesh`, the others a form
//! label (`dotted`, `hashed`) right before it and at least three; namespaces have no dots, so
//! the namespace is the label before the suffix or the form label. A decoded identity must
//! encode back to exactly the SNI received, so each identity has one SNI and each accepted SNI
//! one identity. Proxies of earlier releases split `<sa>.<ns>` at the first dot and refuse a
//! namespace containing one: they refuse the new forms (no certificate, handshake fails)
//! rather than misread them.

use ring::digest;

use super::error::IdentityError;
use super::names::{MAX_LABEL, MAX_SUBDOMAIN};
use super::spiffe::Identity;

pub const SUFFIX: &str = "identity.mesh";
const DOTTED: &str = "dotted";
const HASHED: &str = "hashed";
/// 128 bits: two ServiceAccounts of one namespace never share a hashed SNI.
const HASH_HEX_DIGITS: usize = 32;
/// What is left of a label for the readable prefix, after '-' and the hash.
const PREFIX_MAX: usize = MAX_LABEL - 1 - HASH_HEX_DIGITS;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SniError {
    #[error("no TLS server name for an invalid identity: {0}")]
    InvalidIdentity(#[source] IdentityError),
    #[error("the client sent no SNI (it names the destination identity)")]
    Missing,
    #[error("SNI {sni:?} is not a mesh identity: it does not end in .{SUFFIX}")]
    NotMesh { sni: String },
    #[error("SNI {sni:?} is malformed: {reason}")]
    Malformed { sni: String, reason: String },
    #[error("SNI {sni:?} is the hashed name of no identity in namespace {namespace:?} that this node holds a certificate for")]
    UnknownHashed { sni: String, namespace: String },
}

/// The SNI naming `id`. Fails only for names Kubernetes would not accept.
pub fn sni_for(id: &Identity) -> Result<String, SniError> {
    id.check_kubernetes_names().map_err(SniError::InvalidIdentity)?;
    let (ns, sa) = (&id.namespace, &id.service_account);
    if !sa.contains('.') && sa.len() <= MAX_LABEL {
        return Ok(format!("{sa}.{ns}.{SUFFIX}"));
    }
    let dotted = format!("{sa}.{ns}.{DOTTED}.{SUFFIX}");
    if sa.contains('.') && sa.split('.').all(|label| label.len() <= MAX_LABEL) && dotted.len() <= MAX_SUBDOMAIN {
        return Ok(dotted);
    }
    Ok(format!("{}.{ns}.{HASHED}.{SUFFIX}", hashed_label(ns, sa)))
}

fn hashed_label(ns: &str, sa: &str) -> String {
    let digest = digest::digest(&digest::SHA256, format!("{ns}/{sa}").as_bytes());
    let hash: String = digest.as_ref()[..HASH_HEX_DIGITS / 2].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = sa.chars().take(PREFIX_MAX).map(|c| if c == '.' { '-' } else { c }).collect();
    // A prefix cut right after a dot would end in '-': noise before the separating '-'.
    format!("{}-{hash}", prefix.trim_end_matches('-'))
}

/// The identity an SNI names, in `trust_domain`. `held` lists the identities this node has
/// certificates for; it is called only for the hashed form.
pub fn identity_from_sni<I>(sni: Option<&str>, trust_domain: &str, held: impl FnOnce() -> I) -> Result<Identity, SniError>
where
    I: IntoIterator<Item = Identity>,
{
    let sni = sni.ok_or(SniError::Missing)?;
    let rest = sni
        .strip_suffix(SUFFIX)
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(|| SniError::NotMesh { sni: sni.to_string() })?;
    let labels: Vec<&str> = rest.split('.').collect();
    let id = match labels.as_slice() {
        [sa, ns] => Identity::new(trust_domain, *ns, *sa),
        [sa @ .., ns, DOTTED] if !sa.is_empty() => Identity::new(trust_domain, *ns, sa.join(".")),
        [_, ns, HASHED] => return find_hashed(sni, ns, trust_domain, held()),
        _ => {
            let reason = format!(
                "expected <service-account>.<namespace>.{SUFFIX}, <service-account>.<namespace>.{DOTTED}.{SUFFIX} \
                 or <prefix>-<hash>.<namespace>.{HASHED}.{SUFFIX}"
            );
            return Err(SniError::Malformed { sni: sni.to_string(), reason });
        }
    };
    canonical(sni, id)
}

/// `id` if `sni` is its one encoding: another spelling would give an identity two names.
fn canonical(sni: &str, id: Identity) -> Result<Identity, SniError> {
    let malformed = |reason: String| SniError::Malformed { sni: sni.to_string(), reason };
    match sni_for(&id) {
        Ok(expected) if expected == sni => Ok(id),
        Ok(expected) => Err(malformed(format!("{id} is written {expected}"))),
        // The inner error names the bad part; "no TLS server name for" would read oddly here.
        Err(SniError::InvalidIdentity(e)) => Err(malformed(e.to_string())),
        Err(e) => Err(e),
    }
}

fn find_hashed(sni: &str, ns: &str, trust_domain: &str, held: impl IntoIterator<Item = Identity>) -> Result<Identity, SniError> {
    held.into_iter()
        .filter(|id| id.trust_domain == trust_domain && id.namespace == ns)
        .find(|id| sni_for(id).is_ok_and(|encoded| encoded == sni))
        .ok_or_else(|| SniError::UnknownHashed { sni: sni.to_string(), namespace: ns.to_string() })
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::ServerName;

    use super::*;

    const TD: &str = "cluster.local";

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new(TD, ns, sa)
    }

    fn none() -> Vec<Identity> {
        Vec::new()
    }

    /// The longest names: a 63-character namespace and 253-character ServiceAccounts, one
    /// without dots, one of four labels, one with a label over 63 characters.
    fn longest() -> Vec<Identity> {
        let ns = format!("n{}", "s".repeat(62));
        vec![
            id(&ns, &"a".repeat(253)),
            id(&ns, &format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61))),
            id(&ns, &format!("{}.{}", "a".repeat(100), "b".repeat(152))),
        ]
    }

    /// The previous release's parser, to show what an old proxy makes of each form.
    fn old_identity_from_sni(sni: &str) -> Option<Identity> {
        let rest = sni.strip_suffix(SUFFIX)?.strip_suffix('.')?;
        let (sa, ns) = rest.split_once('.')?;
        (!ns.contains('.')).then(|| id(ns, sa))
    }

    #[test]
    fn plain_names_keep_the_previous_form() {
        let longest_label = id(&"n".repeat(63), &"s".repeat(63));
        for identity in [id("lemo-dev", "recall"), id("default", "default"), longest_label] {
            let sni = sni_for(&identity).expect("sni");
            assert_eq!(sni, format!("{}.{}.identity.mesh", identity.service_account, identity.namespace));
            assert_eq!(identity_from_sni(Some(&sni), TD, none).expect("decoded"), identity);
            assert_eq!(old_identity_from_sni(&sni), Some(identity), "an old proxy reads it too");
        }
    }

    #[test]
    fn dotted_names_are_written_out_and_read_back_without_lookup() {
        let identity = id("lemo-dev", "recall.reader");
        let sni = sni_for(&identity).expect("sni");
        assert_eq!(sni, "recall.reader.lemo-dev.dotted.identity.mesh");
        assert_eq!(identity_from_sni(Some(&sni), TD, none).expect("decoded"), identity);
        assert_eq!(old_identity_from_sni(&sni), None, "an old proxy refuses it instead of misreading it");
    }

    #[test]
    fn the_longest_names_are_hashed_valid_dns_names_resolved_among_held_identities() {
        let held = longest();
        for identity in &held {
            let sni = sni_for(identity).expect("sni");
            assert!(sni.len() <= MAX_SUBDOMAIN && sni.split('.').all(|l| l.len() <= MAX_LABEL), "{sni}");
            assert!(sni.ends_with(&format!(".{}.hashed.identity.mesh", identity.namespace)), "{sni}");
            assert!(sni.starts_with(&identity.service_account[..10]), "readable prefix: {sni}");
            ServerName::try_from(sni.clone()).expect("rustls accepts it");
            assert_eq!(identity_from_sni(Some(&sni), TD, || held.clone()).expect("decoded"), *identity);
            let err = identity_from_sni(Some(&sni), TD, none).expect_err("not held").to_string();
            assert!(err.contains("hashed name of no identity") && err.contains(&identity.namespace), "{err}");
            assert_eq!(old_identity_from_sni(&sni), None, "an old proxy refuses it");
        }
    }

    #[test]
    fn names_that_collide_under_naive_encodings_get_distinct_snis() {
        let ns63 = format!("n{}", "s".repeat(62));
        let shared = "p".repeat(200);
        let mut all = longest();
        all.extend([
            // Dots as '-'.
            id("demo", "recall.reader"),
            id("demo", "recall-reader"),
            // Splitting at the first dot: `a.b.c.identity.mesh`.
            id("c", "a.b"),
            id("b", "a"),
            // Namespaces named like the form labels.
            id("dotted", "x"),
            id("hashed", "x"),
            id("dotted", "a.b"),
            id("demo", "a.b.dotted"),
            id("demo", "dotted.demo"),
            // Truncation: 253 characters sharing their first 200, and the same name in two
            // namespaces.
            id(&ns63, &format!("{shared}.{}", "a".repeat(52))),
            id(&ns63, &format!("{shared}.{}", "b".repeat(52))),
            id("demo", &format!("{shared}.{}", "a".repeat(52))),
            // Dot-free just over a label, and just under.
            id("demo", &"q".repeat(64)),
            id("demo", &"q".repeat(63)),
        ]);
        let mut seen = std::collections::BTreeMap::new();
        for identity in &all {
            let sni = sni_for(identity).expect("sni");
            ServerName::try_from(sni.clone()).unwrap_or_else(|e| panic!("{sni}: {e}"));
            if let Some(other) = seen.insert(sni.clone(), identity.clone()) {
                panic!("{identity} and {other} share the SNI {sni}");
            }
            assert_eq!(identity_from_sni(Some(&sni), TD, || all.clone()).expect("decoded"), *identity, "{sni}");
        }
    }

    #[test]
    fn foreign_malformed_and_non_canonical_snis_are_refused_with_the_reason() {
        let held = longest();
        let hashed_short = format!("recall-{}.demo.hashed.identity.mesh", "0".repeat(32));
        for (sni, why) in [
            ("example.com", "not a mesh identity"),
            ("identity.mesh", "not a mesh identity"),
            ("a.b.c.identity.mesh", "expected <service-account>.<namespace>.identity.mesh"),
            ("recall.demo.dotted.identity.mesh", "spiffe://cluster.local/ns/demo/sa/recall is written recall.demo.identity.mesh"),
            ("a..demo.dotted.identity.mesh", "empty part between dots"),
            ("recall.Demo.identity.mesh", "namespace \"Demo\""),
            (hashed_short.as_str(), "hashed name of no identity in namespace \"demo\""),
        ] {
            let err = identity_from_sni(Some(sni), TD, || held.clone()).expect_err(sni).to_string();
            assert!(err.contains(why), "{sni}: {err}");
        }
        let err = identity_from_sni(None, TD, none).expect_err("no SNI").to_string();
        assert!(err.contains("sent no SNI"), "{err}");
    }

    #[test]
    fn identities_kubernetes_would_refuse_have_no_sni() {
        for (identity, why) in [
            (id("demo", "Recall"), "service account \"Recall\""),
            (id("demo", "a_b"), "the character '_'"),
            (id("demo", &"a".repeat(254)), "254 characters long"),
            (id(&"n".repeat(64), "a"), "namespace"),
        ] {
            let err = sni_for(&identity).expect_err(&identity.to_string()).to_string();
            assert!(err.contains(why), "{identity}: {err}");
        }
    }
}
