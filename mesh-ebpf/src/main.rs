//! Socket-level capture of pod traffic.
//!
//! `cgroup/connect4` runs when a process in an enrolled pod calls `connect()`. If the destination
//! is a mesh address (a Service VIP or a mesh pod IP), the connect is rewritten to the node
//! proxy's outbound listener and the original destination is remembered under the socket cookie.
//! The source stays the pod's own address: the pod reaches the proxy through its normal route.
//!
//! `sock_ops` runs when that connection is established; by then the source port is known, so
//! the original destination is re-keyed by the 4-tuple the proxy sees after `accept()`. The
//! proxy reads it from `ORIG_DST` (and deletes it).
//!
//! `cgroup/connect6` does the same for IPv6 sockets connecting to IPv4-mapped addresses, which
//! dual-stack clients (gRPC's C core, Java) use for IPv4 destinations.
//!
//! Who is captured is decided by the cgroup alone: a connect is redirected only when it comes
//! from an enrolled pod's cgroup (`ENROLLED`, written by the node proxy from the config and
//! cgroupfs), whatever the socket carries. The node proxy never runs in an enrolled pod's cgroup
//! (it is a hostNetwork pod, and hostNetwork pods are never enrolled), so its own connects to
//! pods and to other nodes (loop avoidance) are never redirected, even when it is placed under
//! the attach cgroup as a DaemonSet is under kubepods.
//!
//! The proxy's sockets also carry `SO_MARK` `PROXY_MARK`, but the mark is no credential: any
//! process with CAP_NET_RAW (which container runtimes give root containers by default; since
//! Linux 5.17 it suffices for `SO_MARK`, CAP_NET_ADMIN is no longer needed) can set it. An
//! earlier version skipped marked sockets before looking at the cgroup, so a pod that set the
//! mark left the mesh. Now the mark only sorts the connects of cgroups outside the enrolled pods
//! in the counters (`proxy_skipped` vs `not_enrolled`); in an enrolled cgroup it changes
//! nothing. The proxy's cgroup id would be the other unforgeable key, but it needs the proxy to
//! find its own cgroup (namespaced in a container) and keeps a second source of truth for a
//! decision the enrolment map already makes; the enrolment check is the one a pod can never
//! change, as it cannot move itself out of its cgroup (cgroupfs is read-only in an unprivileged
//! pod). No map changed shape for this, so `MAP_LAYOUT` stays.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock},
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_reuseport, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SkReuseportContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use core::ptr::read_volatile;
use mesh_common::{CaptureConfig, FourTuple, OrigDst, PodEntry, PodPort, counter};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Return values of cgroup sock_addr programs: 1 lets the syscall proceed.
const ALLOW: i32 = 1;

#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Enrolled pods, keyed by cgroup id. Only their connects are considered for capture.
#[map]
static ENROLLED: HashMap<u64, PodEntry> = HashMap::with_max_entries(4096, 0);

/// Mesh destinations (Service VIPs and mesh pod IPs), keyed by IPv4 address.
#[map]
static MESH_DESTS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// Original destination by socket cookie, between connect and establishment. LRU so that
/// connects that never complete do not fill the map.
#[map]
static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// Original destination by the 4-tuple the proxy sees; the proxy deletes entries it reads.
#[map]
static ORIG_DST: LruHashMap<FourTuple, OrigDst> = LruHashMap::with_max_entries(65536, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *c += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let dst_ip = unsafe { (*ctx.sock_addr).user_ip4 };
    if let Some(proxy_ip4) = capture(&ctx, dst_ip) {
        unsafe { (*ctx.sock_addr).user_ip4 = proxy_ip4 };
    }
    ALLOW
}

/// IPv6 sockets connecting to IPv4-mapped addresses (`::ffff:a.b.c.d`): dual-stack clients
/// such as gRPC's C core use them for IPv4 destinations.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let ip6 = unsafe { (*ctx.sock_addr).user_ip6 };
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_PREFIX {
        return ALLOW;
    }
    if let Some(proxy_ip4) = capture(&ctx, ip6[3]) {
        // The verifier wants the context written one aligned u32 at a time.
        unsafe { (*ctx.sock_addr).user_ip6[3] = proxy_ip4 };
    }
    ALLOW
}

/// `::ffff:0:0/96` in network byte order, as the third word of an IPv6 address.
const V4_MAPPED_PREFIX: u32 = 0xffff_u32.to_be();

