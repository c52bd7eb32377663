//! Connections the proxy opens itself, and the byte pump between two connections.
use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
};

/// Opens a TCP connection marked as the proxy's own, so the capture never redirects it.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket2::SockRef::from(&sock).set_mark(mesh_common::PROXY_MARK)?;
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {addr} timed out after {timeout:?}"))),
    }
}

/// Copies both ways until both sides are done. When one side half-closes, the other side's
/// write half is shut down and the reverse direction keeps flowing.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, 64 * 1024, 64 * 1024).await
}

/// Closes a client connection with a reset, so a refused connection fails at once instead of
/// looking like an empty response.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// An upstream byte stream: a direct connection to a local pod, or a tunnel through another
/// node's proxy.
pub enum UpstreamIo {
    Direct(TcpStream),
    Tunnel(crate::tunnel::Tunnel),
}

impl UpstreamIo {
    /// For a tunnel: becomes `true` once the far node proxy is draining (see
    /// [`crate::tunnel::Tunnel::goaway`]); pools should not reuse a connection riding it.
    pub fn tunnel_goaway(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        match self {
            UpstreamIo::Direct(_) => None,
            UpstreamIo::Tunnel(t) => Some(t.goaway()),
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => std::pin::Pin::new(&mut s.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Direct(s) => std::pin::Pin::new(s).poll_shutdown(cx),
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
    Tunnel(#[from] crate::tunnel::TunnelError),
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
    pub tunnels: std::sync::Arc<crate::tunnel::TunnelPool>,
    pub trust_domain: String,
}

impl Connector {
    pub async fn connect(&self, endpoint: &crate::config::Endpoint, source: &Source, timeout: Duration) -> Result<UpstreamIo, ConnectError> {
        let cluster = self.config.borrow().clone();
        let addr = endpoint.addr;
        let direct = || async move { connect(addr, timeout).await.map(UpstreamIo::Direct).map_err(|source| ConnectError::Direct { addr, source }) };
        let Some(pod) = cluster.pod_by_ip(addr.ip()).filter(|p| cluster.is_enrolled(p)) else {
            return direct().await;
        };
        if pod.node == self.node {
            if let crate::authz::Decision::Deny { reason, .. } = crate::authz::check(&cluster, pod, source.identity.as_ref(), source.ip, addr.port()) {
                tracing::warn!(source = %source.ip, principal = ?source.identity.as_ref().map(|i| i.to_string()), target = %addr, "authorization: {reason}");
                return Err(ConnectError::Denied { addr, source_ip: source.ip, reason });
            }
            return direct().await;
        }
        let Some(node_ip) = cluster.node(&pod.node).map(|n| n.ip) else {
            return Err(ConnectError::UnknownNode { addr, node: pod.node.clone() });
        };
        let ids = source.identity.as_ref().map(|src| crate::tunnel::TunnelIdentities {
            source: src.clone(),
            destination: crate::identity::Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account),
        });
        let proxy = SocketAddr::new(node_ip, self.inbound_port);
        Ok(UpstreamIo::Tunnel(self.tunnels.open(proxy, addr, ids, Some(source.ip), timeout).await?))
    }
}
