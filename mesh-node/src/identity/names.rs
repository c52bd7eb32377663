//! Kubernetes names as they appear in identities. A namespace is an RFC 1123 *label* (lowercase
//! letters, digits and '-', at most 63 characters); a ServiceAccount name is an RFC 1123
//! *subdomain* (labels joined by '.', at most 253 characters). Kubernetes limits a subdomain's
//! total length only, not each label's, so a valid ServiceAccount name may hold a run of 200
//! characters without a dot: such a name is not a DNS name (see [`super::sni`]).

/// The longest namespace (and DNS label).
pub const MAX_LABEL: usize = 63;
/// The longest ServiceAccount name (and DNS name).
pub const MAX_SUBDOMAIN: usize = 253;

/// Whether `name` is a valid namespace name; the error is the reason, worded to follow the
/// name ("is empty", "has the character ...").
pub fn check_label(name: &str) -> Result<(), String> {
    check_length(name, MAX_LABEL)?;
    check_label_chars(name, "lowercase letters, digits and '-'")
}

/// Whether `name` is a valid ServiceAccount name (or any other DNS-subdomain object name).
pub fn check_subdomain(name: &str) -> Result<(), String> {
    check_length(name, MAX_SUBDOMAIN)?;
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty part between dots, or starts or ends with a dot".into());
        }
        check_label_chars(label, "lowercase letters, digits, '-' and '.'")?;
    }
    Ok(())
}

fn check_length(name: &str, max: usize) -> Result<(), String> {
    match name.len() {
        0 => Err("is empty".into()),
        len if len > max => Err(format!("is {len} characters long, the limit is {max}")),
        _ => Ok(()),
    }
}

/// One label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, length checked by the caller.
fn check_label_chars(label: &str, allowed: &str) -> Result<(), String> {
    if let Some(c) = label.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(format!("has the character {c:?}; only {allowed} are allowed"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("has {label:?}, which starts or ends with '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_labels() {
        for good in ["a", "lemo-dev", "0ns", &"n".repeat(63)] {
            assert_eq!(check_label(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "is empty"),
            (&"n".repeat(64), "64 characters long, the limit is 63"),
            ("a.b", "the character '.'"),
            ("Demo", "the character 'D'"),
            ("a_b", "the character '_'"),
            ("-a", "starts or ends with '-'"),
            ("a-", "starts or ends with '-'"),
        ] {
            let err = check_label(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn service_accounts_are_subdomains_with_dots_and_long_labels() {
        let long_run = "s".repeat(253);
        let dotted_max = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        for good in ["default", "recall.reader", "a.b.c", "a-b.0", long_run.as_str(), dotted_max.as_str()] {
            assert_eq!(check_subdomain(good), Ok(()), "{good}");
        }
        assert_eq!(dotted_max.len(), 253);
        for (bad, why) in [
            ("", "is empty"),
            (&"s".repeat(254), "254 characters long, the limit is 253"),
            ("a..b", "empty part"),
            (".a", "empty part"),
            ("a.", "empty part"),
            ("a.-b", "starts or ends with '-'"),
            ("a-.b", "starts or ends with '-'"),
            ("Recall.reader", "the character 'R'"),
            ("a/b", "the character '/'"),
            ("a_b", "only lowercase letters, digits, '-' and '.' are allowed"),
        ] {
            let err = check_subdomain(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
