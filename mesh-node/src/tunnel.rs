//! Carrying connections to endpoints on other nodes: HTTP/2 CONNECT streams to that node
//! proxy's inbound port (15008), the target pod address in `:authority`, as Istio's HBONE does.
//! One HTTP/2 connection per destination node carries many streams; it is pinged while in use
//! and released when idle.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use crate::{hbone::MeshTls, identity::Identity, upstream};

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

/// The source address of a `Forwarded: for=...` header.
pub fn forwarded_source(value: &str) -> Option<std::net::IpAddr> {
    let for_ = value.split([';', ',']).find_map(|p| p.trim().strip_prefix("for="))?;
    let for_ = for_.trim_matches('"');
    let for_ = for_.strip_prefix('[').and_then(|v| v.split(']').next()).unwrap_or(for_);
    for_.parse().ok()
}

/// HTTP/2 flow-control windows sized for bulk transfers through one multiplexed connection
/// (the 64 KiB defaults throttle a single stream well below link speed).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 256 * 1024;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel connection unused this long is closed.
const IDLE_RELEASE: Duration = Duration::from_secs(120);

type Sender = http2::SendRequest<Empty<Bytes>>;

struct Entry {
    sender: Option<Sender>,
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
    pub async fn open(&self, proxy: SocketAddr, target: SocketAddr, ids: Option<TunnelIdentities>, source: Option<std::net::IpAddr>, connect_timeout: Duration) -> Result<TokioIo<Upgraded>, TunnelError> {
        let key: Key = (proxy, if self.tls.is_some() { ids } else { None });
        // A pooled connection may have just died; one fresh connection is worth a second try.
        for attempt in 0..2 {
            let mut sender = self.sender(&key, connect_timeout, attempt > 0).await?;
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
                Err(e) if attempt == 0 && (e.is_closed() || e.is_canceled()) => continue,
                Err(source) => return Err(TunnelError::Http { proxy, source }),
            };
            if res.status() != StatusCode::OK {
                return Err(TunnelError::Refused { proxy, target, status: res.status() });
            }
            let upgraded = hyper::upgrade::on(res).await.map_err(|source| TunnelError::Http { proxy, source })?;
            return Ok(TokioIo::new(upgraded));
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn sender(&self, key: &Key, connect_timeout: Duration, fresh: bool) -> Result<Sender, TunnelError> {
        let proxy = key.0;
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            // Lazily forget connections idle for a while (dropping the sender closes it once
            // its streams are done).
            conns.retain(|k, e| k == key || e.try_lock().map_or(true, |e| e.last_used.elapsed() < IDLE_RELEASE));
            conns.entry(key.clone()).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(Entry { sender: None, last_used: Instant::now(), cert_serial: None }))).clone()
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
        {
            return Ok(s.clone());
        }
        let stream = upstream::connect(proxy, connect_timeout).await.map_err(|source| TunnelError::Connect { proxy, source })?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        let sender = match (&self.tls, &key.1) {
            (Some(tls), Some(ids)) => {
                let stream = tokio::time::timeout(connect_timeout, tls.connect(stream, proxy, &ids.source, &ids.destination))
                    .await
                    .map_err(|_| TunnelError::Connect { proxy, source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out") })??;
                let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.map_err(|source| TunnelError::Http { proxy, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%proxy, "tunnel connection: {e}");
                    }
                });
                sender
            }
            (Some(_), None) => {
                return Err(TunnelError::Connect { proxy, source: io::Error::other("mutual TLS needs the source and destination identities") });
            }
            (None, _) => {
                let (sender, conn) = builder.handshake(TokioIo::new(stream)).await.map_err(|source| TunnelError::Http { proxy, source })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%proxy, "tunnel connection: {e}");
                    }
                });
                sender
            }
        };
        entry.sender = Some(sender.clone());
        // The handshake may have fetched (or renewed) the certificate: remember what it used.
        entry.cert_serial = match (&self.tls, &key.1) {
            (Some(tls), Some(ids)) => tls.certs().cached(&ids.source).map(|c| c.serial.clone()),
            _ => None,
        };
        Ok(sender)
    }

    /// Open tunnel connections, for tests and the admin endpoint.
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.values().filter(|e| e.try_lock().map_or(true, |e| e.sender.as_ref().is_some_and(|s| !s.is_closed()))).count()
    }
}
