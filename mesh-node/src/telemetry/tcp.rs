//! One TCP connection's telemetry: Istio's TCP metrics (opened, bytes as they flow, closed),
//! the live-connections entry, and an access log line when it closes.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use super::{
    Telemetry,
    access_log::{AccessEntry, rfc3339},
    connections::{ConnectionInfo, Counted, LiveGuard},
    metrics::{Peering, Reporter, Security, TcpSeries},
    workload::{ServiceLabels, Workload},
};
use crate::{config::Cluster, flags::ResponseFlags, identity::Identity};

/// Where a TCP connection goes.
pub struct TcpRoute<'a> {
    /// (namespace, name) of the Service the client connected to, if any.
    pub service: Option<(&'a str, &'a str)>,
    pub upstream: SocketAddr,
    /// Envoy's cluster name, for the access log.
    pub cluster: Option<String>,
}

/// A proxied TCP connection, from the upstream connect to the close.
pub struct TcpConnection {
    telemetry: Arc<Telemetry>,
    reporter: Reporter,
    series: Vec<TcpSeries>,
    live: LiveGuard,
    start: Instant,
    start_wall: SystemTime,
    peer: SocketAddr,
    source: Arc<Workload>,
    destination: Arc<Workload>,
    upstream: SocketAddr,
    cluster: Option<String>,
    flags: ResponseFlags,
}

impl Telemetry {
    /// A connection captured from a pod on this node to `route.upstream`; `flags` are set when
    /// the upstream could not be reached (the connection then closes at once).
    pub fn outbound_tcp(self: &Arc<Self>, cluster: &Cluster, peer: SocketAddr, route: TcpRoute, flags: ResponseFlags) -> TcpConnection {
        let peers = self.workloads.get(cluster);
        let source = peers.workload(peer.ip()).clone();
        let destination = peers.workload(route.upstream.ip()).clone();
        let service = route.service.map_or_else(|| peers.unknown_service().clone(), |(ns, name)| peers.service(ns, name).clone());
        let security = Security::toward(&destination, &self.node, self.mtls);
        let mut reporters = vec![Reporter::Source];
        // Same node and in the mesh: this proxy is the destination's too.
        if destination.in_mesh && destination.node == self.node {
            reporters.push(Reporter::Destination);
        }
        let info = ConnectionInfo {
            direction: "outbound",
            protocol: "tcp",
            peer,
            source_workload: format!("{}/{}", source.namespace, source.name),
            source_principal: Some(source.principal.clone()).filter(|p| p != super::workload::UNKNOWN),
            destination_service: Some(service.fqdn.clone()).filter(|s| s != super::workload::UNKNOWN),
            destination: Some(format!("{}/{}", destination.namespace, destination.pod)),
            upstream: Some(route.upstream.to_string()),
        };
        self.open_tcp(info, &reporters, source, destination, &service, security, route, flags, peer)
    }

    /// A tunnel stream from another node's proxy to `target`, a pod on this node. The source
    /// pod is the one the tunnel names (`forwarded`), trusted only when its identity is the
    /// one the peer's certificate proved.
    pub fn inbound_tcp(self: &Arc<Self>, cluster: &Cluster, peer: SocketAddr, forwarded: Option<IpAddr>, peer_identity: Option<&Identity>, target: SocketAddr) -> TcpConnection {
        let peers = self.workloads.get(cluster);
        let security = if peer_identity.is_some() { Security::MutualTls } else { Security::None };
        let source = forwarded
            .and_then(|ip| peers.find(ip))
            .filter(|w| peer_identity.is_none_or(|id| w.principal == id.to_string()))
            .cloned()
            .unwrap_or_else(|| match peer_identity {
                // Unknown pod but a proven identity: report what is known.
                Some(id) => Arc::new(Workload { principal: id.to_string(), namespace: id.namespace.clone(), ..Workload::unknown() }),
                None => peers.unknown().clone(),
            });
        let destination = peers.workload(target.ip()).clone();
        let service = cluster
            .pod_by_ip(target.ip())
            .and_then(|pod| cluster.services().find(|s| s.selects(pod) && s.ports.iter().any(|p| pod.resolve_target_port(&p.target_port) == Some(target.port()))))
            .map_or_else(|| peers.unknown_service().clone(), |s| peers.service(&s.namespace, &s.name).clone());
        let info = ConnectionInfo {
            direction: "inbound",
            protocol: "hbone",
            peer,
            source_workload: format!("{}/{}", source.namespace, source.name),
            source_principal: peer_identity.map(|i| i.to_string()),
            destination_service: Some(service.fqdn.clone()).filter(|s| s != super::workload::UNKNOWN),
            destination: Some(format!("{}/{}", destination.namespace, destination.pod)),
            upstream: Some(target.to_string()),
        };
        let route = TcpRoute { service: None, upstream: target, cluster: Some("inbound".into()) };
        self.open_tcp(info, &[Reporter::Destination], source, destination, &service, security, route, ResponseFlags::NONE, peer)
    }

    #[allow(clippy::too_many_arguments)]
    fn open_tcp(
        self: &Arc<Self>,
        info: ConnectionInfo,
        reporters: &[Reporter],
        source: Arc<Workload>,
        destination: Arc<Workload>,
        service: &ServiceLabels,
        security: Security,
        route: TcpRoute,
        flags: ResponseFlags,
        peer: SocketAddr,
    ) -> TcpConnection {
        let flag_str = flags.to_string();
        let series = match &self.metrics {
            Some(m) => reporters
                .iter()
                .map(|r| m.open_tcp(&Peering { reporter: *r, source: &source, destination: &destination, service, security }, &flag_str))
                .collect(),
            None => Vec::new(),
        };
        TcpConnection {
            telemetry: self.clone(),
            reporter: reporters[0],
            series,
            live: self.connections.register(info),
            start: Instant::now(),
            start_wall: SystemTime::now(),
            peer,
            source,
            destination,
            upstream: route.upstream,
            cluster: route.cluster,
            flags,
        }
    }
}

impl TcpConnection {
    /// The downstream side of the connection, counting its bytes into this connection.
    pub fn wrap<S>(&self, stream: S) -> Counted<S> {
        Counted::new(stream, Some(self.live.bytes().clone()), self.series.clone())
    }
}

impl Drop for TcpConnection {
    fn drop(&mut self) {
        for s in &self.series {
            s.close();
        }
        let t = &self.telemetry;
        if !t.access_log.enabled() {
            return;
        }
        let bytes = self.live.bytes();
        t.access_log.write(&AccessEntry {
            start_time: rfc3339(self.start_wall),
            method: None,
            path: None,
            protocol: "tcp",
            response_code: 0,
            response_flags: &self.flags.to_string(),
            bytes_received: bytes.received.load(Ordering::Relaxed),
            bytes_sent: bytes.sent.load(Ordering::Relaxed),
            duration: self.start.elapsed().as_millis() as u64,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: Some(self.upstream.to_string()),
            upstream_cluster: self.cluster.as_deref(),
            downstream_remote_address: self.peer.to_string(),
            source_workload: format!("{}/{}", self.source.namespace, self.source.name),
            source_principal: &self.source.principal,
            destination_workload: format!("{}/{}", self.destination.namespace, self.destination.name),
            destination_principal: &self.destination.principal,
            reporter: match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            trace_id: None,
        });
    }
}