/// Decides whether a connect to `dst_ip` (IPv4, network order) is captured; if so records the
/// original destination, points the port at the proxy and returns the proxy's address.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst_ip: u32) -> Option<u32> {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    let sk: *mut bpf_sock = unsafe { sa.__bindgen_anon_1.sk };
    let Some(cfg) = CONFIG.get(mesh_common::CONFIG_INDEX) else {
        count(counter::ERRORS);
        return None;
    };
    // The cgroup first, and only the cgroup: a pod can set the proxy's mark on its sockets
    // (CAP_NET_RAW), it cannot leave its cgroup.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { ENROLLED.get(&cgroup) }.is_none() {
        // Outside every enrolled pod: never captured. The mark tells the proxy's own connects
        // (loop avoidance at work) from other processes', for the counters only.
        let marked = !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark;
        count(if marked { counter::PROXY_SKIPPED } else { counter::NOT_ENROLLED });
        return None;
    }
    if unsafe { MESH_DESTS.get(&dst_ip) }.is_none() {
        count(counter::PASSED);
        return None;
    }
    let dst_port = u16::from_be(sa.user_port as u16);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { ip4: dst_ip, port: dst_port, _pad: 0 };
    if SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
        count(counter::ERRORS);
        warn!(ctx, "capture: cannot record original destination for cookie {}", cookie);
        return None;
    }
    unsafe { (*ctx.sock_addr).user_port = u32::from(cfg.proxy_port.to_be()) };
    count(counter::CAPTURED);
    debug!(ctx, "capture: cgroup {} -> port {} redirected", cgroup, dst_port);
    Some(cfg.proxy_ip4)
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 0;
    }
    // IPv4, or IPv6 carrying IPv4-mapped addresses (see mesh_connect6): the proxy sees IPv4.
    // Every field is loaded unconditionally, then chosen as a scalar: the verifier rejects the
    // shared pointer arithmetic the optimiser produces for per-branch context loads.
    let ops = ctx.ops;
    let (family, l4, r4, l6_prefix, r6_prefix, l6, r6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            read_volatile(&(*ops).remote_ip4),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).remote_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
            read_volatile(&(*ops).remote_ip6[3]),
        )
    };
    let (local_ip4, remote_ip4) = match family {
        AF_INET => (l4, r4),
        AF_INET6 if l6_prefix == V4_MAPPED_PREFIX && r6_prefix == V4_MAPPED_PREFIX => (l6, r6),
        _ => return 0,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { SOCK_ORIG.get(&cookie) }).copied() else {
        return 0;
    };
    // remote_port holds the big-endian port in its upper 16 bits on little-endian hosts.
    let (remote_port, local_port) = unsafe { (read_volatile(&(*ops).remote_port), read_volatile(&(*ops).local_port)) };
    let remote_port = u16::from_be((remote_port >> 16) as u16);
    let key = FourTuple {
        src_ip4: local_ip4,
        dst_ip4: remote_ip4,
        src_port: local_port as u16,
        dst_port: remote_port,
    };
    if ORIG_DST.insert(&key, &orig, 0).is_err() {
        count(counter::ERRORS);
    } else {
        count(counter::TRACKED);
    }
    let _ = SOCK_ORIG.remove(&cookie);
    0
}

/// PeerAuthentication per local mesh pod (and port): STRICT pods accept connections only from
/// the node proxy (which terminates mTLS), never plaintext from outside the mesh.
#[map]
static INBOUND_MTLS: HashMap<PodPort, u8> = HashMap::with_max_entries(16384, 0);

/// Addresses the node proxy uses to reach local pods (and the node's own addresses).
#[map]
static PROXY_SOURCES: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ETH_P_IP: u32 = 0x0800;
/// Return values of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Runs for packets arriving at sockets of the node's pods. A connection attempt (SYN) to a
/// STRICT pod port from anywhere but the node proxy or the pod itself is dropped.
#[cgroup_skb(ingress)]
pub fn mesh_inbound(ctx: SkBuffContext) -> i32 {
    inbound(&ctx).unwrap_or(PASS)
}

#[inline(always)]
fn inbound(ctx: &SkBuffContext) -> Option<i32> {
    // __sk_buff.protocol holds the big-endian EtherType in its low 16 bits.
    if u32::from(u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16)) != ETH_P_IP {
        return Some(PASS);
    }
    // cgroup_skb sees the packet from its IP header on.
    let version_ihl: u8 = ctx.load(0).ok()?;
    let protocol: u8 = ctx.load(9).ok()?;
    if protocol != IPPROTO_TCP as u8 {
        return Some(PASS);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let flags: u8 = ctx.load(ihl + 13).ok()?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Some(PASS);
    }
    let src: u32 = ctx.load(12).ok()?;
    let dst: u32 = ctx.load(16).ok()?;
    let dport = u16::from_be(ctx.load::<u16>(ihl + 2).ok()?);
    let port_key = PodPort { ip4: dst, port: dport, _pad: 0 };
    let pod_key = PodPort { ip4: dst, port: 0, _pad: 0 };
    let mode = unsafe { INBOUND_MTLS.get(&port_key).or_else(|| INBOUND_MTLS.get(&pod_key)) }.copied();
    if mode != Some(mesh_common::MTLS_STRICT) {
        return Some(PASS);
    }
    let loopback = src.to_ne_bytes()[0] == 127;
    if src == dst || loopback || unsafe { PROXY_SOURCES.get(&src) }.is_some() {
        return Some(PASS);
    }
    count(counter::STRICT_DENIED);
    Some(DROP)
}

/// Attached to the node proxy's SO_REUSEPORT listener groups. When a proxy being replaced
/// closes a listener, the kernel runs this for each connection still queued on it (handshake
/// done or in progress, not yet accepted) to pick where it goes instead of resetting it; and for
/// each new connection, to pick a listener. Selecting nothing and passing lets the kernel pick
/// by hash among the listeners still open (its default), so the only effect is that queued
/// connections migrate to the successor's listener, as with `net.ipv4.tcp_migrate_req=1` but
/// without changing the node's sysctls (read-only in most containers).
#[sk_reuseport(migrate)]
pub fn mesh_reuseport(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
}

const SK_PASS: u32 = 1;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
