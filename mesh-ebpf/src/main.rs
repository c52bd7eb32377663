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
//! pod).
//!
//! `mesh_inbound` (`cgroup_skb/ingress`) judges every TCP connection attempt to a mesh pod that
//! is not the node proxy's own: STRICT refuses it, otherwise the pod's verdict table (its
//! AuthorizationPolicies read for a caller without identity) decides by source address. The
//! proxy's attempts are known by 4-tuple, recorded by `mesh_sockops` for sockets of the proxy's
//! cgroup (`TRUSTED_CGROUPS`, learnt through `WHOAMI`); the kubelet's by `mesh_kubelet`, attached
//! to the kubelet's cgroup alone, and let through only to declared probe ports.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sk_reuseport, sock_ops},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash, lpm_trie::{Key, LpmTrie}},
    programs::{SkBuffContext, SkMsgContext, SkReuseportContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use core::ptr::read_volatile;
use mesh_common::{
    CaptureConfig, FastConfig, FourTuple, INBOUND_PROBE, InboundEntry, MTLS_STRICT, OrigDst, PlainConn, PlainKey, PlaintextStats, PodEntry, PodPort,
    TRUSTED_KUBELET, TRUSTED_PROXY, VERDICT_ALLOW, VerdictKey, counter, fast_counter,
};

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
    let Some(pod) = (unsafe { ENROLLED.get(&cgroup) }).copied() else {
        note_trusted(ctx, cgroup);
        // Outside every enrolled pod: never captured. The mark tells the proxy's own connects
        // (loop avoidance at work) from other processes', for the counters only.
        let marked = !sk.is_null() && unsafe { (*sk).mark } == cfg.proxy_mark;
        count(if marked { counter::PROXY_SKIPPED } else { counter::NOT_ENROLLED });
        return None;
    };
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
    if pod.ip4 != 0 && FAST_CONFIG.get(0).is_some_and(|f| f.enabled != 0) {
        // The pod's address as its cgroup says: the fast path takes this socket only if it
        // really is the pod's (see `fast_pod_socket`).
        let _ = SOCK_POD.insert(&cookie, &pod.ip4, 0);
    }
    count(counter::CAPTURED);
    debug!(ctx, "capture: cgroup {} -> port {} redirected", cgroup, dst_port);
    Some(cfg.proxy_ip4)
}

/// Connects of the node proxy's own cgroup (and the proxy's probe of which cgroup that is):
/// the socket is remembered by cookie, so that `mesh_sockops` can trust its connection attempt
/// by 4-tuple once the source port is chosen.
#[inline(always)]
fn note_trusted(ctx: &SockAddrContext, cgroup: u64) {
    let role = unsafe { TRUSTED_CGROUPS.get(&cgroup) }.copied();
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(slot) = WHOAMI.get_ptr_mut(&cookie) {
        // The proxy asks which cgroup it runs in by connecting a socket it named here.
        unsafe { *slot = cgroup };
    }
    if let Some(role) = role {
        if SOCK_ROLE.insert(&cookie, &role, 0).is_err() {
            count(counter::ERRORS);
        }
    }
}

/// Cgroups whose connections pods may trust (`TRUSTED_PROXY`: the node proxy's, found by its
/// `WHOAMI` probe). A process cannot leave its cgroup, nor join another, without write access
/// to cgroupfs, which pods and unprivileged host processes do not have.
#[map]
static TRUSTED_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(64, 0);

/// The node proxy's question "which cgroup am I in?": it names a socket's cookie here and
/// connects it; `note_trusted` writes the connecting cgroup's id.
#[map]
static WHOAMI: HashMap<u64, u64> = HashMap::with_max_entries(8, 0);

