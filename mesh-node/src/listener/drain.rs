//! Draining on shutdown: stop accepting, let what is in flight finish, then go.
//!
//! On SIGTERM the daemon closes its listeners (a successor bound to the same ports with
//! SO_REUSEPORT gets every new connection, and the kernel migrates the ones still queued in our
//! accept queues to it) and moves to [`Phase::Draining`]: HTTP/1.1 responses carry
//! `connection: close` so each client reconnects (to the successor) after its current exchange,
//! instead of having an idle connection closed under a request it may be sending; HTTP/2
//! clients and peer node proxies get GOAWAY and open new connections for new streams; opaque
//! TCP connections and tunnel streams keep flowing. When every connection is done, or the
//! drain timeout passes, [`Phase::Closing`] closes what is left (idle HTTP/1.1 connections
//! first, gracefully) and the process exits.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Listeners are closed; connections finish what they are doing.
    Draining,
    /// The drain is over: close whatever is still open.
    Closing,
}

/// The daemon's side: moves the phase on and counts open connections.
pub struct Drain {
    phase: watch::Sender<Phase>,
    open: Arc<Open>,
}

#[derive(Default)]
struct Open {
    count: AtomicUsize,
    /// Notified each time a connection ends.
    ended: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Self { phase: watch::channel(Phase::Running).0, open: Arc::default() }
    }
}

impl Drain {
    /// What a connection watches.
    pub fn signal(&self) -> DrainSignal {
        DrainSignal(self.phase.subscribe())
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn track(&self) -> ConnGuard {
        self.open.count.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self.open.clone())
    }

    pub fn open_connections(&self) -> usize {
        self.open.count.load(Ordering::SeqCst)
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Waits until no connection is open, at most `timeout`; returns how many still are.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ended = self.open.ended.notified();
            let open = self.open_connections();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return self.open_connections();
            }
        }
    }
}

/// An open connection, as counted by [`Drain::track`].
pub struct ConnGuard(Arc<Open>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

/// A connection's view of the drain.
#[derive(Clone)]
pub struct DrainSignal(watch::Receiver<Phase>);

impl DrainSignal {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Resolves once the phase is at least `phase` (never, if the daemon is gone without
    /// getting there: then the connection's task is dropped with the runtime anyway).
    pub async fn reached(&mut self, phase: Phase) {
        if self.0.wait_for(|p| *p >= phase).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tracked_connections_and_signals_phases() {
        let drain = Drain::default();
        let mut signal = drain.signal();
        assert!(!signal.is_draining());
        let guard = drain.track();
        let _second = drain.track();
        drop(_second);
        assert_eq!(drain.open_connections(), 1);
        drain.set(Phase::Draining);
        signal.reached(Phase::Draining).await;
        assert!(signal.is_draining());
        assert_eq!(drain.wait_idle(Duration::from_millis(20)).await, 1, "still open: the guard is alive");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(guard);
        });
        assert_eq!(drain.wait_idle(Duration::from_secs(5)).await, 0);
        release.await.unwrap();
        drain.set(Phase::Closing);
        assert_eq!(signal.phase(), Phase::Closing);
    }
}
