//! `/describe?from=NS/POD&host=HOST[:PORT]`: why a request from a pod to a host goes where it
//! goes (istioctl's `x describe` and `proxy-config` in one answer). For the calling pod's
//! namespace, as the proxy itself looks them up: the VirtualService that applies (and those it
//! shadows), its routes with their subset weights, retries and timeout (each from the route or
//! Istio's default), the DestinationRule (and whether it came from the client's namespace, the
//! Service's or the root namespace), each upstream cluster's effective policy with its origin,
//! and its endpoints with their balancer state, PeerAuthentication mode and the
//! AuthorizationPolicies consulted for this caller.
use serde_json::{Value, json};

use super::{AdminState, routes, services};
use crate::{
    config::{Cluster, DestinationRule, HttpRetry, OutlierDetection, Pod, Service, root_namespace},
    destination::DestinationKey,
    identity::Identity,
    protocol::{self, Protocol},
};

pub fn describe(state: &AdminState, from: Option<&str>, host: Option<&str>) -> Result<Value, String> {
    let (Some(from), Some(host)) = (from, host) else {
        return Err("describe needs from=NAMESPACE/POD and host=HOST[:PORT]".into());
    };
    let cluster = state.proxy.cluster();
    let source = source_pod(&cluster, from)?;
    let (svc, port) = destination(&cluster, host, &source.namespace)?;
    let proto = protocol::for_port(svc.ports.iter().find(|p| p.port == port).expect("port checked"));
    let client_ns = source.namespace.as_str();
    let trust_domain = state.proxy.connector.trust_domain.as_str();
    let identity = Identity::new(trust_domain, &source.namespace, &source.service_account);

    let seen = cluster.virtual_services_seen_by(svc, Some(client_ns));
    let applied = seen.first().copied();
    // The upstream clusters the routes send to: (subset, port), the port a route names or the
    // one asked for.
    let (mut http, mut tcp, mut subsets) = (Vec::new(), Vec::new(), Vec::<(Option<String>, u16)>::new());
    if let Some(vs) = applied {
        let name = format!("{}/{}", vs.namespace, vs.name);
        for r in &vs.http {
            let mut route = routes::http_route(&name, r);
            let (retries, origin) = match &r.retries {
                Some(x) => (x.clone(), format!("VirtualService {name}")),
                None => (HttpRetry::istio_default(), "Istio default".to_string()),
            };
            route["effective_retries"] = json!({
                "attempts": retries.attempts,
                "retry_on": retries.retry_on.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "origin": origin,
            });
            route["effective_timeout"] = match r.timeout {
                Some(t) => json!({"value": format!("{}s", t.as_secs_f64()), "origin": format!("VirtualService {name}")}),
                None => json!({"value": "none", "origin": "Istio default (no timeout)"}),
            };
            http.push(route);
        }
        tcp.extend(vs.tcp.iter().map(|r| routes::tcp_route(&name, r)));
        let fqdn = svc.fqdn();
        let ours = |h: &str| cluster.service_by_host(h, &vs.namespace).is_some_and(|s| s.fqdn() == fqdn);
        let dests = vs.http.iter().flat_map(|r| r.route.iter().map(|d| &d.destination)).chain(vs.tcp.iter().flat_map(|r| r.route.iter().map(|d| &d.destination)));
        for d in dests.filter(|d| ours(&d.host)) {
            let to = (d.subset.clone(), d.port.unwrap_or(port));
            if !subsets.contains(&to) {
                subsets.push(to);
            }
        }
    }
    if subsets.is_empty() {
        subsets.push((None, port));
    }

    let rule = cluster.destination_rule_for(svc, Some(client_ns));
    let clusters: Vec<Value> = subsets.iter().map(|(s, p)| upstream(state, &cluster, svc, *p, s.as_deref(), source, &identity, rule)).collect();
    Ok(json!({
        "source": {
            "pod": format!("{}/{}", source.namespace, source.name),
            "ip": source.ip,
            "node": source.node,
            "identity": identity.to_string(),
            "in_mesh": cluster.is_enrolled(source),
        },
        "destination": {
            "service": format!("{}/{}", svc.namespace, svc.name),
            "host": svc.fqdn(),
            "vips": svc.cluster_ips,
            "port": port,
            "protocol": services::protocol_name(proto),
        },
        "virtual_service": applied.map(|vs| json!({
            "name": format!("{}/{}", vs.namespace, vs.name),
            "shadowed": seen.iter().skip(1).map(|v| format!("{}/{}", v.namespace, v.name)).collect::<Vec<_>>(),
        })),
        "http_routes": if proto == Protocol::Tcp { Vec::new() } else { http },
        "tcp_routes": tcp,
        "destination_rule": rule.map(|r| json!({
            "name": format!("{}/{}", r.namespace, r.name),
            "origin": rule_origin(r, client_ns, &svc.namespace),
        })),
        "clusters": clusters,
    }))
}

