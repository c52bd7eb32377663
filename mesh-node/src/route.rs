//! Where a captured connection goes: original destination -> Service port -> endpoints, or
//! straight to a mesh pod.
use std::net::SocketAddr;

use crate::config::{Cluster, Endpoint};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{0} is neither a Service VIP nor a pod in the mesh")]
    UnknownDestination(SocketAddr),
    #[error("Service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("Service {service} port {port} has no endpoints")]
    NoEndpoints { service: String, port: u16 },
}

/// The candidates for one connection, before balancing.
#[derive(Debug, Clone)]
pub struct Route {
    /// Balancer key and log label: `svc.ns:port` for Services, the pod address otherwise.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
}

pub fn route(cluster: &Cluster, orig: SocketAddr) -> Result<Route, RouteError> {
    if let Some(svc) = cluster.service_by_vip(orig.ip()) {
        let service = format!("{}.{}", svc.name, svc.namespace);
        if svc.port(orig.port()).is_none() {
            return Err(RouteError::NoServicePort { service, port: orig.port() });
        }
        let endpoints = cluster.endpoints(svc, orig.port());
        if endpoints.is_empty() {
            return Err(RouteError::NoEndpoints { service, port: orig.port() });
        }
        return Ok(Route { name: format!("{service}:{}", orig.port()), endpoints });
    }
    if let Some(pod) = cluster.pod_by_ip(orig.ip()) {
        let endpoint = Endpoint {
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            node: pod.node.clone(),
            addr: orig,
        };
        return Ok(Route { name: orig.to_string(), endpoints: vec![endpoint] });
    }
    Err(RouteError::UnknownDestination(orig))
}
