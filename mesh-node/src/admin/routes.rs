//! `/routes`: per Service, the VirtualService routes in the order the proxy tries them, and a
//! summary of the DestinationRule policy that applies.
use std::time::Duration;

use serde_json::{Value, json};

use super::{AdminState, services::find_service};
use crate::config::{
    Cluster, DestinationRule, HashAlgorithm, HashKey, HttpMatch, HttpRoute, LbPolicy, OutlierDetection, Service,
    SimpleLb, StringMatch, TcpRoute, TrafficPolicy,
};

pub fn routes(state: &AdminState, service: Option<&str>) -> Result<Value, String> {
    let cluster = state.proxy.cluster();
    let services: Vec<&Service> = match service {
        Some(spec) => vec![find_service(&cluster, spec)?],
        None => cluster.services().collect(),
    };
    Ok(json!({"services": services.into_iter().map(|s| service_routes(&cluster, s)).collect::<Vec<_>>()}))
}

fn service_routes(cluster: &Cluster, svc: &Service) -> Value {
    let mut http = Vec::new();
    let mut tcp = Vec::new();
    for vs in cluster.virtual_services_for(svc, None) {
        let source = format!("{}/{}", vs.namespace, vs.name);
        http.extend(vs.http.iter().map(|r| http_route(&source, r)));
        tcp.extend(vs.tcp.iter().map(|r| tcp_route(&source, r)));
    }
    json!({
        "service": format!("{}/{}", svc.namespace, svc.name),
        // With no VirtualService every request goes to the Service itself, balanced by the
        // DestinationRule policy.
        "http": http,
        "tcp": tcp,
        "destination_rule": cluster.destination_rule_for(svc, None).map(rule_summary),
    })
}

pub(super) fn http_route(source: &str, r: &HttpRoute) -> Value {
    json!({
        "virtual_service": source,
        "name": r.name,
        "match": r.matches.iter().map(http_match).collect::<Vec<_>>(),
        "route": r.route.iter().map(|d| json!({
            "host": d.destination.host, "subset": d.destination.subset, "port": d.destination.port,
            "weight": d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
        })).collect::<Vec<_>>(),
        "redirect": r.redirect.as_ref().map(|x| format!("{x:?}")),
        "rewrite": r.rewrite.as_ref().map(|x| json!({"uri": x.uri, "authority": x.authority})),
        "timeout": r.timeout.map(secs),
        "retries": r.retries.as_ref().map(|x| json!({
            "attempts": x.attempts,
            "per_try_timeout": x.per_try_timeout.map(secs),
            "retry_on": x.retry_on.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })),
        "fault": r.fault.as_ref().map(|f| json!({
            "delay": f.delay.as_ref().map(|d| json!({"percentage": d.percentage, "fixed_delay": secs(d.fixed_delay)})),
            "abort": f.abort.as_ref().map(|a| json!({"percentage": a.percentage, "status": format!("{:?}", a.status)})),
        })),
    })
}

/// One match block as a list of `field op value` conditions, all of which must hold.
fn http_match(m: &HttpMatch) -> Value {
    let mut conds = Vec::new();
    let mut push = |field: String, sm: &StringMatch| conds.push(format!("{field} {}", string_match(sm)));
    if let Some(u) = &m.uri {
        push("uri".into(), u);
    }
    if let Some(x) = &m.method {
        push("method".into(), x);
    }
    if let Some(x) = &m.scheme {
        push("scheme".into(), x);
    }
    if let Some(x) = &m.authority {
        push("authority".into(), x);
    }
    for (k, v) in &m.headers {
        push(format!("header[{k}]"), v);
    }
    for (k, v) in &m.query_params {
        push(format!("query[{k}]"), v);
    }
    for (k, v) in &m.without_headers {
        conds.push(format!("not header[{k}] {}", string_match(v)));
    }
    if let Some(p) = m.port {
        conds.push(format!("port = {p}"));
    }
    for (k, v) in &m.source_labels {
        conds.push(format!("source label {k} = {v}"));
    }
    if let Some(ns) = &m.source_namespace {
        conds.push(format!("source namespace = {ns}"));
    }
    json!({"name": m.name, "conditions": conds, "ignore_uri_case": m.ignore_uri_case})
}

