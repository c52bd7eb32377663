//! `/status` (the node at a glance: readiness, config, counters, certificates, listeners,
//! capture) and `/config_status` (is the config on disk what is live?).
use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::{AdminState, certs};
use crate::{capture::cgroup, config::Cluster};

pub async fn status(state: &AdminState) -> Value {
    let cluster = state.proxy.cluster();
    let capture = state.capture_counters.read();
    let proxy = state.proxy_stats.snapshot();
    let certs = certs::certs(state).await;
    let cert_list = certs["certificates"].as_array().cloned().unwrap_or_default();
    let programs = state.bpf.programs();
    let enrolled_here = cluster.pods().filter(|p| p.node == state.node && cluster.is_enrolled(p)).count();
    let capture_state = state.capture_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let cgroup2 = cgroup::cgroup2_mount();
    json!({
        "node": state.node,
        "ready": state.is_ready(),
        // During a restart two proxies share the admin port: which one answered (in pods both
        // are pid 1: the instance id tells them apart).
        "pid": std::process::id(),
        "instance": crate::capture::announce::instance_id(),
        "successors_starting": state.successors.starting(),
        "uptime_seconds": SystemTime::now().duration_since(state.started).unwrap_or(Duration::ZERO).as_secs(),
        "log_level": super::log_level::current(),
        "config": config_status(state).await,
        "counters": {
            "captured": capture.get("captured"),
            "capture_errors": capture.get("errors"),
            "outbound_accepted": proxy.get("outbound_accepted"),
            "inbound_requests": proxy.get("inbound_requests"),
            "http_requests": proxy.get("http_requests"),
            "http_retries": proxy.get("http_retries"),
            "no_healthy_upstream": proxy.get("flag_uh"),
            "connect_errors": proxy.get("outbound_connect_errors").copied().unwrap_or(0) + proxy.get("inbound_connect_errors").copied().unwrap_or(0),
            "tunnel_connections": state.proxy.connector.tunnels.connections(),
        },
        "certificates": {
            "mode": certs["mode"],
            "ca": certs["ca"],
            "count": cert_list.len(),
            "missing": cert_list.iter().filter(|c| c["state"] == "missing").count(),
            "near_expiry": cert_list.iter().filter(|c| c["state"] == "near-expiry").count(),
            "min_seconds_left": cert_list.iter().filter_map(|c| c["seconds_left"].as_u64()).min(),
            "min_lifetime_left": cert_list.iter().filter_map(|c| c["lifetime_left"].as_f64()).reduce(f64::min),
        },
        "capture": {
            "cgroup": capture_state.cgroup,
            "cgroup2_mount": cgroup2.as_ref().ok(),
            "cgroup2_error": cgroup2.as_ref().err().map(ToString::to_string),
            "programs": programs.len(),
            "programs_attached": programs.iter().filter(|p| !p.links.is_empty()).count(),
            "enrolled_pods_configured": enrolled_here,
            "enrolled_pods_found": capture_state.enrolled.values().filter(|ids| !ids.is_empty()).count(),
            "mesh_destinations": capture_state.mesh_destinations,
        },
        "listeners": state.listeners.iter().map(|(role, addr)| json!({
            "role": role, "address": addr, "listening": is_listening(*addr),
        })).collect::<Vec<_>>(),
    })
}

/// Re-reads the config directory: the watcher only logs a rejected change, and the live
/// config stays the last good one, so this tells the two apart.
pub async fn config_status(state: &AdminState) -> Value {
    let live = state.proxy.cluster();
    // Applied, but more restrictively than written: listed in both modes.
    let warnings: Vec<String> = live.warnings().iter().map(ToString::to_string).collect();
    // Objects of kinds the mesh does not apply (ServiceEntry, Gateway, ...): listed in both modes.
    let not_applied = super::config_errors::not_applied(&live);
    if state.config_dir.as_os_str().is_empty() {
        // Kubernetes mode: there is no directory to compare with; what matters is which
        // objects discovery holds back.
        let errors = super::config_errors::config_errors(state.held_back.as_ref(), SystemTime::now());
        let held_back = errors["held_back"].as_array().cloned().unwrap_or_default();
        let problems: Vec<&str> = held_back.iter().filter_map(|h| h["message"].as_str()).collect();
        return json!({
            "source": "kubernetes", "generation": format!("{:016x}", live.fingerprint()),
            "reloads": state.proxy_stats.config_reloads.get(),
            "status": if held_back.is_empty() { "live" } else { "held-back" },
            "problems": problems, "held_back": held_back, "rejections_total": errors["rejections_total"],
            "warnings": warnings, "not_applied": not_applied,
        });
    }
    let dir = state.config_dir.clone();
    let loaded = tokio::task::spawn_blocking(move || Cluster::load_dir(&dir)).await;
    let generation = format!("{:016x}", live.fingerprint());
    let reloads = state.proxy_stats.config_reloads.get();
    let base = |status: &str, problems: Vec<String>| {
        json!({
            "dir": state.config_dir, "generation": generation, "reloads": reloads,
            "status": status, "problems": problems, "warnings": warnings, "not_applied": not_applied,
        })
    };
    match loaded {
        Ok(Ok(on_disk)) if on_disk.fingerprint() == live.fingerprint() => base("in-sync", vec![]),
        // Valid but not live yet: the watcher picks it up within its poll interval.
        Ok(Ok(_)) => base("pending", vec![]),
        Ok(Err(e)) => base("rejected", e.problems().to_vec()),
        Err(e) => base("unknown", vec![format!("re-reading the config: {e}")]),
    }
}

/// Whether a socket listens on `addr`'s port in this network namespace (read from
/// /proc/net/tcp{,6}); connecting would count as traffic on the proxy's own listeners.
fn is_listening(addr: SocketAddr) -> bool {
    const LISTEN: &str = "0A";
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path).unwrap_or_default().lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1).and_then(|local| local.rsplit_once(':')).and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            fields.get(3) == Some(&LISTEN) && port == Some(addr.port())
        })
    })
}
