//! Backpressure for the socket fast path ([`super::sockmap`]).
//!
//! A write redirected into a socket lands in its queue whatever the queue holds: the kernel
//! checks no receive buffer, so a pod writing to a connection the proxy cannot forward would
//! make the kernel queue without bound. The proxy watches the queue of each socket it accepted
//! on the outbound listener (`FIONREAD`, which for a socket in a sockmap counts the redirected
//! bytes waiting) every [`SWEEP`], and when one passes [`LIMIT`] it names the socket in
//! `FAST_STOP`: the pod's writes to it take TCP from then on, whose receive window holds the pod
//! back. The stop is for the connection's life: a redirect after TCP data could overtake that
//! data in the reader's queues (the kernel reads the redirected queue first). So what one
//! connection can queue is bounded by `LIMIT` plus what arrives within one sweep.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use mesh_common::FourTuple;
use tokio::net::TcpStream;
use tracing::{debug, warn};

/// Bytes a proxy socket may hold in its redirected queue before its connection leaves the fast
/// path for TCP.
pub const LIMIT: usize = 8 * 1024 * 1024;
/// How often the watched sockets' queues are read (only while there are any).
pub const SWEEP: Duration = Duration::from_millis(5);

struct Watched {
    fd: RawFd,
    key: FourTuple,
    stopped: bool,
}

pub struct Backpressure {
    stop: Mutex<HashMap<MapData, FourTuple, u8>>,
    watched: Mutex<BTreeMap<u64, Watched>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
    /// Connections taken off the fast path so far.
    pub stopped: AtomicU64,
}

/// Keeps a connection watched while it lives.
pub struct Watch {
    bp: Arc<Backpressure>,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let gone = self.bp.watched.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        if let Some(w) = gone.filter(|w| w.stopped) {
            // The socket is closing: its entry would only take room in the LRU.
            let _ = self.bp.stop.lock().unwrap_or_else(|e| e.into_inner()).remove(&w.key);
        }
    }
}

impl Backpressure {
    pub(super) fn new(stop: HashMap<MapData, FourTuple, u8>) -> Arc<Self> {
        Arc::new(Self { stop: Mutex::new(stop), watched: Mutex::new(BTreeMap::new()), next: AtomicU64::new(0), wake: tokio::sync::Notify::new(), stopped: AtomicU64::new(0) })
    }

    /// Watches a connection accepted on the outbound listener (IPv4: the fast path's).
    pub fn watch(self: &Arc<Self>, stream: &TcpStream) -> Option<Watch> {
        let key = key(stream.local_addr().ok()?, stream.peer_addr().ok()?)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Watched { fd: stream.as_raw_fd(), key, stopped: false });
        self.wake.notify_one();
        Some(Watch { bp: self.clone(), id })
    }

    /// Runs for the life of the process.
    pub fn spawn(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                if self.watched.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
                    self.wake.notified().await;
                }
                tokio::time::sleep(SWEEP).await;
                self.sweep();
            }
        });
    }

    fn sweep(&self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        for w in watched.values_mut().filter(|w| !w.stopped) {
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int. The descriptor is the connection's; between its
            // close and the Watch's drop it may name another socket, whose count is then read
            // (at worst a tuple already gone is stopped).
            if unsafe { libc::ioctl(w.fd, libc::FIONREAD, &mut queued) } != 0 || (queued as usize) <= LIMIT {
                continue;
            }
            match self.stop.lock().unwrap_or_else(|e| e.into_inner()).insert(w.key, 1, 0) {
                Ok(()) => {
                    w.stopped = true;
                    self.stopped.fetch_add(1, Ordering::Relaxed);
                    debug!(queued, "socket fast path: connection over its queue limit, its writes now take TCP");
                }
                Err(e) => warn!("socket fast path: eBPF map FAST_STOP: {e}"),
            }
        }
    }
}

/// The proxy socket's key in `FAST_SOCKS`: its own 4-tuple, local side first.
fn key(local: SocketAddr, peer: SocketAddr) -> Option<FourTuple> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    Some(FourTuple { src_ip4: super::ip_key(v4(local.ip())?), dst_ip4: super::ip_key(v4(peer.ip())?), src_port: local.port(), dst_port: peer.port() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_the_proxy_sockets_own_tuple_as_the_kernel_stores_it() {
        let k = key("172.30.0.1:15001".parse().unwrap(), "10.244.0.10:40754".parse().unwrap()).unwrap();
        assert_eq!(k.src_ip4, u32::from_ne_bytes([172, 30, 0, 1]));
        assert_eq!(k.dst_ip4, u32::from_ne_bytes([10, 244, 0, 10]));
        assert_eq!((k.src_port, k.dst_port), (15001, 40754));
        let mapped = key("[::ffff:172.30.0.1]:15001".parse().unwrap(), "[::ffff:10.244.0.10]:1".parse().unwrap()).unwrap();
        assert_eq!(mapped.src_ip4, k.src_ip4);
        assert!(key("[fd00::1]:15001".parse().unwrap(), "[fd00::2]:1".parse().unwrap()).is_none());
    }
}
