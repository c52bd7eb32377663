//! The connections the proxy carries right now (the admin API's `/connections`), and the byte
//! counting that feeds both that list and the TCP byte metrics while the bytes flow.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::metrics::TcpSeries;

/// One live connection, as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LiveConnection {
    pub id: u64,
    /// `outbound` (captured from a pod on this node) or `inbound` (a tunnel stream from
    /// another node's proxy).
    pub direction: &'static str,
    /// `tcp`, `http` or `hbone`.
    pub protocol: &'static str,
    /// The downstream address: the pod for outbound, the other node's proxy for inbound.
    pub peer: String,
    /// `namespace/workload` of the caller, or `unknown`.
    pub source_workload: String,
    pub source_principal: Option<String>,
    /// The Service's FQDN, when the connection was made to one.
    pub destination_service: Option<String>,
    /// `namespace/pod` of the destination, when one was chosen for the whole connection.
    pub destination: Option<String>,
    /// The address the proxy connected to (an endpoint, or for HTTP the cluster name).
    pub upstream: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub age_ms: u64,
    /// Bytes from the downstream (request direction).
    pub bytes_in: u64,
    /// Bytes to the downstream (response direction).
    pub bytes_out: u64,
}

/// What is known about a connection when it is registered.
pub struct ConnectionInfo {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    pub source_workload: String,
    pub source_principal: Option<String>,
    pub destination_service: Option<String>,
    pub destination: Option<String>,
    pub upstream: Option<String>,
}

#[derive(Default)]
pub struct ByteCounts {
    pub received: AtomicU64,
    pub sent: AtomicU64,
}

struct Entry {
    info: ConnectionInfo,
    started: Instant,
    started_wall: SystemTime,
    bytes: Arc<ByteCounts>,
}

#[derive(Default)]
pub struct ConnectionRegistry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

impl ConnectionRegistry {
    /// Lists `info` until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, info: ConnectionInfo) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = Arc::new(ByteCounts::default());
        let entry = Entry { info, started: Instant::now(), started_wall: SystemTime::now(), bytes: bytes.clone() };
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(id, entry);
        LiveGuard { registry: self.clone(), id, bytes }
    }

    /// Oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LiveConnection> = live
            .iter()
            .map(|(id, e)| LiveConnection {
                id: *id,
                direction: e.info.direction,
                protocol: e.info.protocol,
                peer: e.info.peer.to_string(),
                source_workload: e.info.source_workload.clone(),
                source_principal: e.info.source_principal.clone(),
                destination_service: e.info.destination_service.clone(),
                destination: e.info.destination.clone(),
                upstream: e.info.upstream.clone(),
                started_at: super::access_log::rfc3339(e.started_wall),
                age_ms: e.started.elapsed().as_millis() as u64,
                bytes_in: e.bytes.received.load(Ordering::Relaxed),
                bytes_out: e.bytes.sent.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps a connection listed; unlists it when dropped.
pub struct LiveGuard {
    registry: Arc<ConnectionRegistry>,
    id: u64,
    bytes: Arc<ByteCounts>,
}

impl LiveGuard {
    pub fn bytes(&self) -> &Arc<ByteCounts> {
        &self.bytes
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.registry.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// A downstream stream that counts what it reads (request direction) and writes (response
/// direction) into the live entry and, for TCP, the connection's metric series.
pub struct Counted<S> {
    inner: S,
    bytes: Option<Arc<ByteCounts>>,
    series: Vec<TcpSeries>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, bytes: Option<Arc<ByteCounts>>, series: Vec<TcpSeries>) -> Self {
        Self { inner, bytes, series }
    }

    fn add_received(&self, n: u64) {
        if let Some(b) = &self.bytes {
            b.received.fetch_add(n, Ordering::Relaxed);
        }
        for s in &self.series {
            s.received.inc_by(n);
        }
    }

    fn add_sent(&self, n: u64) {
        if let Some(b) = &self.bytes {
            b.sent.fetch_add(n, Ordering::Relaxed);
        }
        for s in &self.series {
            s.sent.inc_by(n);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.add_received(n as u64);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.add_sent(n as u64);
        }
        res
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.add_sent(n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
