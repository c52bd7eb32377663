//! Carrying connections to endpoints on other nodes: HTTP/2 CONNECT streams to that node
//! proxy's inbound port (15008), the target pod address in `:authority`, as Istio's HBONE does.
//! One HTTP/2 connection per destination node carries many streams; it is pinged while in use
//! and released when idle.
//!
//! A node proxy being replaced sends GOAWAY on its tunnel connections. The pool notices it on
//! the wire ([`GoawayWatch`]: hyper does not tell) and opens new streams on a new connection,
//! which reaches the replacement; the streams already open keep flowing to the old one, and
//! pooled HTTP connections riding them are retired once idle ([`Tunnel::goaway`]), so the old
//! proxy can finish instead of being held open until its drain timeout.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};
use tracing::debug;

use super::{
    dial,
    gather::{Gather, Mode},
    hbone::MeshTls,
};
use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to node proxy {proxy}: {source}")]
    Connect { proxy: SocketAddr, source: io::Error },
    #[error("tunnel to {proxy}: {source}")]
    Http { proxy: SocketAddr, source: hyper::Error },
    #[error("node proxy {proxy} refused the tunnel to {target}: {status}")]
    Refused { proxy: SocketAddr, target: SocketAddr, status: StatusCode },
    #[error(transparent)]
    Tls(#[from] crate::hbone::HboneError),
}

/// The workload identities a tunnel connection is for: presented and expected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelIdentities {
    pub source: Identity,
    pub destination: Identity,
}

/// The header naming the tunnel's source pod (RFC 7239).
pub const FORWARDED: &str = "forwarded";

fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The target of an HBONE CONNECT: its `:authority`, which must be `ip:port` (a name or a
/// missing port is refused; there is no DNS on this path).
pub fn connect_target(authority: Option<&http::uri::Authority>) -> Option<std::net::SocketAddr> {
    authority?.as_str().parse().ok()
}

/// The source address of a `Forwarded: for=...` header.
pub fn forwarded_source(value: &str) -> Option<std::net::IpAddr> {
    let for_ = value.split([';', ',']).find_map(|p| p.trim().strip_prefix("for="))?;
    let for_ = for_.trim_matches('"');
    let for_ = for_.strip_prefix('[').and_then(|v| v.split(']').next()).unwrap_or(for_);
    for_.parse().ok()
}

/// HTTP/2 flow-control windows sized for bulk transfers through one multiplexed connection
/// (the 64 KiB defaults throttle a single stream well below link speed), and bounded by the
/// node's memory budget: the connection window is what a peer may send that the proxy has not
/// yet passed on, so it is a twelfth of the budget (16 MiB at the default 192 MiB), at least
/// 1 MiB; a stream may use a quarter of it.
static CONNECTION_WINDOW: AtomicU32 = AtomicU32::new(16 << 20);

/// Derives the tunnel windows from `--memory-budget-mib`, before serving.
pub fn set_windows_from_budget(budget_bytes: u64) {
    let window = (budget_bytes / 12).clamp(1 << 20, 16 << 20);
    CONNECTION_WINDOW.store(window as u32, Ordering::Relaxed);
}

/// Streams a peer may open at once on one inbound tunnel connection (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS): the data listeners' per-source cap, a peer node being one
/// source for tunnels. Without it hyper's default (200) applies, and a peer node's 201st
/// concurrent connection to this node's pods waits, unconnected, for another to end.
static MAX_STREAMS: AtomicU32 = AtomicU32::new(200);

/// Sets [`max_streams`] from the per-source connection cap, before serving.
pub fn set_max_streams(per_source: usize) {
    MAX_STREAMS.store(per_source.clamp(1, u32::MAX as usize) as u32, Ordering::Relaxed);
}

pub fn max_streams() -> u32 {
    MAX_STREAMS.load(Ordering::Relaxed)
}

pub fn connection_window() -> u32 {
    CONNECTION_WINDOW.load(Ordering::Relaxed)
}

pub fn stream_window() -> u32 {
    connection_window() / 4
}

pub const MAX_FRAME: u32 = 256 * 1024;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel connection unused this long is closed.
const IDLE_RELEASE: Duration = Duration::from_secs(120);

type Sender = http2::SendRequest<Empty<Bytes>>;

struct Entry {
    sender: Option<Sender>,
    /// Whether the far proxy sent GOAWAY on this connection.
    goaway: Option<watch::Receiver<bool>>,
    last_used: Instant,
    /// Serial of the source certificate the connection was opened with: a rotated certificate
    /// means a new connection, so no tunnel outlives the certificate that authenticated it.
    cert_serial: Option<String>,
}

type Key = (SocketAddr, Option<TunnelIdentities>);

/// Multiplexed tunnel connections, one per destination node proxy and, with mTLS, per
/// (source identity, destination identity).
#[derive(Default)]
pub struct TunnelPool {
    conns: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Entry>>>>,
    tls: Option<Arc<MeshTls>>,
}

impl TunnelPool {
    /// With `tls`, tunnel connections are mutual TLS with workload identities; without, they
    /// are plaintext HTTP/2.
    pub fn new(tls: Option<Arc<MeshTls>>) -> Self {
        Self { conns: Mutex::default(), tls }
    }

    pub fn tls(&self) -> Option<&Arc<MeshTls>> {
        self.tls.as_ref()
    }

    /// Opens a stream through the node proxy at `proxy` to `target`, a pod on that node.
    /// `ids` is required when the pool does mutual TLS. `source` (the calling pod's address)
    /// travels in a `Forwarded` header, as in Istio's HBONE, so the far side can name the
    /// source workload in its telemetry.
    pub async fn open(&self, proxy: SocketAddr, target: SocketAddr, ids: Option<TunnelIdentities>, source: Option<std::net::IpAddr>, connect_timeout: Duration) -> Result<Tunnel, TunnelError> {
        let key: Key = (proxy, if self.tls.is_some() { ids } else { None });
        // A pooled connection may have just died, or its far end started draining; one fresh
        // connection is worth a second try.
        for attempt in 0..2 {
            let (mut sender, goaway) = self.sender(&key, connect_timeout, attempt > 0).await?;
            let authority = target.to_string();
            let mut req = Request::builder().method(Method::CONNECT).uri(&authority);
            if let Some(ip) = source {
                req = req.header(FORWARDED, forwarded_for(ip));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .expect("CONNECT request from a socket address is well formed");
            let res = match sender.send_request(req).await {
                Ok(res) => res,
                Err(e) if attempt == 0 && not_processed(&e) => {
                    debug!(%proxy, %target, "tunnel stream not processed ({e}); retrying on a new connection");
                    continue;
                }
                Err(source) => return Err(TunnelError::Http { proxy, source }),
            };
            if res.status() != StatusCode::OK {
                return Err(TunnelError::Refused { proxy, target, status: res.status() });
            }
            let upgraded = hyper::upgrade::on(res).await.map_err(|source| TunnelError::Http { proxy, source })?;
            return Ok(Tunnel { io: Gather::new(TokioIo::new(upgraded), Mode::Merge), goaway });
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn sender(&self, key: &Key, connect_timeout: Duration, fresh: bool) -> Result<(Sender, watch::Receiver<bool>), TunnelError> {
        let proxy = key.0;
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            // Lazily forget connections idle for a while (dropping the sender closes it once
            // its streams are done).
            conns.retain(|k, e| k == key || e.try_lock().map_or(true, |e| e.last_used.elapsed() < IDLE_RELEASE));
            conns
                .entry(key.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Entry { sender: None, goaway: None, last_used: Instant::now(), cert_serial: None })))
                .clone()
        };
        // Held across the connect so concurrent first streams share one connection.
        let mut entry = slot.lock().await;
        entry.last_used = Instant::now();
        let serial = match (&self.tls, &key.1) {
            (Some(tls), Some(ids)) => tls.certs().cached(&ids.source).map(|c| c.serial.clone()),
            _ => None,
        };
        if !fresh
            && entry.cert_serial == serial
            && let Some(s) = &entry.sender
            && !s.is_closed()
            && let Some(goaway) = &entry.goaway
            && !*goaway.borrow()
        {
            return Ok((s.clone(), goaway.clone()));
        }
        let stream = dial::connect(proxy, connect_timeout).await.map_err(|source| TunnelError::Connect { proxy, source })?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(stream_window())
            .initial_connection_window_size(connection_window())
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(crate::http::server::H2_MAX_SEND_BUF)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        let (goaway_tx, goaway) = watch::channel(false);
        let sender = match (&self.tls, &key.1) {
            (Some(tls), Some(ids)) => {
                let stream = tokio::time::timeout(connect_timeout, tls.connect(stream, proxy, &ids.source, &ids.destination))
                    .await
                    .map_err(|_| TunnelError::Connect { proxy, source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out") })??;
                handshake(&builder, stream, goaway_tx, proxy).await?
            }
            (Some(_), None) => {
                return Err(TunnelError::Connect { proxy, source: io::Error::other("mutual TLS needs the source and destination identities") });
            }
            (None, _) => handshake(&builder, stream, goaway_tx, proxy).await?,
        };
        entry.sender = Some(sender.clone());
        entry.goaway = Some(goaway.clone());
        // The handshake may have fetched (or renewed) the certificate: remember what it used.
        entry.cert_serial = match (&self.tls, &key.1) {
            (Some(tls), Some(ids)) => tls.certs().cached(&ids.source).map(|c| c.serial.clone()),
            _ => None,
        };
        Ok((sender, goaway))
    }

    /// Open tunnel connections, for tests and the admin endpoint.
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.values().filter(|e| e.try_lock().map_or(true, |e| e.sender.as_ref().is_some_and(|s| !s.is_closed()))).count()
    }
}

/// The HTTP/2 handshake over a tunnel connection (TLS or plaintext), watching for the far
/// proxy's GOAWAY; the connection is driven by its own task.
async fn handshake<IO>(builder: &http2::Builder<TokioExecutor>, io: IO, goaway: watch::Sender<bool>, proxy: SocketAddr) -> Result<Sender, TunnelError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(GoawayWatch::new(io, goaway));
    let (sender, conn) = builder.handshake(io).await.map_err(|source| TunnelError::Http { proxy, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%proxy, "tunnel connection: {e}");
        }
    });
    Ok(sender)
}

