//! The connections this node proxy admitted to its pods, each with what its AuthorizationPolicy
//! decision was made on, so that a policy change reaches connections already open (as ztunnel
//! re-checks them): on every new config snapshot, [`Admitted::revoke_denied`] judges each again
//! and closes those the new policy denies.
//!
//! Every authorized connection to a local pod ends on a socket this proxy opened to that pod:
//! an inbound tunnel stream's, a same-node connection's ([`super::upstream::Connector`]), and
//! so a pooled upstream HTTP connection's too (it is one of those two). Registering that socket
//! is enough: shutting it down ends the pod side, and the byte pump or the HTTP connection on
//! top of it then ends as if the pod had closed. Registration is once per connection (a map
//! insert), nothing per request or per byte.
//!
//! The registry keeps each socket's descriptor number, not a duplicate: one descriptor per
//! connection instead of two (at 10,000 connections to local pods a duplicate each took a node
//! proxy to 20,000 descriptors). That is safe because a registered connection is owned by
//! [`Registered`], whose registration leaves the registry before its socket closes, and removal
//! and revocation both hold the registry's lock: a revocation never reaches a number the kernel
//! has already handed to another socket.
use std::{
    collections::HashMap,
    io,
    net::{Shutdown, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    pin::Pin,
    task::{Context, Poll},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::warn;

use crate::{
    authz::{self, Decision, SourceIp},
    config::Cluster,
    identity::Identity,
};

/// What a connection was authorized on: the caller and the pod address and port it reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    pub source_id: Option<Identity>,
    pub source_ip: SourceIp,
    /// The pod's address and port.
    pub target: SocketAddr,
}

struct Entry {
    admission: Admission,
    /// The connection's socket, open for as long as the entry exists (see [`Registered`]):
    /// shutting it down ends the connection wherever its owner is.
    socket: RawFd,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// The registry; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Admitted {
    inner: Arc<Inner>,
}

/// Keeps a connection in the registry until dropped.
struct Registration {
    id: u64,
    inner: Arc<Inner>,
}

/// A connection to a local pod, in the registry while its socket is open. Field order matters:
/// the registration is dropped (leaving the registry, under its lock) before the stream closes
/// its descriptor.
pub struct Registered {
    registration: Registration,
    stream: TcpStream,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registered({}, {:?})", self.registration.id, self.stream)
    }
}

impl AsyncRead for Registered {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Registered {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.id)
    }
}

