//! Recovering where a captured connection was going.
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use mesh_common::{FourTuple, OrigDst};

/// Read side of the kernel's `ORIG_DST` map: the original destination of a captured connection,
/// keyed by the 4-tuple the proxy sees on the accepted socket.
pub struct OrigDstTable(HashMap<MapData, FourTuple, OrigDst>);

impl OrigDstTable {
    pub(super) fn new(map: HashMap<MapData, FourTuple, OrigDst>) -> Self {
        Self(map)
    }

    /// `peer` is the pod's address (the accepted socket's peer), `local` the listener address
    /// the pod was redirected to. Entries are left for the LRU to evict: a later connection
    /// with the same 4-tuple overwrites its entry before the proxy can accept it.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (peer.ip(), local.ip()) else {
            return None;
        };
        let key = FourTuple {
            src_ip4: u32::from_ne_bytes(src.octets()),
            dst_ip4: u32::from_ne_bytes(dst.octets()),
            src_port: peer.port(),
            dst_port: local.port(),
        };
        let orig = self.0.get(&key, 0).ok()?;
        let ip = std::net::Ipv4Addr::from(orig.ip4.to_ne_bytes());
        Some(SocketAddr::V4(SocketAddrV4::new(ip, orig.port)))
    }
}
