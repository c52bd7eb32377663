//! Reading what `mesh-probe http` reports (one JSON line per run), shared by the e2e tests.
use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;

use crate::SimCluster;

/// Runs `mesh-probe http URL ARGS...` in `pod` and parses its report; panics with node-a's
/// proxy log when the probe fails, since that is where the reason usually is.
pub fn http(c: &SimCluster, pod: &str, url: &str, args: &[&str], timeout: Duration) -> Value {
    let mut full = vec!["http", url];
    full.extend_from_slice(args);
    let out = c.probe(pod, &full, timeout).unwrap_or_else(|e| panic!("{e}\nnode-a log:\n{}", c.proxy_log(0)));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Requests answered per pod (by the `x-pod` response header).
pub fn by_pod(v: &Value) -> BTreeMap<String, u64> {
    v["by_pod"].as_object().map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

/// Responses with this status code.
pub fn status_count(v: &Value, status: &str) -> u64 {
    v["by_status"][status].as_u64().unwrap_or(0)
}
