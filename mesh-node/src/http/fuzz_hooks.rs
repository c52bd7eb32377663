//! The request-head half of the outbound proxy path (route selection, redirect, rewrite, hop
//! headers), callable without a running proxy: the HTTP/1 fuzz target (`fuzz/`) feeds it
//! what hyper parsed from arbitrary bytes. Not an API.

use http::request::Parts;

use super::router::{RequestInfo, Selected};
use super::{actions, grpc, headers, router};
use crate::config::Cluster;

/// Runs what the proxy does to a request head before picking an endpoint, for a request to
/// `namespace/service:port`; returns the status of a local reply, if one is made.
pub fn request_head(cluster: &Cluster, namespace: &str, service: &str, port: u16, parts: &mut Parts) -> Option<u16> {
    let svc = cluster.service(namespace, service)?;
    let _ = headers::is_upgrade(&parts.headers);
    let _ = grpc::is_grpc_request(&parts.headers);
    let source = cluster.pods().next();
    let virtual_services = cluster.virtual_services_for(svc, source.map(|p| p.namespace.as_str()));
    let route = match router::select(&virtual_services, &RequestInfo { parts, port, source }) {
        Selected::Route { route, .. } => route,
        Selected::Default => return None,
        Selected::NoMatch => return Some(404),
    };
    if let Some(redirect) = &route.redirect {
        return Some(actions::redirect_reply(redirect, parts).status().as_u16());
    }
    if let Some(rewrite) = &route.rewrite {
        actions::apply_rewrite(rewrite, route, parts);
    }
    if let Some(ops) = &route.headers {
        headers::apply(&ops.request, &mut parts.headers);
    }
    headers::strip_hop_by_hop(&mut parts.headers, false);
    None
}