impl Admitted {
    /// Records `stream`, the proxy's connection to the pod, as admitted on `admission`, for as
    /// long as the returned [`Registered`] (which owns it) lives.
    pub fn register(&self, stream: TcpStream, admission: Admission) -> Registered {
        let socket = stream.as_raw_fd();
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Entry { admission, socket });
        Registered { registration: Registration { id, inner: self.inner.clone() }, stream }
    }

    /// The decision on `admission` under `latest` if that is not the snapshot it was judged on
    /// (`judged`): a config change that came while the connection was being opened found it
    /// not yet registered, so the opener asks again once it is.
    pub fn recheck(judged: &Arc<Cluster>, latest: &Arc<Cluster>, admission: &Admission) -> Result<(), String> {
        if Arc::ptr_eq(judged, latest) {
            return Ok(());
        }
        match judge(latest, admission) {
            Some(Decision::Deny { reason, .. }) => Err(reason),
            _ => Ok(()),
        }
    }

    /// Judges every open connection under `cluster`'s policies and closes (with a reset) those
    /// now denied; returns how many. A connection whose pod is gone from the config is left to
    /// end with the pod.
    pub fn revoke_denied(&self, cluster: &Cluster) -> usize {
        // The lock is held until every denied socket is shut down: an owner dropping its
        // connection meanwhile waits for it before the descriptor closes.
        let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        let denied: Vec<(u64, String)> = open
            .iter()
            .filter_map(|(id, e)| match judge(cluster, &e.admission) {
                Some(Decision::Deny { reason, .. }) => Some((*id, reason)),
                _ => None,
            })
            .collect();
        for (id, reason) in &denied {
            let Some(entry) = open.remove(id) else { continue };
            let a = &entry.admission;
            warn!(source = %a.source_ip, principal = ?a.source_id.as_ref().map(|i| i.to_string()), target = %a.target, "authorization: closing an open connection after a policy change: {reason}");
            // SAFETY: the entry existed until now, under this lock, so its owner has not closed
            // the descriptor (see `Registered`); it stays open while the lock is held.
            let fd = unsafe { BorrowedFd::borrow_raw(entry.socket) };
            let socket = socket2::SockRef::from(&fd);
            // A reset rather than a FIN once the owner closes it, so the far side sees a refusal
            // and not a clean end of stream; the shutdown wakes whoever waits on the socket.
            let _ = socket.set_linger(Some(Duration::ZERO));
            let _ = socket.shutdown(Shutdown::Both);
        }
        denied.len()
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn judge(cluster: &Cluster, a: &Admission) -> Option<Decision> {
    let pod = cluster.pod_by_ip(a.target.ip())?;
    Some(authz::check(cluster, pod, a.source_id.as_ref(), a.source_ip, a.target.port()))
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    const BASE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 172.30.0.2}]}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: demo, labels: {app: server}}\n\
        spec: {nodeName: node-b, serviceAccountName: server, containers: []}\nstatus: {podIP: 10.244.1.10}\n---\n";

    fn cluster(extra: &str) -> Cluster {
        let yaml = format!("{BASE}{extra}");
        Cluster::from_yaml_files([("c.yaml", yaml.as_str())]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn deny(source: &str) -> String {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{namespace: demo, name: deny}}\nspec: {{action: DENY, rules: [{{from: [{{source: {source}}}]}}]}}\n")
    }

    fn admission(sa: &str, ip: SourceIp) -> Admission {
        Admission { source_id: Some(Identity::in_default_domain("demo", sa)), source_ip: ip, target: "10.244.1.10:7000".parse().expect("addr") }
    }

    /// A connected pair on loopback: (the proxy's side, the pod's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (proxy, pod) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (proxy.expect("connect"), pod.expect("accept").0)
    }

    /// Whether `s` is still open: a byte written by the peer arrives.
    async fn alive<S: AsyncRead + Unpin>(mine: &mut S, peer: &mut TcpStream) -> bool {
        if peer.write_all(b"x").await.is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(2), mine.read(&mut b)).await, Ok(Ok(1)))
    }

    #[tokio::test]
    async fn a_policy_change_closes_the_connections_it_denies_and_only_those() {
        let admitted = Admitted::default();
        let ip = |s: &str| SourceIp::Known(s.parse().expect("ip"));
        let ((denied, mut denied_pod), (kept, mut kept_pod), (blind, blind_pod)) = (pair().await, pair().await, pair().await);
        let mut denied = admitted.register(denied, admission("client", ip("10.244.0.10")));
        let mut kept = admitted.register(kept, admission("client", ip("10.244.1.11")));
        // A tunnel whose source address did not check out: a DENY on addresses covers it.
        let mut blind = admitted.register(blind, admission("client", SourceIp::Unverified { proxy: "172.30.0.1".parse().expect("ip") }));
        assert_eq!(admitted.len(), 3);

        // Nothing applies: nothing closes.
        assert_eq!(admitted.revoke_denied(&cluster("")), 0);
        assert!(alive(&mut denied, &mut denied_pod).await && alive(&mut kept, &mut kept_pod).await);

        assert_eq!(admitted.revoke_denied(&cluster(&deny("{ipBlocks: [10.244.0.0/24]}"))), 2);
        assert_eq!(admitted.len(), 1, "revoked connections leave the registry");
        // The pod side sees the connection end, and the proxy's side reads EOF at once.
        let mut b = [0u8; 8];
        assert!(matches!(tokio::time::timeout(Duration::from_secs(2), denied_pod.read(&mut b)).await, Ok(Ok(0) | Err(_))));
        assert!(matches!(tokio::time::timeout(Duration::from_secs(2), denied.read(&mut b)).await, Ok(Ok(0) | Err(_))));
        assert!(matches!(tokio::time::timeout(Duration::from_secs(2), blind.read(&mut b)).await, Ok(Ok(0) | Err(_))));
        let _ = blind_pod;
        assert!(alive(&mut kept, &mut kept_pod).await, "the caller outside the DENY keeps its connection");

        // A second snapshot counts nothing twice.
        assert_eq!(admitted.revoke_denied(&cluster(&deny("{ipBlocks: [10.244.0.0/24]}"))), 0);
        assert_eq!(admitted.revoke_denied(&cluster(&deny("{principals: [cluster.local/ns/demo/sa/client]}"))), 1);
    }

    #[tokio::test]
    async fn a_registration_leaves_with_its_connection() {
        let admitted = Admitted::default();
        let (a, mut b) = pair().await;
        let r = admitted.register(a, admission("client", SourceIp::Known("10.244.0.10".parse().expect("ip"))));
        assert_eq!(admitted.len(), 1);
        drop(r);
        assert!(admitted.is_empty());
        // And the socket closed with it.
        let mut buf = [0u8; 1];
        assert!(matches!(tokio::time::timeout(Duration::from_secs(2), b.read(&mut buf)).await, Ok(Ok(0) | Err(_))));
    }

    #[tokio::test]
    async fn a_revocation_never_reaches_a_reused_descriptor() {
        // A connection registered, then closed by its owner: the kernel hands its descriptor
        // number to the next socket, which a revocation must leave alone.
        let admitted = Admitted::default();
        let (a, _a_pod) = pair().await;
        drop(admitted.register(a, admission("client", SourceIp::Known("10.244.0.10".parse().expect("ip")))));
        // Usually one of these takes the number (other tests open sockets too).
        let (mut reused, mut reused_pod) = pair().await;
        let (mut other, mut other_pod) = pair().await;
        assert_eq!(admitted.revoke_denied(&cluster(&deny("{ipBlocks: [10.244.0.0/24]}"))), 0);
        assert!(alive(&mut reused, &mut reused_pod).await && alive(&mut other, &mut other_pod).await);
    }
}