/// Sockets of trusted cgroups between connect and the connection attempt, by cookie.
#[map]
static SOCK_ROLE: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Connection attempts of trusted processes in flight, by the 4-tuple their SYN carries
/// (source = the trusted socket). Only a SYN is judged at the pod, so an entry lives until the
/// connection is established; attempts that never complete age out of the LRU.
#[map]
static TRUSTED_CONNS: LruHashMap<FourTuple, u8> = LruHashMap::with_max_entries(16384, 0);

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if let Some(role) = unsafe { SOCK_ROLE.get(&cookie) }.copied() {
                trust(&ctx, role);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => plaintext_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            // A tracked plaintext connection closing (the callback is only asked for those).
            if ctx.arg(1) == TCP_CLOSE {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let _ = PLAIN_CONNS.remove(&cookie);
                let _ = REVOKED.remove(&cookie);
            }
        }
        _ => {}
    }
    0
}

const TCP_CLOSE: u32 = 7;

/// Plaintext connection attempts a mesh pod's policy allowed, until established.
#[map]
static PLAIN_PENDING: LruHashMap<PlainKey, u32> = LruHashMap::with_max_entries(16384, 0);

/// Open plaintext connections to mesh pods, by the pod socket's cookie: the proxy re-judges
/// them on every policy change.
#[map]
static PLAIN_CONNS: LruHashMap<u64, PlainConn> = LruHashMap::with_max_entries(65536, 0);

/// Cookies of open plaintext connections a policy change denies: every packet to them is
/// dropped. `REVOKING[0]` holds how many there are, so that the common case costs no lookup.
#[map]
static REVOKED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);
#[map]
static REVOKING: Array<u32> = Array::with_max_entries(1, 0);

/// A mesh pod's socket established a connection: if its attempt was a plaintext one the
/// pod's policy allowed, it is tracked (and its close reported) so a policy change can cut it.
#[inline(always)]
fn plaintext_established(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let (family, r4, r6, remote_port, local_port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).remote_ip4),
            [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ],
            read_volatile(&(*ops).remote_port),
            read_volatile(&(*ops).local_port),
        )
    };
    let src = match family {
        AF_INET => mapped(r4),
        AF_INET6 => {
            let mut a = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let w = r6[i].to_ne_bytes();
                a[i * 4] = w[0];
                a[i * 4 + 1] = w[1];
                a[i * 4 + 2] = w[2];
                a[i * 4 + 3] = w[3];
                i += 1;
            }
            a
        }
        _ => return,
    };
    let key = PlainKey { src, sport: u16::from_be((remote_port >> 16) as u16), dport: local_port as u16 };
    let Some(pod) = (unsafe { PLAIN_PENDING.get(&key) }).copied() else { return };
    let _ = PLAIN_PENDING.remove(&key);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let conn = PlainConn { src, pod, dport: key.dport, _pad: 0 };
    if PLAIN_CONNS.insert(&cookie, &conn, 0).is_err() {
        count(counter::ERRORS);
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// An IPv4 address (network order) as IPv4-mapped IPv6 bytes.
#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12] = b[0];
    a[13] = b[1];
    a[14] = b[2];
    a[15] = b[3];
    a
}

/// Attached to the kubelet's cgroup only: every connection attempt it sees is the kubelet's
/// (its probes among them), which pods let through to the probe ports their spec declares.
#[sock_ops]
pub fn mesh_kubelet(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => trust(&ctx, TRUSTED_KUBELET),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if let Some(t) = four_tuple(&ctx) {
                let _ = TRUSTED_CONNS.remove(&t);
            }
        }
        _ => {}
    }
    0
}

