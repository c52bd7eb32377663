//! The far end of a connection: a local mesh pod, another node's proxy (a tunnel), or a
//! destination outside the mesh.
use std::{io, net::SocketAddr, time::Duration};

use tokio::{io::{AsyncRead, AsyncWrite}, net::TcpStream};

pub use super::{
    dial::{connect, reset},
    pipe::pipe,
};

/// An upstream byte stream: a direct connection to a local pod, or a tunnel through another
/// node's proxy.
pub enum UpstreamIo {
    /// A destination outside the mesh.
    Direct(TcpStream),
    /// A mesh pod on this node, registered so that a policy change can close it.
    Pod(super::admitted::Registered),
    Tunnel(super::tunnel::Tunnel),
}

impl UpstreamIo {
    /// For a tunnel: becomes `true` once the far node proxy is draining (see
    /// [`super::tunnel::Tunnel::goaway`]); pools should not reuse a connection riding it.
    pub fn tunnel_goaway(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        match self {
            UpstreamIo::Direct(_) | UpstreamIo::Pod(_) => None,
            UpstreamIo::Tunnel(t) => Some(t.goaway()),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Pod(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Pod(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[io::IoSlice<'_>]) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Pod(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_write_vectored(cx, bufs),
        }
    }

    /// hyper and h2 hand headers and body (frame headers and payloads) over in one vectored
    /// write when the stream says it takes them; a stream that does not gets them one by one.
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Direct(s) => s.is_write_vectored(),
            UpstreamIo::Pod(s) => s.is_write_vectored(),
            UpstreamIo::Tunnel(s) => s.io.is_write_vectored(),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Pod(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Pod(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_shutdown(cx),
        }
    }
}

/// Failure to reach an endpoint, directly or through its node's proxy.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Direct { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tunnel(#[from] super::tunnel::TunnelError),
    #[error("endpoint {addr} is on node {node}, which the config does not define")]
    UnknownNode { addr: SocketAddr, node: String },
    #[error("connection from {source_ip} to {addr} refused: {reason}")]
    Denied { addr: SocketAddr, source_ip: std::net::IpAddr, reason: String },
}

/// Who opens a connection: the calling pod's address and, when known, its identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    pub ip: std::net::IpAddr,
    pub identity: Option<crate::identity::Identity>,
}

impl Source {
    /// The caller at `ip`, with the identity of the pod that has that address.
    pub fn of(cluster: &crate::config::Cluster, ip: std::net::IpAddr, trust_domain: &str) -> Self {
        let identity = cluster.pod_by_ip(ip).map(|p| crate::identity::Identity::new(trust_domain, &p.namespace, &p.service_account));
        Self { ip, identity }
    }
}

/// How this node reaches endpoints: mesh pods on this node directly (after checking their
/// AuthorizationPolicies), mesh pods on other nodes through their node's proxy, and anything
/// outside the mesh (unenrolled or host-network pods, node addresses, the API server,
/// hand-managed endpoints) directly as plain TCP from this node, as ambient's passthrough does:
/// no proxy on the far side would terminate a tunnel for it.
#[derive(Clone)]
pub struct Connector {
    pub node: String,
    pub inbound_port: u16,
    pub config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Cluster>>,
    pub tunnels: std::sync::Arc<super::tunnel::TunnelPool>,
    pub trust_domain: String,
    /// Connections admitted to this node's pods, re-judged on each policy change.
    pub admitted: super::admitted::Admitted,
}

impl Connector {
    pub async fn connect(&self, endpoint: &crate::config::Endpoint, source: &Source, timeout: Duration) -> Result<UpstreamIo, ConnectError> {
        let cluster = self.config.borrow().clone();
        let addr = endpoint.addr;
        let direct = || async move { connect(addr, timeout).await.map_err(|source| ConnectError::Direct { addr, source }) };
        let Some(pod) = cluster.pod_by_ip(addr.ip()).filter(|p| cluster.is_enrolled(p)) else {
            return Ok(UpstreamIo::Direct(direct().await?));
        };
        if pod.node == self.node {
            if let crate::authz::Decision::Deny { reason, .. } = crate::authz::check(&cluster, pod, source.identity.as_ref(), source.ip, addr.port()) {
                tracing::warn!(source = %source.ip, principal = ?source.identity.as_ref().map(|i| i.to_string()), target = %addr, "authorization: {reason}");
                return Err(ConnectError::Denied { addr, source_ip: source.ip, reason });
            }
            let stream = direct().await?;
            let admission = super::admitted::Admission { source_id: source.identity.clone(), source_ip: source.ip.into(), target: addr };
            let stream = self.admitted.register(stream, admission.clone());
            let latest = self.config.borrow().clone();
            if let Err(reason) = super::admitted::Admitted::recheck(&cluster, &latest, &admission) {
                return Err(ConnectError::Denied { addr, source_ip: source.ip, reason });
            }
            return Ok(UpstreamIo::Pod(stream));
        }
        let Some(node_ip) = cluster.node(&pod.node).map(|n| n.ip) else {
            return Err(ConnectError::UnknownNode { addr, node: pod.node.clone() });
        };
        let ids = source.identity.as_ref().map(|src| super::tunnel::TunnelIdentities {
            source: src.clone(),
            destination: crate::identity::Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account),
        });
        let proxy = SocketAddr::new(node_ip, self.inbound_port);
        Ok(UpstreamIo::Tunnel(self.tunnels.open(proxy, addr, ids, Some(source.ip), timeout).await?))
    }
}
