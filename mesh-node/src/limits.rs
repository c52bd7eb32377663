//! Istio `connectionPool` enforced as Envoy's per-cluster circuit breakers. Over a limit the
//! caller fails fast (503, response flag UO) instead of piling load on a struggling upstream.
//!
//! As in Istio, a limit of 0 is "not set" and takes the default (2^32-1, i.e. unlimited).
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::oneshot;

use crate::config::ConnectionPool;

/// Envoy's and Istio's default circuit-breaker threshold.
const UNLIMITED: u64 = u32::MAX as u64;
/// Istio's default `tcp.connectTimeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Istio's default `http.idleTimeout` and `tcp.idleTimeout`.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Which circuit breaker tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("upstream request limit reached")]
    Requests,
    #[error("upstream pending request queue full")]
    PendingRequests,
    #[error("upstream retry limit reached")]
    Retries,
    #[error("upstream connection limit reached")]
    Connections,
}

/// One cluster's limits. Cheap to clone (shared state); permits hold it alive.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Mutex<Settings>,
    requests: Mutex<RequestSlots>,
    retries: Counter,
    connections: Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    connect_timeout: Duration,
    max_requests_per_connection: Option<u32>,
    idle_timeout: Option<Duration>,
    tcp_idle_timeout: Option<Duration>,
}

/// Requests in flight and the FIFO of those waiting for a slot.
struct RequestSlots {
    in_flight: u64,
    max_in_flight: u64,
    max_pending: u64,
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<()>,
}

/// The resolved thresholds for one config.
struct Thresholds {
    max_in_flight: u64,
    max_pending: u64,
    max_retries: u64,
    max_connections: u64,
    settings: Settings,
}

impl Thresholds {
    fn new(pool: Option<&ConnectionPool>, http2: bool) -> Self {
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        let http = pool.and_then(|p| p.http.as_ref());
        let limit = |v: Option<u32>| v.filter(|&v| v > 0).map_or(UNLIMITED, u64::from);
        let max_connections = limit(tcp.and_then(|t| t.max_connections));
        let (max_in_flight, max_pending) = if http2 {
            // HTTP/2 multiplexes: requests are limited directly and never queue.
            (limit(http.and_then(|h| h.http2_max_requests)), 0)
        } else {
            // HTTP/1 carries one request per connection, so the connection limit bounds the
            // requests in flight and the rest wait for a connection.
            (
                max_connections,
                limit(http.and_then(|h| h.http1_max_pending_requests)),
            )
        };
        let idle = |configured: Option<Duration>| match configured {
            // Envoy reads a zero idle timeout as "never time out".
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(DEFAULT_IDLE_TIMEOUT),
        };
        Thresholds {
            max_in_flight,
            max_pending,
            max_retries: limit(http.and_then(|h| h.max_retries)),
            max_connections,
            settings: Settings {
                connect_timeout: tcp
                    .and_then(|t| t.connect_timeout)
                    .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
                max_requests_per_connection: http
                    .and_then(|h| h.max_requests_per_connection)
                    .filter(|&n| n > 0),
                idle_timeout: idle(http.and_then(|h| h.idle_timeout)),
                tcp_idle_timeout: idle(tcp.and_then(|t| t.idle_timeout)),
            },
        }
    }
}

impl Limits {
    pub fn new(pool: Option<&ConnectionPool>, http2: bool) -> Self {
        let t = Thresholds::new(pool, http2);
        Limits {
            inner: Arc::new(Inner {
                settings: Mutex::new(t.settings),
                requests: Mutex::new(RequestSlots {
                    in_flight: 0,
                    max_in_flight: t.max_in_flight,
                    max_pending: t.max_pending,
                    waiters: VecDeque::new(),
                    next_id: 0,
                }),
                retries: Counter::new(t.max_retries),
                connections: Counter::new(t.max_connections),
            }),
        }
    }

