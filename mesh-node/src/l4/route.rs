//! Where a captured TCP connection goes: a Service port (through the VirtualService `tcp`
//! routes, if any) to an upstream cluster, or straight to a mesh pod addressed by its IP.
use std::net::SocketAddr;

use crate::{
    config::{Cluster, Endpoint, Pod, RouteDestination, Service, VirtualService, labels_match},
    destination::DestinationKey,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("{0} is neither a Service VIP nor a pod in the mesh")]
    UnknownDestination(SocketAddr),
    #[error("Service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("no tcp route of the VirtualServices for {service} matches port {port}")]
    NoMatch { service: String, port: u16 },
    #[error("tcp route destination {host:?} is not a Service")]
    UnknownHost { host: String },
}

/// Where one connection goes.
#[derive(Debug, Clone)]
pub enum TcpTarget {
    /// An upstream cluster, balanced by its DestinationRule.
    Cluster(DestinationKey),
    /// A mesh pod addressed directly.
    Pod(Endpoint),
}

pub fn route(cluster: &Cluster, orig: SocketAddr, source: Option<&Pod>) -> Result<TcpTarget, RouteError> {
    if let Some(svc) = cluster.service_by_vip(orig.ip()) {
        let service = format!("{}/{}", svc.namespace, svc.name);
        if svc.port(orig.port()).is_none() {
            return Err(RouteError::NoServicePort { service, port: orig.port() });
        }
        return tcp_route(cluster, svc, orig.port(), source).map(TcpTarget::Cluster);
    }
    if let Some(pod) = cluster.pod_by_ip(orig.ip()) {
        return Ok(TcpTarget::Pod(Endpoint::of_pod(pod, orig)));
    }
    Err(RouteError::UnknownDestination(orig))
}

/// The first matching `tcp` route of the Service's VirtualServices picks a weighted
/// destination; without any `tcp` route the connection goes to the Service port itself.
fn tcp_route(cluster: &Cluster, svc: &Service, port: u16, source: Option<&Pod>) -> Result<DestinationKey, RouteError> {
    let virtual_services = cluster.virtual_services_for(svc, source.map(|p| p.namespace.as_str()));
    let routes: Vec<(&VirtualService, &crate::config::TcpRoute)> =
        virtual_services.iter().flat_map(|vs| vs.tcp.iter().map(move |r| (*vs, r))).collect();
    if routes.is_empty() {
        return Ok(DestinationKey::new(svc, port, None));
    }
    let matched = routes.iter().find(|(_, r)| {
        r.matches.is_empty()
            || r.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == port)
                    && (m.source_labels.is_empty() || source.is_some_and(|p| labels_match(&m.source_labels, &p.labels)))
                    && m.source_namespace.as_ref().is_none_or(|ns| source.is_some_and(|p| &p.namespace == ns))
            })
    });
    let Some((vs, route)) = matched else {
        return Err(RouteError::NoMatch { service: format!("{}/{}", svc.namespace, svc.name), port });
    };
    let chosen = weighted(&route.route).ok_or_else(|| RouteError::NoMatch { service: svc.name.clone(), port })?;
    let dest = &chosen.destination;
    let target = cluster.service_by_host(&dest.host, &vs.namespace).ok_or_else(|| RouteError::UnknownHost { host: dest.host.clone() })?;
    let target_port = dest.port.unwrap_or(if std::ptr::eq(target, svc) { port } else { target.ports.first().map_or(port, |p| p.port) });
    Ok(DestinationKey::new(target, target_port, dest.subset.as_deref()))
}

fn weighted(routes: &[RouteDestination]) -> Option<&RouteDestination> {
    let weights = crate::config::effective_weights(routes.iter().map(|r| r.weight));
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return routes.first();
    }
    let mut roll = fastrand::u32(0..total);
    for (r, w) in routes.iter().zip(&weights) {
        if roll < *w {
            return Some(r);
        }
        roll -= w;
    }
    routes.last()
}