/// Runs right before the SYN is sent (the source port is chosen by then).
#[inline(always)]
fn trust(ctx: &SockOpsContext, role: u8) {
    let Some(t) = four_tuple(ctx) else { return };
    if TRUSTED_CONNS.insert(&t, &role, 0).is_err() {
        count(counter::ERRORS);
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = unsafe { SOCK_ORIG.get(&cookie) }.copied();
    let trusted = unsafe { SOCK_ROLE.get(&cookie) }.is_some();
    if orig.is_none() && !trusted {
        return;
    }
    let Some(key) = four_tuple(ctx) else { return };
    if trusted {
        let _ = TRUSTED_CONNS.remove(&key);
        let _ = SOCK_ROLE.remove(&cookie);
    }
    let Some(orig) = orig else { return };
    if ORIG_DST.insert(&key, &orig, 0).is_err() {
        count(counter::ERRORS);
    } else {
        count(counter::TRACKED);
    }
    let _ = SOCK_ORIG.remove(&cookie);
}

/// The connection's 4-tuple, local side as the source, for IPv4 and IPv4-mapped IPv6 sockets.
#[inline(always)]
fn four_tuple(ctx: &SockOpsContext) -> Option<FourTuple> {
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
        _ => return None,
    };
    // remote_port holds the big-endian port in its upper 16 bits on little-endian hosts.
    let (remote_port, local_port) = unsafe { (read_volatile(&(*ops).remote_port), read_volatile(&(*ops).local_port)) };
    let remote_port = u16::from_be((remote_port >> 16) as u16);
    Some(FourTuple { src_ip4: local_ip4, dst_ip4: remote_ip4, src_port: local_port as u16, dst_port: remote_port })
}

/// How each local mesh pod (and port, where a port differs) judges connection attempts that do
/// not come from the node proxy: STRICT refuses them all, otherwise the pod's verdict table
/// (its AuthorizationPolicies read for a caller with no identity) decides by source address.
/// Every local mesh pod has a pod-wide entry, so every plaintext attempt is counted.
#[map]
static INBOUND: HashMap<PodPort, InboundEntry> = HashMap::with_max_entries(16384, 0);

/// Verdict tables: (class, source address) -> `VERDICT_ALLOW` / `VERDICT_DENY`, longest prefix
/// wins. Each table has a `::/0` entry, so a lookup in a live class always answers.
#[map]
static VERDICTS: LpmTrie<VerdictKey, u8> = LpmTrie::with_max_entries(65536, 0);

/// Plaintext connection attempts per local mesh pod (by IPv4 address), for telemetry.
#[map]
static PLAINTEXT: LruPerCpuHashMap<u32, PlaintextStats> = LruPerCpuHashMap::with_max_entries(4096, 0);

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
/// Return values of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Runs for packets arriving at sockets of the node's pods, the last hop every path to a pod
/// crosses (tunnel, same-node proxy, another node's pod, a host process, NodePort SNAT). A
/// connection attempt (SYN) to a mesh pod that is not the node proxy's own is judged here:
/// refused by STRICT, else by the pod's verdict table.
#[cgroup_skb(ingress)]
pub fn mesh_inbound(ctx: SkBuffContext) -> i32 {
    inbound(&ctx).unwrap_or(PASS)
}

/// A TCP connection attempt as the pod's socket receives it.
struct Syn {
    /// The pod (by its IPv4 address) and the destination port.
    pod: u32,
    dport: u16,
    /// The caller, IPv4 as IPv4-mapped IPv6, network order.
    src: [u8; 16],
    sport: u16,
    /// The IPv4 4-tuple (trusted connections are IPv4); `None` for IPv6.
    tuple: Option<FourTuple>,
    /// To the pod's own address, or from loopback.
    local: bool,
}

