//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use super::error::IdentityError;
use super::names;

/// The trust domain of a cluster that does not configure one (Istio's default too).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity: who a pod is, as far as mTLS and policy are concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Identity {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Whether the namespace is a DNS label and the service account a DNS subdomain, as
    /// Kubernetes requires of them. The SPIFFE syntax alone is looser (uppercase, '_'); the CA
    /// signs only identities a real pod can have, and the SNI encoding relies on it.
    pub fn check_kubernetes_names(&self) -> Result<(), IdentityError> {
        let invalid = |what, name: &str, reason| IdentityError::InvalidName {
            identity: Box::new(self.clone()),
            what,
            name: name.to_string(),
            reason,
        };
        names::check_label(&self.namespace).map_err(|reason| invalid("namespace", &self.namespace, reason))?;
        names::check_subdomain(&self.service_account)
            .map_err(|reason| invalid("service account", &self.service_account, reason))
    }

    /// An identity in [`DEFAULT_TRUST_DOMAIN`].
    pub fn in_default_domain(namespace: impl Into<String>, service_account: impl Into<String>) -> Identity {
        Identity::new(DEFAULT_TRUST_DOMAIN, namespace, service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Identity, IdentityError> {
        let bad = |reason: &str| IdentityError::InvalidSpiffeId { id: s.to_string(), reason: reason.to_string() };
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| bad("does not start with spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(bad("query and fragment are not allowed"));
        }
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| bad("has no path"))?;
        check_trust_domain(trust_domain).map_err(|reason| bad(&reason))?;
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments.as_slice() else {
            return Err(bad("path is not /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(bad("path is not /ns/<namespace>/sa/<service-account>"));
        }
        for (what, segment) in [("namespace", namespace), ("service account", service_account)] {
            check_segment(segment).map_err(|reason| bad(&format!("{what}: {reason}")))?;
        }
        Ok(Identity::new(trust_domain, *namespace, *service_account))
    }
}

/// The SPIFFE spec limits trust domains to lowercase letters, digits, `.`, `-` and `_`.
fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".into());
    }
    match td.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => Err(format!("trust domain has the character {c:?}")),
        None => Ok(()),
    }
}

/// Path segments may use letters, digits, `.`, `-` and `_`, and may not be `.` or `..`.
fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("is empty".into());
    }
    if segment == "." || segment == ".." {
        return Err(format!("{segment:?} is not allowed"));
    }
    match segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
        Some(c) => Err(format!("has the character {c:?}")),
        None => Ok(()),
    }
}
