//! Upstream HTTP connections, pooled per endpoint: HTTP/2 multiplexes one connection per
//! endpoint; HTTP/1.1 keeps idle keep-alive connections and opens more as needed.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use tracing::debug;

use super::{replay::ReplayBody, server};
use crate::{
    config::Endpoint,
    l4::gather::{Gather, Mode},
    upstream::{ConnectError, Connector, Source},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Per-destination connection settings (DestinationRule connectionPool).
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// `None`: unlimited.
    pub max_requests_per_connection: Option<u32>,
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream handshake: {0}")]
    Handshake(hyper::Error),
    /// The upstream refused the stream (HTTP/2 REFUSED_STREAM) or closed the connection before
    /// the request was written: safe to retry anywhere.
    #[error("upstream refused the request: {0}")]
    Refused(hyper::Error),
    /// The upstream reset or closed the connection after the request was sent.
    #[error("upstream reset: {0}")]
    Reset(hyper::Error),
    /// The per-try timeout fired before the response headers arrived.
    #[error("per-try timeout")]
    Timeout,
}

struct IdleH1 {
    sender: http1::SendRequest<ReplayBody>,
    since: Instant,
    used: u32,
    /// For a connection through a tunnel: set when the far node proxy drains.
    goaway: Option<watch::Receiver<bool>>,
}

/// Whether a connection rides a tunnel whose far node proxy is draining: it finishes the
/// exchange in flight but takes no new one, so that proxy can stop (a new connection goes
/// through a new tunnel, to its successor).
fn draining(goaway: &Option<watch::Receiver<bool>>) -> bool {
    goaway.as_ref().is_some_and(|g| *g.borrow())
}

type H2Slot = Arc<tokio::sync::Mutex<Option<(http2::SendRequest<ReplayBody>, Option<watch::Receiver<bool>>)>>>;

/// Upstream connections belong to one calling pod (its address and identity): a connection
/// opened for one pod (authorized on its identity and address, presenting its certificate, and
/// re-judged on them when policies change) is never reused for another, not even a replica of
/// the same identity, which an `ipBlocks` rule may tell apart.
type Key = (SocketAddr, Source);

#[derive(Default)]
struct Endpoints {
    h1: HashMap<Key, Vec<IdleH1>>,
    h2: HashMap<Key, H2Slot>,
}

pub struct Pool {
    connector: Connector,
    idle: Arc<Mutex<Endpoints>>,
}

impl Pool {
    pub fn new(connector: Connector) -> Self {
        Self { connector, idle: Arc::default() }
    }

    pub async fn send(&self, endpoint: &Endpoint, version: Version, source: &Source, req: Request<ReplayBody>, settings: &PoolSettings) -> Result<Response<Incoming>, SendError> {
        match version {
            Version::Http1 => self.send_h1(endpoint, source, req, settings).await,
            Version::Http2 => self.send_h2(endpoint, source, req, settings).await,
        }
    }

