//! A serde `Deserializer` over an already-parsed `serde_yaml::Value` that
//! remembers where an error happened.
//!
//! serde_yaml's own errors carry no field path once the document is a
//! `Value`, and `deny_unknown_fields` only says "unknown field `x`". Wrapping
//! the value tree lets every error name its full path (`http[0].retries.attempts`)
//! without an extra crate.

use std::fmt;

use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde_yaml::Value;

use super::field_path::FieldPath;

/// A deserialization error and the field it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeError {
    pub path: FieldPath,
    pub message: String,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            path: FieldPath::root(),
            message: msg.to_string(),
        }
    }

    // The derive reports the missing field from the parent struct; putting the
    // field into the path makes the message point at it.
    fn missing_field(field: &'static str) -> Self {
        Self {
            path: FieldPath::root().key(field),
            message: "is required".into(),
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self {
            path: FieldPath::root().key(field),
            message: format!("unknown field (expected one of: {})", expected.join(", ")),
        }
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self {
            path: FieldPath::root(),
            message: format!("{variant:?} is not one of {}", expected.join(", ")),
        }
    }
}

/// Deserializes `T` from `value`, reporting the path of the first error.
pub fn from_value<'de, T: Deserialize<'de>>(value: &'de Value) -> Result<T, DeError> {
    T::deserialize(ValueDe(value))
}

struct ValueDe<'de>(&'de Value);

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Unexpected::Unsigned(u)
            } else if let Some(i) = n.as_i64() {
                Unexpected::Signed(i)
            } else {
                Unexpected::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Unexpected::Str(s),
        Value::Sequence(_) => Unexpected::Seq,
        Value::Mapping(_) => Unexpected::Map,
        Value::Tagged(_) => Unexpected::Other("tagged value"),
    }
}

/// How a map key appears in a field path.
fn key_segment(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "?".to_string(),
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Sequence(items) => visitor.visit_seq(SeqDe {
                iter: items.iter().enumerate(),
            }),
            Value::Mapping(map) => visitor.visit_map(MapDe {
                iter: Some(map.iter()),
                value: None,
                key: String::new(),
            }),
            Value::Tagged(tagged) => ValueDe(&tagged.value).deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    // `labels:` with nothing after it is null in YAML; Kubernetes treats that as
    // empty, so lists and maps do too.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_seq(SeqDe {
                iter: [].iter().enumerate(),
            }),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_map(MapDe {
                iter: None,
                value: None,
                key: String::new(),
            }),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.0 {
            Value::String(s) => {
                visitor.visit_enum(IntoDeserializer::<DeError>::into_deserializer(s.as_str()))
            }
            Value::Tagged(tagged) => {
                ValueDe(&tagged.value).deserialize_enum(_name, _variants, visitor)
            }
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct tuple tuple_struct identifier
    }
}

struct SeqDe<'de> {
    iter: std::iter::Enumerate<std::slice::Iter<'de, Value>>,
}

impl<'de> SeqAccess<'de> for SeqDe<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.iter.next() {
            None => Ok(None),
            Some((index, value)) => seed.deserialize(ValueDe(value)).map(Some).map_err(|mut e| {
                e.path.push_front_index(index);
                e
            }),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'de> {
    iter: Option<serde_yaml::mapping::Iter<'de>>,
    value: Option<&'de Value>,
    key: String,
}

impl<'de> MapAccess<'de> for MapDe<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, value)) = self.iter.as_mut().and_then(Iterator::next) else {
            return Ok(None);
        };
        self.value = Some(value);
        self.key = key_segment(key);
        seed.deserialize(ValueDe(key)).map(Some).map_err(|mut e| {
            // `unknown_field` already names the key; other key errors (a number
            // where a string key is expected) get it here.
            if e.path.is_empty() {
                e.path.push_front_key(self.key.clone());
            }
            e
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| <DeError as de::Error>::custom("map value requested before its key"))?;
        seed.deserialize(ValueDe(value)).map_err(|mut e| {
            e.path.push_front_key(self.key.clone());
            e
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.iter.as_ref().map(ExactSizeIterator::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(default)]
        items: Vec<Inner>,
        mode: Option<Mode>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Inner {
        max_count: Option<u32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    enum Mode {
        Strict,
        Permissive,
    }

    fn parse(yaml: &str) -> Result<Outer, DeError> {
        let value: Value = serde_yaml::from_str(yaml).expect("test yaml parses");
        from_value(&value)
    }

    #[test]
    fn parses_valid_input_and_null_collections() {
        let out = parse("name: a\nitems:\n  - maxCount: 3\nmode: STRICT\nlabels:\n").unwrap();
        assert_eq!(out.items, vec![Inner { max_count: Some(3) }]);
        assert_eq!(out.mode, Some(Mode::Strict));
        assert!(out.labels.is_empty());
    }

    #[test]
    fn names_the_path_of_each_error_kind() {
        let e = parse("name: a\nitems:\n  - {}\n  - maxCount: x\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "items[1].maxCount: invalid type: string \"x\", expected u32"
        );
        let e = parse("name: a\nitems:\n  - maxCont: 1\n").unwrap_err();
        assert_eq!(e.path.to_string(), "items[0].maxCont");
        assert!(
            e.message
                .starts_with("unknown field (expected one of: maxCount"),
            "{e}"
        );
        let e = parse("items: []\n").unwrap_err();
        assert_eq!(e.to_string(), "name: is required");
        let e = parse("name: a\nmode: LOOSE\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "mode: \"LOOSE\" is not one of STRICT, PERMISSIVE"
        );
        let e = parse("name: a\nlabels:\n  app: 3\n").unwrap_err();
        assert_eq!(e.path.to_string(), "labels.app");
    }
}