#[inline(always)]
fn inbound(ctx: &SkBuffContext) -> Option<i32> {
    if REVOKING.get(0).is_some_and(|n| *n > 0) {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
        if unsafe { REVOKED.get(&cookie) }.is_some() {
            count(counter::REVOKED_DROPS);
            return Some(DROP);
        }
    }
    // __sk_buff.protocol holds the big-endian EtherType in its low 16 bits.
    let ethertype = u32::from(u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16));
    let syn = match ethertype {
        ETH_P_IP => syn4(ctx)?,
        ETH_P_IPV6 => match syn6(ctx) {
            Ok(syn) => syn?,
            // A transport we cannot find behind the extension headers: refused if the pod
            // judges anything, since it could be a SYN.
            Err(()) => {
                let pod = pod_by_cgroup(ctx)?;
                let key = PodPort { ip4: pod, port: 0, _pad: 0 };
                unsafe { INBOUND.get(&key) }?;
                count(counter::UNPARSED);
                return Some(DROP);
            }
        },
        _ => return Some(PASS),
    };
    let port_key = PodPort { ip4: syn.pod, port: syn.dport, _pad: 0 };
    let pod_key = PodPort { ip4: syn.pod, port: 0, _pad: 0 };
    let Some(entry) = (unsafe { INBOUND.get(&port_key).or_else(|| INBOUND.get(&pod_key)) }).copied() else {
        return Some(PASS);
    };
    if syn.local {
        return Some(PASS);
    }
    if let Some(tuple) = syn.tuple {
        match unsafe { TRUSTED_CONNS.get(&tuple) }.copied() {
            Some(TRUSTED_PROXY) => {
                count(counter::TRUSTED);
                return Some(PASS);
            }
            Some(TRUSTED_KUBELET) if entry.flags & INBOUND_PROBE != 0 => {
                count(counter::PROBES);
                tally(syn.pod, |s| s.probes += 1);
                return Some(PASS);
            }
            // The kubelet anywhere else is a host process like any other.
            _ => {}
        }
    }
    if entry.mode == MTLS_STRICT {
        count(counter::STRICT_DENIED);
        tally(syn.pod, |s| s.strict_denied += 1);
        return Some(DROP);
    }
    if entry.class != 0 {
        let key = Key::new(32 + 128, VerdictKey { class_be: entry.class.to_be(), addr: syn.src });
        // No answer in a live class cannot happen (each has ::/0); refuse if it does.
        if VERDICTS.get(&key).copied() != Some(VERDICT_ALLOW) {
            count(counter::AUTHZ_DENIED);
            tally(syn.pod, |s| s.authz_denied += 1);
            return Some(DROP);
        }
    }
    count(counter::PLAINTEXT_ALLOWED);
    tally(syn.pod, |s| s.allowed += 1);
    let pending = PlainKey { src: syn.src, sport: syn.sport, dport: syn.dport };
    let _ = PLAIN_PENDING.insert(&pending, &syn.pod, 0);
    Some(PASS)
}

#[inline(always)]
fn tally(pod: u32, f: impl FnOnce(&mut PlaintextStats)) {
    match PLAINTEXT.get_ptr_mut(&pod) {
        // Per-CPU value: no other writer races with us.
        Some(s) => f(unsafe { &mut *s }),
        None => {
            let mut s = PlaintextStats::default();
            f(&mut s);
            let _ = PLAINTEXT.insert(&pod, &s, 0);
        }
    }
}

