//! Model types and field checks shared by the Istio kinds.

use std::time::Duration;

use super::raw;
use crate::config::duration::{check_min_1ms, parse_duration};
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;
use crate::config::kube::port_number;

/// Istio `StringMatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax (Envoy's `safe_regex`), matched against the whole value.
    Regex(Pattern),
    /// `{}` in a header or query-parameter map: the key only has to be present.
    Present,
}

impl StringMatch {
    /// Whether `value` satisfies the match.
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if ignore_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match self {
            StringMatch::Exact(want) => eq(value, want),
            StringMatch::Prefix(prefix) => value
                .get(..prefix.len())
                .is_some_and(|head| eq(head, prefix)),
            StringMatch::Regex(re) => re.full_match(value, ignore_case),
            StringMatch::Present => true,
        }
    }
}

/// A compiled regular expression, anchored at both ends as Envoy's `safe_regex` is.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    anchored: regex::Regex,
    anchored_ci: regex::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let anchored = regex::Regex::new(&format!("^(?:{source})$"))?;
        let anchored_ci = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .case_insensitive(true)
            .build()?;
        Ok(Self {
            source: source.to_owned(),
            anchored,
            anchored_ci,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn full_match(&self, value: &str, ignore_case: bool) -> bool {
        if ignore_case {
            self.anchored_ci.is_match(value)
        } else {
            self.anchored.is_match(value)
        }
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

/// Where traffic goes: a host (as written), optional subset and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// As written; resolve with `Cluster::service_by_host(host, vs.namespace)`.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

pub(crate) fn destination(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    d: &raw::Destination,
) -> Destination {
    if d.host.trim().is_empty() {
        r.at(&path.key("host"), "is required");
    }
    if let Some(subset) = &d.subset
        && !is_dns_label(subset)
    {
        r.at(
            &path.key("subset"),
            format!("{subset:?} is not a valid subset name (DNS-1123 label)"),
        );
    }
    Destination {
        host: d.host.clone(),
        subset: d.subset.clone(),
        port: d
            .port
            .and_then(|p| port(r, &path.key("port").key("number"), p.number)),
    }
}

pub(crate) fn string_match(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    m: &raw::StringMatch,
    allow_presence: bool,
) -> Option<StringMatch> {
    let regex = m.regex.as_ref().map(|re| match Pattern::new(re) {
        Ok(p) => Some(StringMatch::Regex(p)),
        Err(e) => {
            r.at(
                &path.key("regex"),
                format!("{re:?} is not a valid regular expression: {e}"),
            );
            None
        }
    });
    let set_count = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set_count == 1 && m.regex.is_some() && !matches!(regex, Some(Some(_))) {
        return None;
    }
    let set: Vec<StringMatch> = [
        m.exact.clone().map(StringMatch::Exact),
        m.prefix.clone().map(StringMatch::Prefix),
        regex.flatten(),
    ]
    .into_iter()
    .flatten()
    .collect();
    match set.len() {
        0 if allow_presence => Some(StringMatch::Present),
        0 => {
            r.at(path, "one of exact, prefix or regex is required");
            None
        }
        1 => {
            if let Some(StringMatch::Regex(re)) = set.first()
                && re.as_str().is_empty()
            {
                r.at(&path.key("regex"), "must not be empty");
            }
            set.into_iter().next()
        }
        _ => {
            r.at(path, "only one of exact, prefix or regex may be set");
            None
        }
    }
}

/// A duration field that Istio requires to be at least 1ms.
pub(crate) fn duration(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    text: Option<&raw::DurationText>,
) -> Option<Duration> {
    let text = &text?.0;
    match parse_duration(text).and_then(|d| check_min_1ms(text, d)) {
        Ok(d) => Some(d),
        Err(message) => {
            r.at(path, message);
            None
        }
    }
}

/// An integer field limited to `lo..=hi` (Istio's int32 fields are non-negative).
pub(crate) fn int_in(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    value: Option<i64>,
    lo: i64,
    hi: i64,
) -> Option<u32> {
    let v = value?;
    if v < lo || v > hi {
        r.at(path, format!("{v} is out of range ({lo}-{hi})"));
        return None;
    }
    u32::try_from(v).ok()
}

pub(crate) const INT32_MAX: i64 = i32::MAX as i64;

pub(crate) fn non_negative(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    value: Option<i64>,
) -> Option<u32> {
    int_in(r, path, value, 0, INT32_MAX)
}

pub(crate) fn port(r: &mut Reporter<'_>, path: &FieldPath, value: i64) -> Option<u16> {
    let p = port_number(value);
    if p.is_none() {
        r.at(path, format!("{value} is not a valid port (1-65535)"));
    }
    p
}

pub(crate) fn percent(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    value: Option<raw::Percent>,
) -> Option<f64> {
    let v = value?.value;
    if !(0.0..=100.0).contains(&v) {
        r.at(&path.key("value"), format!("{v} is out of range (0-100)"));
        return None;
    }
    Some(v)
}

/// `exportTo`: `.` (this namespace), `*` (all), `~` (none) or namespace names.
pub(crate) fn export_to(r: &mut Reporter<'_>, path: &FieldPath, entries: &[String]) -> Vec<String> {
    for (i, entry) in entries.iter().enumerate() {
        if !(matches!(entry.as_str(), "." | "*" | "~") || is_dns_label(entry)) {
            r.at(
                &path.index(i),
                format!("{entry:?} is not ., *, ~ or a namespace name"),
            );
        }
    }
    entries.to_vec()
}

/// Whether an object exported with `export_to` from `owner_namespace` is visible in `namespace`.
pub(crate) fn exported_to(export_to: &[String], owner_namespace: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && owner_namespace == namespace) || e == namespace)
}

/// RFC 1123 label: what Kubernetes requires of namespace names and Istio of subset names.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("v1"));
        assert!(!is_dns_label("V1"));
        assert!(!is_dns_label("-v1"));
        assert!(!is_dns_label(""));
    }

    #[test]
    fn string_match_semantics() {
        assert!(StringMatch::Prefix("/api".into()).matches("/api/x", false));
        assert!(StringMatch::Prefix("/API".into()).matches("/api/x", true));
        assert!(!StringMatch::Exact("canary".into()).matches("Canary", false));
        assert!(StringMatch::Present.matches("", false));
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&[".".into()], "a", "a"));
        assert!(!exported_to(&[".".into()], "a", "b"));
    }
}