fn source_pod<'a>(cluster: &'a Cluster, from: &str) -> Result<&'a Pod, String> {
    if let Ok(ip) = from.parse() {
        return cluster.pod_by_ip(ip).ok_or_else(|| format!("from={from}: no pod has this address"));
    }
    let Some((ns, name)) = from.split_once('/') else {
        return Err(format!("from={from}: expected NAMESPACE/POD or a pod IP"));
    };
    cluster.pod(ns, name).ok_or_else(|| format!("from={from}: no Pod {ns}/{name}"))
}

/// The Service and port `host` names, short names read from the client's namespace.
fn destination<'a>(cluster: &'a Cluster, host: &str, client_ns: &str) -> Result<(&'a Service, u16), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("host={host}: {p:?} is not a port"))?)),
        None => (host, None),
    };
    let svc = match name.parse() {
        Ok(ip) => cluster.service_by_vip(ip),
        Err(_) => cluster.service_by_host(name, client_ns),
    }
    .ok_or_else(|| format!("host={host}: no Service {name} as seen from namespace {client_ns}"))?;
    let port = match (port, svc.ports.as_slice()) {
        (Some(p), ports) if ports.iter().any(|sp| sp.port == p) => p,
        (Some(p), _) => return Err(format!("host={host}: Service {}/{} has no port {p}", svc.namespace, svc.name)),
        (None, [only]) => only.port,
        (None, ports) => {
            let list: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
            return Err(format!("host={host}: Service {}/{} has several ports ({}); say HOST:PORT", svc.namespace, svc.name, list.join(", ")));
        }
    };
    Ok((svc, port))
}

/// The settings a connection pool sets, as Istio names them.
fn pool_summary(c: &crate::config::ConnectionPool) -> String {
    let d = |x: std::time::Duration| format!("{}s", x.as_secs_f64());
    let mut parts = Vec::new();
    if let Some(t) = &c.tcp {
        if let Some(n) = t.max_connections {
            parts.push(format!("tcp.maxConnections {n}"));
        }
        if let Some(x) = t.connect_timeout {
            parts.push(format!("tcp.connectTimeout {}", d(x)));
        }
        if let Some(x) = t.idle_timeout {
            parts.push(format!("tcp.idleTimeout {}", d(x)));
        }
    }
    if let Some(h) = &c.http {
        if let Some(n) = h.http1_max_pending_requests {
            parts.push(format!("http.http1MaxPendingRequests {n}"));
        }
        if let Some(n) = h.http2_max_requests {
            parts.push(format!("http.http2MaxRequests {n}"));
        }
        if let Some(n) = h.max_requests_per_connection {
            parts.push(format!("http.maxRequestsPerConnection {n}"));
        }
        if let Some(n) = h.max_retries {
            parts.push(format!("http.maxRetries {n}"));
        }
        if let Some(x) = h.idle_timeout {
            parts.push(format!("http.idleTimeout {}", d(x)));
        }
        if h.use_client_protocol {
            parts.push("http.useClientProtocol true".into());
        }
    }
    if parts.is_empty() { "set, every field at its default".into() } else { parts.join(", ") }
}

