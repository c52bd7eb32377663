//! Accepting connections within a budget: every listener of the daemon (outbound, inbound
//! tunnels, admin, metrics, readiness) takes connections through an [`Acceptor`], which caps
//! how many are open at once, in all and per source address, refuses the overflow at once
//! (reset, counted, logged once per source per interval) and backs off when `accept()` itself
//! fails (out of file descriptors) instead of spinning.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::stats::{Counter, ProxyStats};

/// How many connections a listener holds open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub total: usize,
    /// Per source address: one pod (or one node, for tunnels) cannot take the whole listener.
    pub per_source: usize,
}

impl Caps {
    /// For the small HTTP endpoints (admin, metrics, readiness): a scraper and a few humans.
    pub const SMALL: Caps = Caps { total: 256, per_source: 64 };

    /// The caps of each data listener (outbound, inbound) from the node proxy's memory budget:
    /// three quarters of it for connections, split between the two listeners, at
    /// [`CONNECTION_COST`] each (a TCP pipe's two buffers, TLS and HTTP/2 state); one source
    /// may hold a quarter of a listener.
    pub fn from_budget(budget_mib: u64) -> Caps {
        let total = (budget_mib as usize * 1024 * 1024 * 3 / 4 / 2 / CONNECTION_COST).max(16);
        Caps { total, per_source: (total / 4).max(4) }
    }
}

/// What one proxied connection may cost at most, for the budget: two pipe buffers
/// ([`crate::l4::pipe::PIPE_BUFFER`] each; the large ones of bulk transfers come from their own
/// allowance, [`crate::l4::pipe::set_large_allowance_from_budget`]) and TLS / HTTP/2 state.
pub const CONNECTION_COST: usize = 2 * crate::l4::pipe::PIPE_BUFFER + 16 * 1024;

/// Overflow and accept errors are logged at most this often per source.
const LOG_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub struct Acceptor {
    name: &'static str,
    listener: TcpListener,
    caps: Caps,
    open: Arc<Mutex<Open>>,
    stats: Arc<ProxyStats>,
    refused: fn(&ProxyStats) -> &Counter,
    logged: LogLimiter,
}

/// Says yes at most once per [`LOG_EVERY`] per source address and kind of event, so one
/// misbehaving peer cannot flood the log while each different thing it does is still said.
#[derive(Default)]
pub struct LogLimiter(Mutex<HashMap<(IpAddr, u64), Instant>>);

impl LogLimiter {
    pub fn should_log(&self, source: IpAddr) -> bool {
        self.should_log_kind(source, "")
    }

    /// `kind` tells events of one source apart (e.g. the reason a handshake failed).
    pub fn should_log_kind(&self, source: IpAddr, kind: &str) -> bool {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        kind.hash(&mut h);
        let key = (source, h.finish());
        let mut logged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if logged.len() > 4096 {
            logged.retain(|_, at| now.duration_since(*at) < LOG_EVERY);
        }
        match logged.get(&key) {
            Some(at) if now.duration_since(*at) < LOG_EVERY => false,
            _ => {
                logged.insert(key, now);
                true
            }
        }
    }
}

#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Holds one connection's place until dropped.
pub struct Permit {
    open: Arc<Mutex<Open>>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

impl Acceptor {
    /// `refused` picks the counter of connections turned away for being over a cap.
    pub fn new(name: &'static str, listener: TcpListener, caps: Caps, stats: Arc<ProxyStats>, refused: fn(&ProxyStats) -> &Counter) -> Self {
        Self { name, listener, caps, open: Arc::default(), stats, refused, logged: LogLimiter::default() }
    }

    /// The next connection within the caps. Connections over a cap are reset and counted here;
    /// errors of `accept()` (EMFILE, ENOBUFS) back off, doubling up to a second.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Permit) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    if self.should_log(IpAddr::from([0, 0, 0, 0])) {
                        warn!(listener = self.name, "accept: {e}; retrying in {backoff:?}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            let source = peer.ip().to_canonical();
            match self.admit(source) {
                Some(permit) => return (stream, peer, permit),
                None => {
                    (self.refused)(&self.stats).inc();
                    if self.should_log(source) {
                        warn!(listener = self.name, %source, total = self.caps.total, per_source = self.caps.per_source, "connection over the listener's cap: refused (logged once per {LOG_EVERY:?} per source)");
                    }
                    crate::upstream::reset(stream);
                }
            }
        }
    }

    fn admit(&self, source: IpAddr) -> Option<Permit> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.by_source.get(&source).copied().unwrap_or(0);
        if open.total >= self.caps.total || mine >= self.caps.per_source {
            return None;
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        Some(Permit { open: self.open.clone(), source })
    }

    fn should_log(&self, source: IpAddr) -> bool {
        self.logged.should_log(source)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn caps_refuse_the_overflow_and_free_on_drop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stats = Arc::new(ProxyStats::default());
        let acceptor = Acceptor::new("test", listener, Caps { total: 3, per_source: 2 }, stats.clone(), |s| &s.outbound_over_cap);
        let addr = acceptor.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (_a, _, p1) = acceptor.accept().await;
        let (_b, _, p2) = acceptor.accept().await;
        // The third from the same source is over its per-source cap: refused, then the next
        // one (after a place is freed) is accepted.
        let waiter = tokio::spawn(async move {
            let got = acceptor.accept().await;
            (acceptor, got)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stats.outbound_over_cap.get(), 1, "the third connection was refused");
        drop(p1);
        clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (_acceptor, (_c, _, _p3)) = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        drop(p2);
    }
}