/// `None` when the packet is not a TCP connection attempt (nothing to judge).
#[inline(always)]
fn syn4(ctx: &SkBuffContext) -> Option<Syn> {
    // cgroup_skb sees the packet from its IP header on.
    let version_ihl: u8 = ctx.load(0).ok()?;
    let protocol: u8 = ctx.load(9).ok()?;
    if protocol != IPPROTO_TCP as u8 {
        return None;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let flags: u8 = ctx.load(ihl + 13).ok()?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    let src: u32 = ctx.load(12).ok()?;
    let dst: u32 = ctx.load(16).ok()?;
    let sport = u16::from_be(ctx.load::<u16>(ihl).ok()?);
    let dport = u16::from_be(ctx.load::<u16>(ihl + 2).ok()?);
    Some(Syn {
        pod: dst,
        dport,
        src: mapped(src),
        sport,
        tuple: Some(FourTuple { src_ip4: src, dst_ip4: dst, src_port: sport, dst_port: dport }),
        local: src == dst || src.to_ne_bytes()[0] == 127,
    })
}

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;

/// `Ok(None)`: not a TCP connection attempt; `Err`: the transport header is out of reach.
#[inline(always)]
fn syn6(ctx: &SkBuffContext) -> Result<Option<Syn>, ()> {
    let mut next: u8 = ctx.load(6).map_err(|_| ())?;
    let mut off = IPV6_HEADER_LEN;
    // Hop-by-hop, routing and destination options may precede TCP; a few are walked, more
    // (or a fragment header) leave the transport unknown.
    let mut i = 0;
    while i < 4 {
        if next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS {
            break;
        }
        let n: u8 = ctx.load(off).map_err(|_| ())?;
        let len: u8 = ctx.load(off + 1).map_err(|_| ())?;
        next = n;
        off += (usize::from(len) + 1) * 8;
        i += 1;
    }
    if next != IPPROTO_TCP as u8 {
        return match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT => Err(()),
            _ => Ok(None),
        };
    }
    let flags: u8 = ctx.load(off + 13).map_err(|_| ())?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Ok(None);
    }
    // The pod: IPv6 addresses are not in the maps, the receiving socket's cgroup is.
    let Some(pod) = pod_by_cgroup(ctx) else { return Ok(None) };
    let sport = u16::from_be(ctx.load::<u16>(off).map_err(|_| ())?);
    let dport = u16::from_be(ctx.load::<u16>(off + 2).map_err(|_| ())?);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let mut j = 0;
    while j < 16 {
        src[j] = ctx.load(8 + j).map_err(|_| ())?;
        dst[j] = ctx.load(24 + j).map_err(|_| ())?;
        j += 1;
    }
    let loopback = src == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    Ok(Some(Syn { pod, dport, src, sport, tuple: None, local: loopback || src == dst }))
}

const IPPROTO_FRAGMENT: u8 = 44;

/// The enrolled pod owning the socket the packet is for.
#[inline(always)]
fn pod_by_cgroup(ctx: &SkBuffContext) -> Option<u32> {
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    unsafe { ENROLLED.get(&cgroup) }.map(|e| e.ip4)
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

/// The socket fast path (`--sockmap`). A pod's captured connection to the node proxy is two
/// sockets on one node: the pod's (in its network namespace) and the one the proxy accepted.
/// Both go into `FAST_SOCKS`, keyed by their own 4-tuple (local side first); `mesh_fast_msg`
/// then moves every write of one straight into the other's receive queue, so the bytes skip
/// TCP/IP, the veth and the bridge. Only these pairs are ever in the map: the proxy applies
/// the mesh's policy to what it accepts, and no plaintext pod-to-pod connection is involved.
#[map]
static FAST_CONFIG: Array<FastConfig> = Array::with_max_entries(1, 0);

/// A captured socket's pod address, by cookie, from its connect (where the cgroup tells the
/// pod) to its establishment; LRU, as connects that never complete leave entries behind.
#[map]
static SOCK_POD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

#[map]
static FAST_SOCKS: SockHash<FourTuple> = SockHash::with_max_entries(65536, 0);

/// Proxy sockets (by their key) whose queue the proxy found over its limit: writes to them take
/// TCP from then on, whose receive window holds the sender back. Never cleared while the
/// connection lives: a redirect after TCP data could overtake it in the reader's queues.
#[map]
static FAST_STOP: LruHashMap<FourTuple, u8> = LruHashMap::with_max_entries(16384, 0);

#[map]
static FAST_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fast_counter::COUNT, 0);

#[inline(always)]
fn fast_count(slot: u32, n: u64) {
    if let Some(c) = FAST_COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *c += n };
    }
}

const BPF_NOEXIST: u64 = 1;
const BPF_F_INGRESS: u64 = 1;

/// Its own program, on its own link, so that a kernel without a part of it (netns cookies in
/// sock_ops came with 5.15) loses only the fast path, and `--sockmap` off costs nothing here.
#[sock_ops]
pub fn mesh_fast_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => fast_pod_socket(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => fast_proxy_socket(&ctx),
        _ => {}
    }
    0
}

