//! Dotted field paths (`http[0].route[1].weight`) shared by the deserializer
//! and the semantic validators, so both name fields the same way.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A path to a field inside one object, rendered like `a.b[0].c`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    pub fn root() -> Self {
        Self::default()
    }

    /// Shorthand for a path of plain keys, e.g. `FieldPath::of(&["spec", "host"])`.
    pub fn of(keys: &[&str]) -> Self {
        Self(
            keys.iter()
                .map(|k| Segment::Key((*k).to_string()))
                .collect(),
        )
    }

    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.into()));
        next
    }

    pub fn index(&self, index: usize) -> Self {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }

    /// Prepends a segment; the deserializer learns the path from the inside out.
    pub(crate) fn push_front_key(&mut self, key: impl Into<String>) {
        self.0.insert(0, Segment::Key(key.into()));
    }

    pub(crate) fn push_front_index(&mut self, index: usize) {
        self.0.insert(0, Segment::Index(index));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                // Label keys such as `istio.io/dataplane-mode` contain dots; quote
                // them so the path stays unambiguous.
                Segment::Key(k) if !is_plain_key(k) => write!(f, "[{k:?}]")?,
                Segment::Key(k) if i == 0 => f.write_str(k)?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_keys_indexes_and_quoted_keys() {
        let p = FieldPath::of(&["spec", "http"])
            .index(0)
            .key("route")
            .index(1)
            .key("weight");
        assert_eq!(p.to_string(), "spec.http[0].route[1].weight");
        let labels = FieldPath::of(&["metadata", "labels"]).key("istio.io/dataplane-mode");
        assert_eq!(
            labels.to_string(),
            "metadata.labels[\"istio.io/dataplane-mode\"]"
        );
        assert_eq!(FieldPath::root().to_string(), "");
    }
}
