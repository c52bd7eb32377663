//! Table views of the admin API's JSON, one function per command. Each takes the document
//! exactly as `-o json` prints it, so the two outputs cannot drift apart.
use std::fmt::Write as _;

use serde_json::Value;

use crate::table::{Table, cell};

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

pub fn workloads(v: &Value, local_only: bool) -> String {
    let mut t = Table::new(&["NAMESPACE", "NAME", "IP", "NODE", "ENROLLED", "APP", "VERSION", "IDENTITY"]);
    for w in items(&v["workloads"]).filter(|w| !local_only || w["local"] == true) {
        let node = format!("{}{}", cell(&w["node"]), if w["local"] == true { " *" } else { "" });
        t.row(vec![cell(&w["namespace"]), cell(&w["name"]), cell(&w["ip"]), node, cell(&w["enrolled"]), cell(&w["app"]), cell(&w["version"]), cell(&w["identity"])]);
    }
    format!("{}(* on this node: {})\n", t.render(), cell(&v["node"]))
}

pub fn services(v: &Value) -> String {
    let mut t = Table::new(&["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS", "DESTINATIONRULE", "VIRTUALSERVICES"]);
    for s in items(&v["services"]) {
        let ports: Vec<String> = items(&s["ports"]).map(|p| format!("{}/{}", p["port"], cell(&p["protocol"]))).collect();
        let eps: Vec<String> = items(&s["ports"]).map(|p| p["endpoints"].to_string()).collect();
        t.row(vec![cell(&s["namespace"]), cell(&s["name"]), cell(&s["vips"]), ports.join(","), eps.join(","), cell(&s["destination_rule"]), cell(&s["virtual_services"])]);
    }
    t.render()
}

pub fn endpoints(v: &Value) -> String {
    let mut t = Table::new(&["CLUSTER", "ENDPOINT", "POD", "NODE", "HEALTH", "EJECTION LEFT", "ACTIVE", "5XX", "GW-ERR", "LOCAL-FAIL"]);
    for c in items(&v["clusters"]) {
        let name = if c["resolved"] == true { cell(&c["cluster"]) } else { format!("{} (no traffic yet)", cell(&c["cluster"])) };
        for e in items(&c["endpoints"]) {
            let left = e["ejection_remaining_ms"].as_u64().map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or("-".into());
            t.row(vec![
                name.clone(), cell(&e["addr"]), cell(&e["pod"]), cell(&e["node"]), cell(&e["health"]), left,
                cell(&e["active"]), cell(&e["consecutive_5xx"]), cell(&e["consecutive_gateway_errors"]), cell(&e["consecutive_local_origin_failures"]),
            ]);
        }
    }
    if t.is_empty() {
        return format!("{}: no endpoints (no pod matches the selector, or no port resolves)\n", cell(&v["service"]));
    }
    t.render()
}