    /// Applies a reloaded config in place. Permits already held stay valid; if a limit shrank
    /// below what is in use, new requests overflow (or queue) until enough are released.
    /// Requests already queued keep their place even if the new queue limit is smaller.
    pub fn update(&self, pool: Option<&ConnectionPool>, http2: bool) {
        let t = Thresholds::new(pool, http2);
        *lock(&self.inner.settings) = t.settings;
        self.inner
            .retries
            .max
            .store(t.max_retries, Ordering::Release);
        self.inner
            .connections
            .max
            .store(t.max_connections, Ordering::Release);
        let mut slots = lock(&self.inner.requests);
        slots.max_in_flight = t.max_in_flight;
        slots.max_pending = t.max_pending;
        slots.hand_off();
    }

    /// A request slot, waiting in FIFO order behind earlier requests when HTTP/1's slots are
    /// all taken and the queue has room. Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire_request(&self) -> Result<RequestPermit, Overflow> {
        let (id, granted) = {
            let mut slots = lock(&self.inner.requests);
            if slots.waiters.is_empty() && slots.in_flight < slots.max_in_flight {
                slots.in_flight += 1;
                return Ok(RequestPermit {
                    inner: Arc::clone(&self.inner),
                });
            }
            if slots.waiters.len() as u64 >= slots.max_pending {
                return Err(if slots.max_pending == 0 {
                    Overflow::Requests
                } else {
                    Overflow::PendingRequests
                });
            }
            let id = slots.next_id;
            slots.next_id += 1;
            let (grant, granted) = oneshot::channel();
            slots.waiters.push_back(Waiter { id, grant });
            (id, granted)
        };
        let mut wait = Waiting {
            inner: &self.inner,
            id,
            granted,
            done: false,
        };
        let result = (&mut wait.granted).await;
        wait.done = true;
        match result {
            Ok(()) => Ok(RequestPermit {
                inner: Arc::clone(&self.inner),
            }),
            // Only if the waiter was dropped from the queue without a slot, which nothing does.
            Err(_) => Err(Overflow::PendingRequests),
        }
    }

    /// A retry slot: at most `maxRetries` retries in flight across the cluster.
    pub fn try_acquire_retry(&self) -> Result<RetryPermit, Overflow> {
        if self.inner.retries.try_acquire() {
            Ok(RetryPermit {
                inner: Arc::clone(&self.inner),
            })
        } else {
            Err(Overflow::Retries)
        }
    }

    /// An L4 connection slot: at most `tcp.maxConnections` open.
    pub fn try_acquire_connection(&self) -> Result<ConnectionPermit, Overflow> {
        if self.inner.connections.try_acquire() {
            Ok(ConnectionPermit {
                inner: Arc::clone(&self.inner),
            })
        } else {
            Err(Overflow::Connections)
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        lock(&self.inner.settings).connect_timeout
    }

    /// `http.maxRequestsPerConnection`; `None` = unlimited (0 or unset).
    pub fn max_requests_per_connection(&self) -> Option<u32> {
        lock(&self.inner.settings).max_requests_per_connection
    }

    /// `http.idleTimeout` for upstream HTTP connections: Istio's 1h when unset, `None` when
    /// configured as 0 (no timeout).
    pub fn idle_timeout(&self) -> Option<Duration> {
        lock(&self.inner.settings).idle_timeout
    }

    /// `tcp.idleTimeout` for L4 connections, with the same defaults as [`Self::idle_timeout`].
    pub fn tcp_idle_timeout(&self) -> Option<Duration> {
        lock(&self.inner.settings).tcp_idle_timeout
    }

    /// Requests holding a slot and requests queued for one.
    pub fn requests(&self) -> (u64, usize) {
        let slots = lock(&self.inner.requests);
        (slots.in_flight, slots.waiters.len())
    }
}

impl RequestSlots {
    /// Gives free slots to waiters in order. A waiter whose future is gone cannot take one,
    /// so the slot goes to the next.
    fn hand_off(&mut self) {
        while self.in_flight < self.max_in_flight {
            let Some(waiter) = self.waiters.pop_front() else {
                return;
            };
            if waiter.grant.send(()).is_ok() {
                self.in_flight += 1;
            }
        }
    }

    fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.hand_off();
    }
}

/// Cleans up after an `acquire_request` future dropped while queued.
struct Waiting<'a> {
    inner: &'a Inner,
    id: u64,
    granted: oneshot::Receiver<()>,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut slots = lock(&self.inner.requests);
        if let Some(pos) = slots.waiters.iter().position(|w| w.id == self.id) {
            slots.waiters.remove(pos);
        } else if self.granted.try_recv().is_ok() {
            // A slot was handed over (under this same lock) but never picked up: pass it on.
            slots.release();
        }
    }
}

/// Holds one request slot until dropped.
pub struct RequestPermit {
    inner: Arc<Inner>,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        lock(&self.inner.requests).release();
    }
}

/// Holds one retry slot until dropped.
pub struct RetryPermit {
    inner: Arc<Inner>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.inner.retries.release();
    }
}

/// Holds one L4 connection slot until dropped.
pub struct ConnectionPermit {
    inner: Arc<Inner>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.inner.connections.release();
    }
}

/// A lock-free counting limit whose maximum can change under it.
struct Counter {
    used: AtomicU64,
    max: AtomicU64,
}

impl Counter {
    fn new(max: u64) -> Self {
        Counter {
            used: AtomicU64::new(0),
            max: AtomicU64::new(max),
        }
    }

    fn try_acquire(&self) -> bool {
        let max = self.max.load(Ordering::Acquire);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < max).then_some(used + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HttpSettings, TcpSettings};

    fn pool(max_connections: u32, pending: u32, h2_requests: u32, retries: u32) -> ConnectionPool {
        ConnectionPool {
            tcp: Some(TcpSettings {
                max_connections: Some(max_connections),
                connect_timeout: Some(Duration::from_millis(250)),
                ..Default::default()
            }),
            http: Some(HttpSettings {
                http1_max_pending_requests: Some(pending),
                http2_max_requests: Some(h2_requests),
                max_retries: Some(retries),
                max_requests_per_connection: Some(1),
                idle_timeout: Some(Duration::ZERO),
                ..Default::default()
            }),
        }
    }

    /// Polls once: `Some` if the future finished without waiting.
    fn now_or_never<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn defaults_are_istios() {
        let l = Limits::new(None, false);
        assert_eq!(l.connect_timeout(), Duration::from_secs(10));
        assert_eq!(l.max_requests_per_connection(), None);
        assert_eq!(l.idle_timeout(), Some(Duration::from_secs(3600)));
        assert_eq!(l.tcp_idle_timeout(), Some(Duration::from_secs(3600)));
        let permits: Vec<_> = (0..1000)
            .filter_map(|_| l.try_acquire_retry().ok())
            .collect();
        assert_eq!(permits.len(), 1000);
        // 0 means "unset" in Istio, not "nothing allowed".
        let l = Limits::new(Some(&pool(0, 0, 0, 0)), false);
        assert!(l.try_acquire_connection().is_ok());
        assert!(l.try_acquire_retry().is_ok());
        let l = Limits::new(Some(&pool(1, 1, 1, 1)), true);
        assert_eq!(l.connect_timeout(), Duration::from_millis(250));
        assert_eq!(l.max_requests_per_connection(), Some(1));
        assert_eq!(l.idle_timeout(), None);
    }

