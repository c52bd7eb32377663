//! `/services` (what each Service is to the proxy) and `/endpoints` (each endpoint's health as
//! the balancers see it).
use serde_json::{Value, json};

use super::AdminState;
use crate::{
    config::{Cluster, Service, TargetPort},
    protocol::{self, Protocol},
};

pub fn services(state: &AdminState) -> Value {
    let cluster = state.proxy.cluster();
    let list: Vec<Value> = cluster
        .services()
        .map(|svc| {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .map(|p| {
                    json!({
                        "port": p.port,
                        "name": p.name,
                        "target_port": match &p.target_port {
                            TargetPort::Number(n) => json!(n),
                            TargetPort::Name(n) => json!(n),
                        },
                        "protocol": protocol_name(protocol::for_port(p)),
                        "endpoints": cluster.endpoints(svc, p.port).len(),
                        "ready_endpoints": cluster.endpoints(svc, p.port).iter().filter(|e| e.conditions.ready).count(),
                    })
                })
                .collect();
            json!({
                "namespace": svc.namespace,
                "name": svc.name,
                "vips": svc.cluster_ips,
                "ports": ports,
                "destination_rule": cluster.destination_rule_for(svc, None).map(|r| format!("{}/{}", r.namespace, r.name)),
                "virtual_services": cluster.virtual_services_for(svc, None).iter().map(|v| format!("{}/{}", v.namespace, v.name)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"services": list})
}

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "http",
        Protocol::Tcp => "tcp",
        Protocol::Detect => "detect",
    }
}

/// Finds a Service by `namespace/name`, its FQDN, or a bare name that only one namespace has.
pub fn find_service<'a>(cluster: &'a Cluster, spec: &str) -> Result<&'a Service, String> {
    if let Some((ns, name)) = spec.split_once('/') {
        return cluster.service(ns, name).ok_or_else(|| format!("no Service {ns}/{name}"));
    }
    if let Some(svc) = cluster.services().find(|s| s.fqdn() == spec || format!("{}.{}", s.name, s.namespace) == spec) {
        return Ok(svc);
    }
    let matches: Vec<&Service> = cluster.services().filter(|s| s.name == spec).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(format!("no Service named {spec:?} in any namespace")),
        many => Err(format!(
            "Service {spec:?} exists in several namespaces ({}); say NAMESPACE/NAME",
            many.iter().map(|s| s.namespace.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Every upstream cluster of the Service: the balancers that exist (with live health), and, for
/// ports no request has used yet, the endpoints the config gives (healthy by definition).
pub fn endpoints(state: &AdminState, spec: &str) -> Result<Value, String> {
    let cluster = state.proxy.cluster();
    let svc = find_service(&cluster, spec)?;
    let fqdn = svc.fqdn();
    let live = state.proxy.destinations.snapshot();
    let mut clusters = Vec::new();
    for port in &svc.ports {
        let mut resolved = false;
        for (name, snap) in live.as_object().into_iter().flatten() {
            // Envoy-style names: outbound|PORT|SUBSET|FQDN.
            let parts: Vec<&str> = name.split('|').collect();
            if parts.len() != 4 || parts[3] != fqdn || parts[1] != port.port.to_string() {
                continue;
            }
            resolved = true;
            clusters.push(json!({
                "cluster": name,
                "port": port.port,
                "subset": (!parts[2].is_empty()).then(|| parts[2]),
                "resolved": true,
                "policy": snap["policy"],
                "outlier_detection": snap["outlier_detection"],
                "panic": snap["panic"],
                "endpoints": snap["endpoints"].as_array().into_iter().flatten().map(live_endpoint).collect::<Vec<_>>(),
            }));
        }
        if !resolved {
            // What a balancer would be given: the endpoints that take new work.
            let eps: Vec<Value> = crate::config::usable(cluster.endpoints(svc, port.port))
                .into_iter()
                .map(|e| {
                    json!({
                        "addr": e.addr, "pod": format!("{}/{}", e.pod_namespace, e.pod_name), "node": e.node,
                        "health": "healthy", "ejection_remaining_ms": null, "active": 0,
                        "times_ejected": 0, "consecutive_5xx": 0, "consecutive_gateway_errors": 0,
                        "consecutive_local_origin_failures": 0,
                    })
                })
                .collect();
            clusters.push(json!({
                "cluster": format!("outbound|{}||{fqdn}", port.port),
                "port": port.port,
                "subset": null,
                // No request has gone to this port yet, so there is no balancer state.
                "resolved": false,
                "endpoints": eps,
            }));
        }
    }
    Ok(json!({"service": format!("{}/{}", svc.namespace, svc.name), "clusters": clusters}))
}

pub(super) fn live_endpoint(e: &Value) -> Value {
    let ejected = e["ejected"].as_bool().unwrap_or(false);
    json!({
        "addr": e["addr"], "pod": e["pod"], "node": e["node"],
        "health": if ejected { "ejected" } else { "healthy" },
        "ejection_remaining_ms": e["ejection_remaining_ms"],
        "active": e["active"],
        "times_ejected": e["times_ejected"],
        "consecutive_5xx": e["consecutive_5xx"],
        "consecutive_gateway_errors": e["consecutive_gateway_errors"],
        "consecutive_local_origin_failures": e["consecutive_local_origin_failures"],
    })
}