/// A pod's captured socket, established to the proxy: in the map if its local address is the
/// one its pod's cgroup was enrolled with (a pod that binds another pod's address, or fakes the
/// proxy in its own namespace, must not take that pod's place in the map).
#[inline(always)]
fn fast_pod_socket(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pod_ip) = (unsafe { SOCK_POD.get(&cookie) }).copied() else { return };
    let _ = SOCK_POD.remove(&cookie);
    let Some(cfg) = CONFIG.get(mesh_common::CONFIG_INDEX) else { return };
    let Some(key) = four_tuple(ctx) else { return };
    if key.src_ip4 != pod_ip || key.dst_ip4 != cfg.proxy_ip4 || key.dst_port != cfg.proxy_port {
        fast_count(fast_counter::REFUSED, 1);
        return;
    }
    fast_insert(ctx, key, fast_counter::POD_SOCKETS);
}

/// A connection the proxy accepted on its outbound listener, in the proxy's own network
/// namespace (where no pod has sockets).
#[inline(always)]
fn fast_proxy_socket(ctx: &SockOpsContext) {
    let Some(fast) = FAST_CONFIG.get(0).copied() else { return };
    if fast.enabled == 0 {
        return;
    }
    let Some(cfg) = CONFIG.get(mesh_common::CONFIG_INDEX) else { return };
    let Some(key) = four_tuple(ctx) else { return };
    if key.src_ip4 != cfg.proxy_ip4 || key.src_port != cfg.proxy_port {
        return;
    }
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != fast.proxy_netns {
        return;
    }
    fast_insert(ctx, key, fast_counter::PROXY_SOCKETS);
}

#[inline(always)]
fn fast_insert(ctx: &SockOpsContext, mut key: FourTuple, slot: u32) {
    // NOEXIST: an entry is never replaced; the kernel removes a socket's entry when it closes.
    match FAST_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST) {
        Ok(()) => fast_count(slot, 1),
        Err(_) => fast_count(fast_counter::INSERT_ERRORS, 1),
    }
}

/// Runs for every write of a socket in `FAST_SOCKS`: the peer is the socket whose key is this
/// one's 4-tuple seen from the other end. Found, the write goes straight to its receive queue;
/// not (yet) there, it goes through TCP as usual (never dropped).
#[sk_msg]
pub fn mesh_fast_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let (family, l4, r4, l6_prefix, r6_prefix, l6, r6, remote_port, local_port) = unsafe {
        (
            read_volatile(&(*md).family),
            read_volatile(&(*md).local_ip4),
            read_volatile(&(*md).remote_ip4),
            read_volatile(&(*md).local_ip6[2]),
            read_volatile(&(*md).remote_ip6[2]),
            read_volatile(&(*md).local_ip6[3]),
            read_volatile(&(*md).remote_ip6[3]),
            read_volatile(&(*md).remote_port),
            read_volatile(&(*md).local_port),
        )
    };
    let (local_ip4, remote_ip4) = match family {
        AF_INET => (l4, r4),
        AF_INET6 if l6_prefix == V4_MAPPED_PREFIX && r6_prefix == V4_MAPPED_PREFIX => (l6, r6),
        _ => return SK_PASS,
    };
    let mut peer = FourTuple {
        src_ip4: remote_ip4,
        dst_ip4: local_ip4,
        src_port: u16::from_be((remote_port >> 16) as u16),
        dst_port: local_port as u16,
    };
    if unsafe { FAST_STOP.get(&peer) }.is_some() {
        fast_count(fast_counter::STOPPED_MSGS, 1);
        return SK_PASS;
    }
    let size = u64::from(ctx.size());
    if FAST_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS) == SK_PASS as _ {
        fast_count(fast_counter::REDIRECTED_MSGS, 1);
        fast_count(fast_counter::REDIRECTED_BYTES, size);
    } else {
        fast_count(fast_counter::UNPAIRED_MSGS, 1);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
