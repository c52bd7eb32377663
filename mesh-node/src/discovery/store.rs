//! Per-kind object stores (keyed `namespace/name`) and their rendering into
//! the documents file mode decodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    /// plural -> "namespace/name" -> object (apiVersion/kind filled in).
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Kinds whose first full list has completed.
    synced: BTreeSet<&'static str>,
}

#[derive(Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) changed: Notify,
}

fn key(object: &Value) -> Option<String> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
    Some(format!("{ns}/{name}"))
}

/// Fills in what list items omit and drops what the model never reads.
/// Returns `None` for objects the model cannot hold yet: pods not scheduled
/// or without an IP, and finished pods (their IPs get reused).
fn normalize(kind: &str, api_version: &str, mut object: Value) -> Option<Value> {
    let map = object.as_object_mut()?;
    map.insert("apiVersion".into(), Value::String(api_version.into()));
    map.insert("kind".into(), Value::String(kind.into()));
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    if kind == "Pod" {
        let text = |p: &str| object.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty());
        if text("/spec/nodeName").is_none() || text("/status/podIP").is_none() {
            return None;
        }
        if matches!(text("/status/phase"), Some("Succeeded" | "Failed")) {
            return None;
        }
    }
    Some(object)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A full list: replaces the kind's objects and marks it synced.
    pub(crate) fn replace(&self, kind: &'static str, plural: &'static str, api_version: &str, items: Vec<Value>) {
        let mut objects = BTreeMap::new();
        for item in items {
            if let Some(object) = normalize(kind, api_version, item)
                && let Some(k) = key(&object)
            {
                objects.insert(k, object);
            }
        }
        let mut state = self.lock();
        state.objects.insert(plural, objects);
        state.synced.insert(plural);
        drop(state);
        self.changed.notify_one();
    }

    pub(crate) fn upsert(&self, kind: &'static str, plural: &'static str, api_version: &str, object: Value) {
        let Some(k) = key(&object) else { return };
        let mut state = self.lock();
        let store = state.objects.entry(plural).or_default();
        match normalize(kind, api_version, object) {
            Some(object) => {
                store.insert(k, object);
            }
            None => {
                store.remove(&k);
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    pub(crate) fn delete(&self, plural: &'static str, object: &Value) {
        let Some(k) = key(object) else { return };
        let mut state = self.lock();
        if let Some(store) = state.objects.get_mut(plural) {
            store.remove(&k);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The documents, one per object as `(plural/namespace/name, JSON)`, in a
    /// stable order; `None` until every kind in `kinds` has been listed once.
    pub(crate) fn documents(&self, kinds: &[&'static str]) -> Option<Vec<(String, String)>> {
        let state = self.lock();
        if !kinds.iter().all(|k| state.synced.contains(k)) {
            return None;
        }
        let mut out = Vec::new();
        for (plural, objects) in &state.objects {
            for (key, object) in objects {
                let name = format!("{plural}/{}", key.trim_start_matches('/'));
                out.push((name, serde_json::to_string(object).unwrap_or_default()));
            }
        }
        Some(out)
    }
}

/// FNV-1a over names and contents, like file mode's change detector.
pub(crate) fn fingerprint(docs: &[(String, String)]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in docs.iter().flat_map(|(n, t)| n.bytes().chain([0]).chain(t.bytes()).chain([0])) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}