    async fn send_h2(&self, endpoint: &Endpoint, source: &Source, req: Request<ReplayBody>, settings: &PoolSettings) -> Result<Response<Incoming>, SendError> {
        let key: Key = (endpoint.addr, source.clone());
        let slot = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.h2.entry(key).or_default().clone()
        };
        let mut sender = {
            // Held across the connect so concurrent first requests share one connection.
            let mut slot = slot.lock().await;
            match slot.as_ref() {
                Some((s, goaway)) if !s.is_closed() && !draining(goaway) => s.clone(),
                _ => {
                    // Boxed (see `connect_h1`).
                    let (sender, goaway) = Box::pin(self.connect_h2(endpoint, source, settings)).await?;
                    *slot = Some((sender.clone(), goaway));
                    sender
                }
            }
        };
        sender.ready().await.map_err(SendError::Refused)?;
        sender.send_request(req).await.map_err(classify)
    }

    async fn send_h1(&self, endpoint: &Endpoint, source: &Source, req: Request<ReplayBody>, settings: &PoolSettings) -> Result<Response<Incoming>, SendError> {
        let key: Key = (endpoint.addr, source.clone());
        let reused = self.checkout_h1(&key, settings.idle_timeout);
        let (mut sender, used, goaway) = match reused {
            Some(idle) => (idle.sender, idle.used, idle.goaway),
            None => {
                let (sender, goaway) = Box::pin(self.connect_h1(endpoint, source, settings)).await?;
                (sender, 0, goaway)
            }
        };
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let response = sender.send_request(req).await.map_err(classify)?;
        let used = used + 1;
        let keep = !upgrade && settings.max_requests_per_connection.is_none_or(|max| used < max);
        if keep {
            // The connection is reusable once this response's body has been read.
            let idle = self.idle.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() && !draining(&goaway) {
                    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                    idle.h1.entry(key).or_default().push(IdleH1 { sender, since: Instant::now(), used, goaway });
                }
            });
        }
        Ok(response)
    }

    /// Opens a new HTTP/1.1 connection. Called boxed: the connect (tunnel, TLS handshake)
    /// future is several KiB, and inline it would make every request's future that large,
    /// which the runtime copies around per request (task creation, completion; it showed up
    /// as memmove in the profile) although connecting is rare.
    async fn connect_h1(
        &self,
        endpoint: &Endpoint,
        source: &Source,
        settings: &PoolSettings,
    ) -> Result<(http1::SendRequest<ReplayBody>, Option<watch::Receiver<bool>>), SendError> {
        let io = self.connector.connect(endpoint, source, settings.connect_timeout).await?;
        let goaway = io.tunnel_goaway();
        self.retire_on_goaway(&goaway);
        // hyper queues up to its read/write buffer limit of a body the upstream is not taking
        // (~400 KiB by default): a stalled upload would pin that much of the proxy each.
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(server::HTTP1_MAX_BUF)
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let addr = endpoint.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, "upstream h1 connection: {e}");
            }
        });
        Ok((sender, goaway))
    }

    /// Opens a new HTTP/2 connection; called boxed, as `connect_h1`.
    async fn connect_h2(
        &self,
        endpoint: &Endpoint,
        source: &Source,
        settings: &PoolSettings,
    ) -> Result<(http2::SendRequest<ReplayBody>, Option<watch::Receiver<bool>>), SendError> {
        let io = self.connector.connect(endpoint, source, settings.connect_timeout).await?;
        let goaway = io.tunnel_goaway();
        self.retire_on_goaway(&goaway);
        // A request's HEADERS, DATA and END_STREAM leave as one write (to a pod) or one DATA
        // frame (into a tunnel).
        let io = Gather::new(io, Mode::Hold);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .max_send_buf_size(server::H2_MAX_SEND_BUF)
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let addr = endpoint.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, "upstream h2 connection: {e}");
            }
        });
        Ok((sender, goaway))
    }

    fn checkout_h1(&self, key: &Key, idle_timeout: Duration) -> Option<IdleH1> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let stack = idle.h1.get_mut(key)?;
        while let Some(conn) = stack.pop() {
            if conn.sender.is_ready() && conn.since.elapsed() < idle_timeout && !draining(&conn.goaway) {
                return Some(conn);
            }
        }
        None
    }

    /// When the tunnel under a new connection reports GOAWAY, closes the idle pooled
    /// connections riding draining tunnels at once, rather than at their next checkout: each
    /// holds a stream open on the draining proxy, which waits for its streams before exiting.
    fn retire_on_goaway(&self, goaway: &Option<watch::Receiver<bool>>) {
        let Some(mut goaway) = goaway.clone() else { return };
        let idle = self.idle.clone();
        tokio::spawn(async move {
            // Err: the tunnel connection is gone, and its pooled connections fail their checks.
            if goaway.wait_for(|g| *g).await.is_err() {
                return;
            }
            let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
            for stack in idle.h1.values_mut() {
                stack.retain(|c| !draining(&c.goaway));
            }
            for slot in idle.h2.values() {
                // A slot being used right now is replaced by its next request instead.
                if let Ok(mut slot) = slot.try_lock()
                    && slot.as_ref().is_some_and(|(_, g)| draining(g))
                {
                    *slot = None;
                }
            }
        });
    }

    /// Drops pooled connections to endpoints no longer in `live`.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.h1.retain(|(a, _), _| live(a));
        idle.h2.retain(|(a, _), _| live(a));
    }
}

impl SendError {
    /// The destination's policy refused this caller (AuthorizationPolicy, here or on the far
    /// node): answered 403, never retried.
    pub fn is_denied(&self) -> bool {
        match self {
            SendError::Connect(ConnectError::Denied { .. }) => true,
            SendError::Connect(ConnectError::Tunnel(crate::tunnel::TunnelError::Refused { status, .. })) => *status == hyper::StatusCode::FORBIDDEN,
            _ => false,
        }
    }
}

fn classify(e: hyper::Error) -> SendError {
    if e.is_canceled() || is_refused_stream(&e) {
        SendError::Refused(e)
    } else {
        SendError::Reset(e)
    }
}

/// HTTP/2 says the upstream did not process the request: REFUSED_STREAM, or a graceful GOAWAY
/// (NO_ERROR) that the stream was beyond (a server shutting down or being replaced) or that
/// arrived before it was sent. Either way it is safe to retry anywhere.
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = err.source();
    }
    false
}
