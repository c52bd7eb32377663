//! `/certs`: the workload certificates this node holds for its pods, and whether the CA that
//! renews them can be reached from here.
use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::AdminState;

/// Below this share of its lifetime left, a certificate counts as near expiry: rotation
/// renews at half, so reaching it means renewals have been failing.
pub const NEAR_EXPIRY_FRACTION: f64 = 0.2;

pub async fn certs(state: &AdminState) -> Value {
    let Some(tls) = state.proxy.connector.tunnels.tls().cloned() else {
        return json!({"mode": "plaintext", "ca": null, "certificates": []});
    };
    let cluster = state.proxy.cluster();
    let ids: BTreeSet<_> =
        cluster.pods().filter(|p| p.node == state.node && cluster.is_enrolled(p)).map(|p| tls.identity_of(p)).collect();
    let now = SystemTime::now();
    let certs: Vec<Value> = ids
        .into_iter()
        .map(|id| match tls.certs().cached(&id) {
            None => json!({"identity": id.to_string(), "state": "missing"}),
            Some(cert) => {
                let left = cert.not_after.duration_since(now).unwrap_or(Duration::ZERO);
                let lifetime = cert.not_after.duration_since(cert.issued_at).unwrap_or(Duration::ZERO);
                let fraction = if lifetime.is_zero() { 0.0 } else { left.as_secs_f64() / lifetime.as_secs_f64() };
                json!({
                    "identity": id.to_string(),
                    "serial": cert.serial,
                    "not_before": rfc3339(cert.not_before),
                    "not_after": rfc3339(cert.not_after),
                    "seconds_left": left.as_secs(),
                    "lifetime_left": (fraction * 1000.0).round() / 1000.0,
                    "state": if fraction < NEAR_EXPIRY_FRACTION { "near-expiry" } else { "valid" },
                })
            }
        })
        .collect();
    let ca = match &state.ca_address {
        Some(addr) => {
            let reach = ca_reachable(addr).await;
            json!({"address": addr, "reachable": reach.is_ok(), "error": reach.err()})
        }
        None => Value::Null,
    };
    json!({"mode": "mtls", "trust_domain": tls.certs().trust_domain(), "ca": ca, "certificates": certs})
}

/// A TCP connect from the daemon's own network namespace: the view that matters for
/// renewals, whatever network `meshctl` runs in.
async fn ca_reachable(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connecting to the CA at {addr}: {e}")),
        Err(_) => Err(format!("connecting to the CA at {addr}: no answer within 2s")),
    }
}

/// UTC, second precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => secs.to_string(),
    }
}