    #[tokio::test]
    async fn http1_queues_up_to_the_pending_limit_then_overflows() {
        let l = Limits::new(Some(&pool(1, 1, 100, 1)), false);
        let first = l.acquire_request().await;
        assert!(first.is_ok());
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.acquire_request().await.map(|_| ()) });
        while l.requests().1 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            l.acquire_request().await.err(),
            Some(Overflow::PendingRequests)
        );
        assert_eq!(l.requests(), (1, 1));
        drop(first);
        assert!(matches!(queued.await, Ok(Ok(()))));
        // The queued request's permit went away with its task.
        assert_eq!(l.requests(), (0, 0));
    }

    #[tokio::test]
    async fn queued_requests_get_freed_slots_in_order() {
        let l = Limits::new(Some(&pool(1, 10, 100, 1)), false);
        let held = l.acquire_request().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..3 {
            let (waiter, tx) = (l.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(permit) = waiter.acquire_request().await {
                    let _ = tx.send(n);
                    tokio::task::yield_now().await;
                    drop(permit);
                }
            });
            while l.requests().1 < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.extend(rx.recv().await);
        }
        assert_eq!(order, [0, 1, 2]);
    }

    #[test]
    fn a_cancelled_waiter_leaves_the_queue_and_never_leaks_a_slot() {
        let l = Limits::new(Some(&pool(1, 1, 100, 1)), false);
        let held = now_or_never(l.acquire_request());
        assert!(matches!(held, Some(Ok(_))));
        // Poll once (queued), then drop: the queue must be empty again.
        assert!(now_or_never(l.acquire_request()).is_none());
        assert_eq!(l.requests(), (1, 0));
        // Granted but dropped before it noticed: the slot must come back.
        let mut waiting = Box::pin(l.acquire_request());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        drop(held);
        assert_eq!(l.requests(), (1, 0));
        drop(waiting);
        assert_eq!(l.requests(), (0, 0));
        assert!(matches!(now_or_never(l.acquire_request()), Some(Ok(_))));
    }

    #[test]
    fn http2_limits_requests_without_a_queue() {
        let l = Limits::new(Some(&pool(1, 10, 2, 1)), true);
        let a = now_or_never(l.acquire_request());
        let b = now_or_never(l.acquire_request());
        assert!(matches!((&a, &b), (Some(Ok(_)), Some(Ok(_)))));
        assert!(matches!(
            now_or_never(l.acquire_request()),
            Some(Err(Overflow::Requests))
        ));
        drop(a);
        assert!(matches!(now_or_never(l.acquire_request()), Some(Ok(_))));
    }

    #[test]
    fn retries_and_connections_overflow_and_release() {
        let l = Limits::new(Some(&pool(2, 1, 1, 1)), false);
        let r = l.try_acquire_retry();
        assert!(r.is_ok());
        assert_eq!(l.try_acquire_retry().err(), Some(Overflow::Retries));
        drop(r);
        assert!(l.try_acquire_retry().is_ok());
        let c1 = l.try_acquire_connection();
        let c2 = l.try_acquire_connection();
        assert!(c1.is_ok() && c2.is_ok());
        assert_eq!(
            l.try_acquire_connection().err(),
            Some(Overflow::Connections)
        );
        drop(c2);
        assert!(l.try_acquire_connection().is_ok());
    }

    #[tokio::test]
    async fn update_applies_in_place_and_wakes_waiters() {
        let l = Limits::new(Some(&pool(1, 5, 1, 1)), false);
        let held = l.acquire_request().await;
        let l2 = l.clone();
        let queued = tokio::spawn(async move { l2.acquire_request().await.map(|_| ()) });
        while l.requests().1 == 0 {
            tokio::task::yield_now().await;
        }
        // Raising the connection limit hands the waiter a slot right away.
        l.update(Some(&pool(2, 5, 1, 3)), false);
        assert!(matches!(queued.await, Ok(Ok(()))));
        let retries: Vec<_> = (0..5).filter_map(|_| l.try_acquire_retry().ok()).collect();
        assert_eq!(retries.len(), 3);
        // Shrinking below what is in use: new requests overflow until enough are released.
        l.update(Some(&pool(1, 1, 1, 1)), true);
        assert_eq!(l.acquire_request().await.err(), Some(Overflow::Requests));
        drop(held);
        assert!(l.acquire_request().await.is_ok());
        assert_eq!(l.connect_timeout(), Duration::from_millis(250));
        l.update(None, false);
        assert_eq!(l.connect_timeout(), Duration::from_secs(10));
    }
}