pub fn routes(v: &Value) -> String {
    let mut out = String::new();
    for s in items(&v["services"]) {
        let _ = writeln!(out, "{}", cell(&s["service"]));
        let mut t = Table::new(&["  #", "KIND", "VIRTUALSERVICE", "MATCH", "ROUTE"]);
        for (kind, list) in [("http", &s["http"]), ("tcp", &s["tcp"])] {
            for (i, r) in items(list).enumerate() {
                let (matches, route) = (route_matches(r), route_destinations(r));
                let route = if route.is_empty() { r["redirect"].as_str().map(|x| format!("redirect {x}")).unwrap_or("-".into()) } else { route };
                t.row(vec![format!("  {}", i + 1), kind.into(), cell(&r["virtual_service"]), matches, route]);
            }
        }
        if t.is_empty() {
            out.push_str("  no VirtualService: every request goes to the Service\n");
        } else {
            out.push_str(&t.render());
        }
        match &s["destination_rule"] {
            Value::Null => out.push_str("  no DestinationRule: LEAST_REQUEST, no outlier detection\n"),
            dr => {
                let p = &dr["policy"];
                let _ = writeln!(out, "  DestinationRule {}: lb {}, outlier detection {}", cell(&dr["name"]), cell(&p["load_balancer"]), outlier(&p["outlier_detection"]));
                for sub in items(&dr["subsets"]) {
                    let labels: Vec<String> = sub["labels"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", cell(v))).collect();
                    let _ = writeln!(out, "    subset {}: {}", cell(&sub["name"]), labels.join(","));
                }
            }
        }
        out.push('\n');
    }
    out
}

fn outlier(o: &Value) -> String {
    if o.is_null() {
        return "off".into();
    }
    format!(
        "{} consecutive 5xx, every {}, eject {}, max {}%",
        o["consecutive_5xx_errors"], cell(&o["interval"]), cell(&o["base_ejection_time"]), o["max_ejection_percent"]
    )
}

pub fn certs(v: &Value) -> String {
    if v["mode"] == "plaintext" {
        return "plaintext mode: no CA configured (--ca-address), tunnels between nodes are not encrypted\n".into();
    }
    let mut out = String::new();
    let ca = &v["ca"];
    let reach = if ca["reachable"] == true { "reachable".to_owned() } else { format!("UNREACHABLE ({})", cell(&ca["error"])) };
    let _ = writeln!(out, "CA {}: {reach}\n", cell(&ca["address"]));
    let mut t = Table::new(&["IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "LEFT"]);
    for c in items(&v["certificates"]) {
        let left = c["seconds_left"].as_u64().map(human_secs).unwrap_or("-".into());
        let left = match c["lifetime_left"].as_f64() {
            Some(f) => format!("{left} ({:.0}%)", f * 100.0),
            None => left,
        };
        t.row(vec![cell(&c["identity"]), cell(&c["state"]), cell(&c["serial"]), cell(&c["not_before"]), cell(&c["not_after"]), left]);
    }
    if t.is_empty() {
        out.push_str("no mesh workloads on this node, so no certificates\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

pub fn human_secs(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

pub fn bpf(v: &Value) -> String {
    let mut out = format!("attach point (cgroup): {}\n\n", cell(&v["cgroup"]));
    let mut t = Table::new(&["PROGRAM", "HOOK", "ID", "ATTACHED", "LINKS"]);
    for p in items(&v["programs"]) {
        t.row(vec![cell(&p["name"]), cell(&p["hook"]), cell(&p["id"]), cell(&p["attached"]), cell(&p["links"])]);
    }
    out.push_str(&t.render());
    out.push('\n');
    let mut t = Table::new(&["ENROLLED POD", "CGROUP IDS", "IN KERNEL MAP"]);
    for e in items(&v["enrolled_pods"]) {
        t.row(vec![cell(&e["pod"]), cell(&e["cgroup_ids"]), cell(&e["in_kernel_map"])]);
    }
    if t.is_empty() {
        out.push_str("no enrolled pods on this node\n");
    } else {
        out.push_str(&t.render());
    }
    out.push('\n');
    let mut t = Table::new(&["MESH DESTINATION", "KIND", "OWNER"]);
    for d in items(&v["mesh_destinations"]) {
        t.row(vec![cell(&d["ip"]), cell(&d["kind"]), cell(&d["owner"])]);
    }
    out.push_str(&t.render());
    let counters: Vec<String> = v["counters"].as_object().into_iter().flatten().map(|(k, n)| format!("{k}={n}")).collect();
    let _ = writeln!(out, "\ncounters: {}", counters.join(" "));
    let fast = &v["fast_path"];
    if !fast.is_null() {
        let counters: Vec<String> = fast["counters"].as_object().into_iter().flatten().map(|(k, n)| format!("{k}={n}")).collect();
        let reason = fast["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
        let _ = writeln!(out, "socket fast path: {}{reason}, {} sockets; {}", cell(&fast["state"]), cell(&fast["sockets"]), counters.join(" "));
    }
    out
}

/// `pid 1 instance 9f3a...`; a proxy of an older release reports its pid alone.
fn proxy_name(pid: &Value, instance: &Value) -> String {
    match instance.as_str() {
        Some(instance) => format!("pid {} instance {instance}", cell(pid)),
        None => format!("pid {}", cell(pid)),
    }
}

/// A starting successor: `{"pid", "instance"}`, or a bare pid from an older release.
fn successor_name(s: &Value) -> String {
    if s.is_object() { proxy_name(&s["pid"], &s["instance"]) } else { proxy_name(s, &Value::Null) }
}

pub fn status(v: &Value) -> String {
    let mut t = Table::new(&["", ""]);
    let c = &v["counters"];
    let cap = &v["capture"];
    let certs = &v["certificates"];
    let cfg = &v["config"];
    t.row(vec!["node".into(), cell(&v["node"])]);
    t.row(vec!["ready".into(), cell(&v["ready"])]);
    // During a restart two proxies share the admin port and either may answer: the instance
    // id says which one this is (in pods both are pid 1).
    let mut process = proxy_name(&v["pid"], &v["instance"]);
    let starting: Vec<String> = items(&v["successors_starting"]).map(successor_name).collect();
    if !starting.is_empty() {
        process.push_str(&format!("; a new proxy is starting ({}): readiness answers 503 until it is ready", starting.join(", ")));
    }
    t.row(vec!["process".into(), process]);
    t.row(vec!["uptime".into(), v["uptime_seconds"].as_u64().map(human_secs).unwrap_or("-".into())]);
    t.row(vec!["log level".into(), cell(&v["log_level"])]);
    let source = if cfg["source"] == "kubernetes" { "Kubernetes API".to_owned() } else { cell(&cfg["dir"]) };
    t.row(vec!["config".into(), format!("generation {}, {}, {} reloads, {}", cell(&cfg["generation"]), cell(&cfg["status"]), cfg["reloads"], source)]);
    for h in items(&cfg["held_back"]) {
        let age = h["seconds_ago"].as_u64().map(human_secs).unwrap_or("-".into());
        t.row(vec!["held back".into(), format!("{} (for {age})", cell(&h["message"]))]);
    }
    t.row(vec![
        "capture".into(),
        format!(
            "{}/{} programs attached, {}/{} enrolled pods found, {} mesh destinations",
            cap["programs_attached"], cap["programs"], cap["enrolled_pods_found"], cap["enrolled_pods_configured"], cap["mesh_destinations"]
        ),
    ]);
    t.row(vec![
        "counters".into(),
        format!(
            "captured {}, outbound {}, inbound {}, http requests {} (retries {}), no healthy upstream {}, connect errors {}, tunnels {}",
            c["captured"], c["outbound_accepted"], c["inbound_requests"], c["http_requests"], c["http_retries"], c["no_healthy_upstream"], c["connect_errors"], c["tunnel_connections"]
        ),
    ]);
    let cert_line = if certs["mode"] == "plaintext" {
        "plaintext (no CA configured)".to_owned()
    } else {
        let ca = &certs["ca"];
        format!(
            "mtls: {} certificates ({} missing, {} near expiry), shortest left {}; CA {} {}",
            certs["count"], certs["missing"], certs["near_expiry"],
            certs["min_seconds_left"].as_u64().map(human_secs).unwrap_or("-".into()),
            cell(&ca["address"]), if ca["reachable"] == true { "reachable" } else { "UNREACHABLE" }
        )
    };
    t.row(vec!["certificates".into(), cert_line]);
    let listeners: Vec<String> = items(&v["listeners"])
        .map(|l| format!("{} {}{}", cell(&l["role"]), cell(&l["address"]), if l["listening"] == true { "" } else { " (NOT LISTENING)" }))
        .collect();
    t.row(vec!["listeners".into(), listeners.join(", ")]);
    // Drop the empty header line.
    t.render().lines().skip(1).map(|l| format!("{}\n", l.trim_end())).collect()
}

pub fn connections(v: &Value) -> String {
    let mut t = Table::new(&["ID", "DIR", "PROTO", "PEER", "SOURCE", "SERVICE", "DESTINATION", "UPSTREAM", "AGE", "IN", "OUT"]);
    for c in items(&v["connections"]) {
        let age = c["age_ms"].as_u64().map(|ms| human_secs(ms / 1000)).unwrap_or("-".into());
        t.row(vec![
            cell(&c["id"]), cell(&c["direction"]), cell(&c["protocol"]), cell(&c["peer"]), cell(&c["source_workload"]),
            cell(&c["destination_service"]), cell(&c["destination"]), cell(&c["upstream"]), age, cell(&c["bytes_in"]), cell(&c["bytes_out"]),
        ]);
    }
    if t.is_empty() {
        return "no live connections\n".into();
    }
    t.render()
}

pub fn stats(v: &Value) -> String {
    let mut t = Table::new(&["GROUP", "COUNTER", "VALUE"]);
    for group in ["capture", "proxy"] {
        for (k, n) in v[group].as_object().into_iter().flatten() {
            t.row(vec![group.into(), k.clone(), cell(n)]);
        }
    }
    t.row(vec!["tunnel".into(), "connections".into(), cell(&v["tunnel_connections"])]);
    t.render()
}

pub fn clusters(v: &Value) -> String {
    let mut t = Table::new(&["CLUSTER", "POLICY", "ENDPOINT", "POD", "HEALTH", "ACTIVE", "EJECTIONS"]);
    for (name, c) in v.as_object().into_iter().flatten() {
        for e in items(&c["endpoints"]) {
            let health = if e["ejected"] == true { "ejected" } else { "healthy" };
            t.row(vec![name.clone(), cell(&c["policy"]), cell(&e["addr"]), cell(&e["pod"]), health.into(), cell(&e["active"]), cell(&e["times_ejected"])]);
        }
    }
    if t.is_empty() {
        return "no upstream clusters yet (they appear with the first request to a Service)\n".into();
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn status_tells_two_pid_1_proxies_apart_by_instance() {
        let v = json!({
            "node": "node-a", "ready": true, "pid": 1, "instance": "00000000000000aa", "uptime_seconds": 5,
            "successors_starting": [{"pid": 1, "instance": "00000000000000bb"}],
            "config": {"source": "kubernetes", "generation": "00ab", "status": "ok", "reloads": 0},
        });
        let out = super::status(&v);
        assert!(out.contains("pid 1 instance 00000000000000aa; a new proxy is starting (pid 1 instance 00000000000000bb)"), "{out}");
    }

    /// An older proxy answers with a pid alone, and lists its successors as pids.
    #[test]
    fn status_shows_the_pid_a_starting_successor_and_held_back_objects() {
        let v = json!({
            "node": "node-a", "ready": true, "pid": 4242, "successors_starting": [4343], "uptime_seconds": 5,
            "config": {"source": "kubernetes", "generation": "00ab", "status": "held-back", "reloads": 2,
                "held_back": [{"message": "Service demo/dup rejected (left out): spec.clusterIP: 10.96.0.1 is already used by Service demo/a", "seconds_ago": 120}]},
        });
        let out = super::status(&v);
        assert!(out.contains("pid 4242; a new proxy is starting (pid 4343)"), "{out}");
        assert!(out.contains("Kubernetes API"), "{out}");
        assert!(out.contains("held back") && out.contains("Service demo/dup rejected (left out): spec.clusterIP") && out.contains("(for 2m"), "{out}");
    }
}

/// `meshctl describe`: one section per question a user asks about a request's path.
pub fn describe(v: &Value) -> String {
    let mut out = String::new();
    let src = &v["source"];
    let dst = &v["destination"];
    let _ = writeln!(out, "From   {} ({}, node {}, {}){}", cell(&src["pod"]), cell(&src["ip"]), cell(&src["node"]), cell(&src["identity"]), if src["in_mesh"] == true { "" } else { "  NOT IN THE MESH: its connections are not captured" });
    let _ = writeln!(out, "To     {} port {} ({}), Service {}", cell(&dst["host"]), dst["port"], cell(&dst["protocol"]), cell(&dst["service"]));
    match &v["virtual_service"] {
        Value::Null => out.push_str("\nVirtualService: none (every request goes to the Service)\n"),
        vs => {
            let _ = writeln!(out, "\nVirtualService {}", cell(&vs["name"]));
            for s in items(&vs["shadowed"]) {
                let _ = writeln!(out, "  shadows {} (newer, or less specific: not applied for this client)", cell(s));
            }
            let mut t = Table::new(&["  #", "MATCH", "ROUTE", "TIMEOUT", "RETRIES"]);
            for (i, r) in items(&v["http_routes"]).enumerate() {
                let (matches, route) = (route_matches(r), route_destinations(r));
                let t_out = &r["effective_timeout"];
                let retry = &r["effective_retries"];
                let retries = format!("{} x [{}] ({})", retry["attempts"], items(&retry["retry_on"]).map(cell).collect::<Vec<_>>().join(","), cell(&retry["origin"]));
                t.row(vec![
                    format!("  {}", i + 1),
                    matches,
                    if route.is_empty() { "-".into() } else { route },
                    format!("{} ({})", cell(&t_out["value"]), cell(&t_out["origin"])),
                    retries,
                ]);
            }
            for (i, r) in items(&v["tcp_routes"]).enumerate() {
                t.row(vec![format!("  tcp {}", i + 1), "*".into(), route_destinations(r), "-".into(), "-".into()]);
            }
            out.push_str(&t.render());
        }
    }
    match &v["destination_rule"] {
        Value::Null => out.push_str("\nDestinationRule: none (Istio defaults)\n"),
        dr => {
            let _ = writeln!(out, "\nDestinationRule {} (from the {})", cell(&dr["name"]), cell(&dr["origin"]));
        }
    }
    for c in items(&v["clusters"]) {
        let _ = writeln!(out, "\nCluster {}", cell(&c["cluster"]));
        if let Some(e) = c["error"].as_str() {
            let _ = writeln!(out, "  error: {e}");
            continue;
        }
        let p = &c["policy"];
        for (what, key) in [("load balancer", "load_balancer"), ("outlier detection", "outlier_detection"), ("connection pool", "connection_pool")] {
            let value = &p[key]["value"];
            let shown = if value.is_object() { outlier(value) } else { cell(value) };
            let _ = writeln!(out, "  {what}: {shown}  [{}]", cell(&p[key]["origin"]));
        }
        let mut t = Table::new(&["  ENDPOINT", "POD", "NODE", "READY", "HEALTH", "ACTIVE", "PEERAUTHN", "AUTHZ"]);
        for e in items(&c["endpoints"]) {
            let authz = match &e["authorization"] {
                Value::Null => "-".to_string(),
                a => {
                    let policies: Vec<String> = items(&a["policies"]).map(cell).collect();
                    if policies.is_empty() { format!("{} (no policy)", cell(&a["decision"])) } else { format!("{} ({})", cell(&a["decision"]), policies.join(", ")) }
                }
            };
            let health = match e["ejection_remaining_ms"].as_u64() {
                Some(ms) => format!("{} ({:.1}s left)", cell(&e["health"]), ms as f64 / 1000.0),
                None => cell(&e["health"]),
            };
            t.row(vec![format!("  {}", cell(&e["addr"])), cell(&e["pod"]), cell(&e["node"]), cell(&e["ready"]), health, cell(&e["active"]), cell(&e["peer_authentication"]), authz]);
        }
        if t.is_empty() {
            out.push_str("  no endpoint\n");
        } else {
            out.push_str(&t.render());
        }
    }
    out
}

/// A route's match blocks as `a && b || c` (`*` when it matches everything).
fn route_matches(r: &Value) -> String {
    let blocks: Vec<String> = items(&r["match"])
        .map(|m| match m["conditions"].as_array() {
            Some(c) if !c.is_empty() => c.iter().map(cell).collect::<Vec<_>>().join(" && "),
            Some(_) => "*".into(),
            None => m.to_string(),
        })
        .collect();
    if blocks.is_empty() { "*".into() } else { blocks.join(" || ") }
}

/// A route's destinations as `host subset s W%, ...` (empty when it has none, e.g. a redirect).
fn route_destinations(r: &Value) -> String {
    let dests: Vec<String> = items(&r["route"])
        .map(|d| {
            let subset = d["subset"].as_str().map(|s| format!(" subset {s}")).unwrap_or_default();
            format!("{}{subset} {}%", cell(&d["host"]), d["weight"])
        })
        .collect();
    dests.join(", ")
}