/// An open tunnel stream, and whether its connection's far end has started draining.
pub struct Tunnel {
    /// A vectored write leaves as one DATA frame (see [`Gather`]).
    pub io: Gather<TokioIo<Upgraded>>,
    pub goaway: watch::Receiver<bool>,
}

impl Tunnel {
    /// Becomes `true` when the far node proxy sent GOAWAY (it is being replaced or stopped):
    /// this stream still works, but whatever pools it should not start new work on it. The
    /// channel closes when the tunnel connection is gone.
    pub fn goaway(&self) -> watch::Receiver<bool> {
        self.goaway.clone()
    }
}

/// A stream refused before the far proxy processed it: the pooled connection was already
/// closed, or the far proxy is draining (GOAWAY, REFUSED_STREAM). Nothing reached the target
/// pod, so it is safe to retry.
fn not_processed(e: &hyper::Error) -> bool {
    if e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// HTTP/2 frame header: 24-bit length, type, flags, stream id.
const FRAME_HEADER: usize = 9;
const FRAME_GOAWAY: u8 = 0x7;

/// Reads through to `inner` and follows the HTTP/2 frames the far proxy sends (the server's
/// side of a connection is frames from its first byte), to flag a GOAWAY the moment it arrives.
pub struct GoawayWatch<IO> {
    inner: IO,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to pass over.
    skip: usize,
    goaway: watch::Sender<bool>,
}

impl<IO> GoawayWatch<IO> {
    pub fn new(inner: IO, goaway: watch::Sender<bool>) -> Self {
        Self { inner, header: [0; FRAME_HEADER], header_len: 0, skip: 0, goaway }
    }

    fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == FRAME_HEADER {
                let h = self.header;
                self.skip = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                self.header_len = 0;
                if h[3] == FRAME_GOAWAY && !*self.goaway.borrow() {
                    debug!("tunnel: GOAWAY from the far node proxy");
                    self.goaway.send_replace(true);
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GoawayWatch<IO> {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            this.scan(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for GoawayWatch<IO> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[io::IoSlice<'_>]) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn flags_goaway_across_arbitrary_read_boundaries() {
        // SETTINGS, DATA whose payload contains a fake GOAWAY header, then a real GOAWAY.
        let mut wire = frame(0x4, &[0; 12]);
        wire.extend(frame(0x0, &frame(FRAME_GOAWAY, &[0; 8])));
        let goaway_at = wire.len();
        wire.extend(frame(FRAME_GOAWAY, &[0; 8]));
        for chunk in [1, 2, 5, 9, 10, 64] {
            let (tx, rx) = watch::channel(false);
            let mut w = GoawayWatch::new(tokio::io::empty(), tx);
            let mut seen_at = None;
            let mut fed = 0;
            for piece in wire.chunks(chunk) {
                w.scan(piece);
                fed += piece.len();
                if seen_at.is_none() && *rx.borrow() {
                    seen_at = Some(fed);
                }
            }
            let seen = seen_at.unwrap_or_else(|| panic!("chunk {chunk}: GOAWAY not seen"));
            assert!(seen > goaway_at, "chunk {chunk}: flagged inside a DATA payload (at {seen})");
        }
    }

    #[test]
    fn no_goaway_no_flag() {
        let (tx, rx) = watch::channel(false);
        let mut w = GoawayWatch::new(tokio::io::empty(), tx);
        let mut wire = frame(0x4, &[]);
        wire.extend(frame(0x6, &[0; 8]));
        wire.extend(frame(0x0, &[7; 300]));
        w.scan(&wire);
        assert!(!*rx.borrow());
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn windows_follow_the_memory_budget_within_bounds() {
        set_windows_from_budget(192 << 20);
        assert_eq!((connection_window(), stream_window()), (16 << 20, 4 << 20));
        set_windows_from_budget(48 << 20);
        assert_eq!((connection_window(), stream_window()), (4 << 20, 1 << 20));
        set_windows_from_budget(4 << 20);
        assert_eq!(connection_window(), 1 << 20, "never below 1 MiB");
        set_windows_from_budget(192 << 20);
    }
}