fn string_match(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(s) => format!("= {s:?}"),
        StringMatch::Prefix(s) => format!("prefix {s:?}"),
        StringMatch::Regex(p) => format!("~ /{}/", p.as_str()),
        StringMatch::Present => "present".into(),
    }
}

pub(super) fn tcp_route(source: &str, r: &TcpRoute) -> Value {
    json!({
        "virtual_service": source,
        "match": r.matches.iter().map(|m| json!({
            "port": m.port, "source_labels": m.source_labels, "source_namespace": m.source_namespace,
        })).collect::<Vec<_>>(),
        "route": r.route.iter().map(|d| json!({
            "host": d.destination.host, "subset": d.destination.subset, "port": d.destination.port,
            "weight": d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
        })).collect::<Vec<_>>(),
    })
}

fn rule_summary(r: &DestinationRule) -> Value {
    json!({
        "name": format!("{}/{}", r.namespace, r.name),
        "host": r.host,
        "policy": r.traffic_policy.as_ref().map(policy_summary),
        "subsets": r.subsets.iter().map(|s| json!({
            "name": s.name, "labels": s.labels, "policy": s.traffic_policy.as_ref().map(policy_summary),
        })).collect::<Vec<_>>(),
    })
}

fn policy_summary(p: &TrafficPolicy) -> Value {
    json!({
        "load_balancer": p.load_balancer.as_ref().map(|lb| lb_name(&lb.policy)),
        "outlier_detection": p.outlier_detection.as_ref().map(outlier_summary),
        "connection_pool": p.connection_pool.as_ref().map(|c| format!("{c:?}")),
        "tls": p.tls.as_ref().map(|t| format!("{:?}", t.mode)),
        "port_level": p.port_level_settings.iter().map(|s| json!({
            "port": s.port,
            "load_balancer": s.load_balancer.as_ref().map(|lb| lb_name(&lb.policy)),
            "outlier_detection": s.outlier_detection.as_ref().map(outlier_summary),
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn lb_name(p: &LbPolicy) -> String {
    match p {
        LbPolicy::Simple(SimpleLb::Unspecified) => "LEAST_REQUEST (default)".into(),
        LbPolicy::Simple(SimpleLb::RoundRobin) => "ROUND_ROBIN".into(),
        LbPolicy::Simple(SimpleLb::LeastRequest) => "LEAST_REQUEST".into(),
        LbPolicy::Simple(SimpleLb::Random) => "RANDOM".into(),
        LbPolicy::Simple(SimpleLb::Passthrough) => "PASSTHROUGH".into(),
        LbPolicy::ConsistentHash(ch) => {
            let key = match &ch.key {
                HashKey::HttpHeaderName(h) => format!("header {h}"),
                HashKey::HttpCookie { name, .. } => format!("cookie {name}"),
                HashKey::UseSourceIp => "source IP".into(),
                HashKey::HttpQueryParameterName(q) => format!("query {q}"),
            };
            let algo = match ch.algorithm {
                Some(HashAlgorithm::Maglev { .. }) => "MAGLEV",
                _ => "RING_HASH",
            };
            format!("{algo} on {key}")
        }
    }
}

/// With Istio's defaults filled in, since that is what the balancer runs with.
pub(super) fn outlier_summary(o: &OutlierDetection) -> Value {
    json!({
        "consecutive_5xx_errors": o.consecutive_5xx_errors.unwrap_or(OutlierDetection::DEFAULT_CONSECUTIVE_5XX),
        "consecutive_gateway_errors": o.consecutive_gateway_errors,
        "consecutive_local_origin_failures": o.consecutive_local_origin_failures,
        "interval": secs(o.interval.unwrap_or(OutlierDetection::DEFAULT_INTERVAL)),
        "base_ejection_time": secs(o.base_ejection_time.unwrap_or(OutlierDetection::DEFAULT_BASE_EJECTION_TIME)),
        "max_ejection_percent": o.max_ejection_percent.unwrap_or(OutlierDetection::DEFAULT_MAX_EJECTION_PERCENT),
        "min_health_percent": o.min_health_percent.unwrap_or(0),
    })
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}