fn rule_origin(r: &DestinationRule, client_ns: &str, svc_ns: &str) -> &'static str {
    if r.namespace == client_ns {
        "client namespace"
    } else if r.namespace == svc_ns {
        "service namespace"
    } else if r.namespace == root_namespace() {
        "root namespace"
    } else {
        "other"
    }
}

#[allow(clippy::too_many_arguments)]
fn upstream(state: &AdminState, cluster: &Cluster, svc: &Service, port: u16, subset: Option<&str>, source: &Pod, identity: &Identity, rule: Option<&DestinationRule>) -> Value {
    let key = DestinationKey::new(svc, port, subset);
    let name = key.to_string();
    // What the first request would build (or the cluster already in use).
    let dest = match state.proxy.destinations.resolve(cluster, &key, Some(&source.namespace), false) {
        Ok(d) => d,
        Err(e) => return json!({"cluster": name, "subset": subset, "error": e.to_string()}),
    };
    let from_rule = |set: bool| match (set, rule) {
        (true, Some(r)) => format!("DestinationRule {}/{}", r.namespace, r.name),
        _ => "Istio default".to_string(),
    };
    let p = &dest.policy;
    let outlier = p.outlier_detection.clone().unwrap_or_default();
    let policy = json!({
        "load_balancer": {
            "value": match &p.load_balancer { Some(lb) => routes::lb_name(&lb.policy), None => "LEAST_REQUEST".into() },
            "origin": from_rule(p.load_balancer.is_some()),
        },
        "outlier_detection": {
            "value": if p.outlier_detection.is_some() { routes::outlier_summary(&outlier) } else { json!("off (Istio enables it only when a DestinationRule sets it)") },
            "origin": from_rule(p.outlier_detection.is_some()),
            "defaults": p.outlier_detection.is_some().then(|| json!({
                "interval": format!("{}s", OutlierDetection::DEFAULT_INTERVAL.as_secs_f64()),
                "base_ejection_time": format!("{}s", OutlierDetection::DEFAULT_BASE_EJECTION_TIME.as_secs_f64()),
            })),
        },
        "connection_pool": {
            "value": p.connection_pool.as_ref().map_or_else(|| json!("unlimited (Istio default)"), |c| json!(pool_summary(c))),
            "origin": from_rule(p.connection_pool.is_some()),
        },
    });
    let live = serde_json::to_value(dest.balancer.snapshot()).unwrap_or_default();
    let endpoints: Vec<Value> = dest
        .endpoints
        .iter()
        .map(|e| {
            let state = live["endpoints"].as_array().into_iter().flatten().find(|l| l["addr"] == json!(e.addr)).map(services::live_endpoint);
            let pod = cluster.pod(&e.pod_namespace, &e.pod_name);
            let (mtls, authz) = match pod {
                Some(pod) => {
                    let policies: Vec<String> = cluster.authorization_policies_for(pod).iter().map(|p| p.id()).collect();
                    let decision = crate::l4::authz::check(cluster, pod, Some(identity), source.ip, e.addr.port());
                    let decision = match decision {
                        crate::l4::authz::Decision::Allow => json!("allow"),
                        crate::l4::authz::Decision::Deny { reason, .. } => json!(format!("deny: {reason}")),
                    };
                    (json!(format!("{:?}", cluster.mtls_mode_for(pod, e.addr.port())).to_uppercase()), json!({"policies": policies, "decision": decision}))
                }
                None => (json!("n/a (not a mesh pod)"), json!(null)),
            };
            json!({
                "addr": e.addr,
                "pod": format!("{}/{}", e.pod_namespace, e.pod_name),
                "node": e.node,
                "ready": e.conditions.ready,
                "health": state.as_ref().map_or(json!("healthy"), |s| s["health"].clone()),
                "ejection_remaining_ms": state.as_ref().map_or(json!(null), |s| s["ejection_remaining_ms"].clone()),
                "active": state.as_ref().map_or(json!(0), |s| s["active"].clone()),
                "peer_authentication": mtls,
                "authorization": authz,
            })
        })
        .collect();
    json!({"cluster": name, "subset": subset, "rule": dest.rule, "policy": policy, "endpoints": endpoints})
}
