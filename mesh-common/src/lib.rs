//! Types shared by the kernel programs (`mesh-ebpf`) and the node daemon (`mesh-node`).
//!
//! Every type here is `#[repr(C)]` and plain old data: the kernel and user side read the same
//! bytes out of BPF maps. Addresses are stored as the kernel hands them to us (network byte
//! order, as a native `u32`), ports in host byte order.
#![no_std]

/// Port of the node proxy's outbound listener (captured pod connections land here).
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the node proxy's inbound tunnel listener (other node proxies connect here).
pub const INBOUND_PORT: u16 = 15008;
/// `SO_MARK` the proxy puts on its own sockets. Not what keeps them from being captured (only
/// enrolled pods' cgroups are, and the proxy is never in one): a pod with CAP_NET_RAW can set
/// it too. It only lets the counters tell the proxy's connects apart (`proxy_skipped`).
pub const PROXY_MARK: u32 = 0x539;

/// Version of the layout of the maps a new proxy takes over from the previous one (pinned in
/// bpffs): bump it whenever a shared map's key, value, type or size changes, so a new release
/// starts fresh maps instead of misreading the old ones' bytes.
pub const MAP_LAYOUT: u32 = 2;

/// Index into the `CONFIG` array map.
pub const CONFIG_INDEX: u32 = 0;

/// Where captured connections are sent. Written by the daemon before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// IPv4 address of the node proxy as seen from pods (network byte order).
    pub proxy_ip4: u32,
    /// Outbound listener port (host byte order).
    pub proxy_port: u16,
    pub _pad: u16,
    /// The proxy's mark: connects outside enrolled pods carrying it count as `proxy_skipped`.
    /// It exempts nothing (a pod can set it).
    pub proxy_mark: u32,
}

/// Value of the `ENROLLED` map, keyed by the cgroup id (inode) of a pod's cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's IPv4 address (network byte order); informational, for `bpftool map dump`.
    pub ip4: u32,
    pub _pad: u32,
}

/// Value of the `MESH_DESTS` map, keyed by an IPv4 address (network byte order).
pub const DEST_SERVICE_VIP: u8 = 1;
pub const DEST_POD_IP: u8 = 2;

/// Where a captured socket was really going. Keyed first by socket cookie (at connect time,
/// when the source port is not yet known), then by the connection's 4-tuple once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order.
    pub ip4: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A TCP connection as the proxy sees it after accept: the pod's address is the source,
/// the proxy's listener the destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FourTuple {
    /// Network byte order.
    pub src_ip4: u32,
    /// Network byte order.
    pub dst_ip4: u32,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
}

/// Key of the `INBOUND` map: a local mesh pod's address and a port (0 = every other port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPort {
    /// Network byte order.
    pub ip4: u32,
    /// Host byte order; 0 for the pod-wide setting.
    pub port: u16,
    pub _pad: u16,
}

/// Value of the `INBOUND` map: how connection attempts to a local mesh pod's port that do not
/// come from the node proxy are judged in the kernel (plaintext from outside the mesh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundEntry {
    /// Verdict table in `VERDICTS` for plaintext callers, by source address; 0: every source
    /// is allowed (no AuthorizationPolicy can refuse an unauthenticated caller here).
    pub class: u32,
    /// `MTLS_STRICT` or `MTLS_OPEN`.
    pub mode: u8,
    /// `INBOUND_PROBE`: the Pod spec declares a kubelet probe on this port.
    pub flags: u8,
    pub _pad: u16,
}

/// PeerAuthentication mode for inbound connections: STRICT refuses every plaintext caller.
pub const MTLS_STRICT: u8 = 1;
/// PERMISSIVE (or DISABLE): plaintext callers are judged by the verdict table.
pub const MTLS_OPEN: u8 = 2;
/// `InboundEntry::flags`: the kubelet's own connections to this port pass (its probes).
pub const INBOUND_PROBE: u8 = 1;

/// Data of a `VERDICTS` LPM key: a verdict table and a source address, IPv4 as IPv4-mapped
/// IPv6 (`::ffff:a.b.c.d`), in network byte order. The prefix length counts the 32 bits of
/// `class` too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictKey {
    /// Big-endian, so that the class is the first 32 bits the trie compares.
    pub class_be: u32,
    pub addr: [u8; 16],
}

/// Values of the `VERDICTS` map.
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Who a trusted connection belongs to (`TRUSTED_CGROUPS`, `TRUSTED_CONNS`): the node proxy's
/// connections to pods pass everything; the kubelet's pass only to declared probe ports.
pub const TRUSTED_PROXY: u8 = 1;
pub const TRUSTED_KUBELET: u8 = 2;

/// Value of `PLAINTEXT`, per local mesh pod (keyed by its IPv4 address): connection attempts
/// from outside the mesh, as judged in the kernel. Per CPU; the proxy sums.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaintextStats {
    pub allowed: u64,
    /// Refused by STRICT.
    pub strict_denied: u64,
    /// Refused by an AuthorizationPolicy.
    pub authz_denied: u64,
    /// Kubelet probes let through to a declared probe port.
    pub probes: u64,
}

/// Key of `PLAIN_PENDING`: a plaintext connection attempt a mesh pod's policy allowed, until
/// the pod's socket is established (the caller's address, IPv4 mapped, and both ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlainKey {
    pub src: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
}

/// Value of `PLAIN_CONNS` (keyed by the pod socket's cookie): an open plaintext connection to
/// a mesh pod, which the proxy re-judges on every policy change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlainConn {
    pub src: [u8; 16],
    /// The pod's IPv4 address, network byte order.
    pub pod: u32,
    /// Host byte order.
    pub dport: u16,
    pub _pad: u16,
}

/// Value of `FAST_CONFIG` (one entry): the socket fast path (sockmap redirection between a pod's
/// captured socket and the node proxy's accepted one). Written by the proxy; `enabled` is 0
/// unless the proxy runs with `--sockmap` and the kernel took every part of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastConfig {
    pub enabled: u32,
    pub _pad: u32,
    /// Network namespace cookie of the node proxy (`SO_NETNS_COOKIE`): only sockets accepted on
    /// the proxy's outbound listener in this namespace join the fast path as the proxy's side.
    pub proxy_netns: u64,
}

/// Slots of the `FAST_COUNTERS` per-CPU array (the socket fast path).
pub mod fast_counter {
    /// Pods' captured sockets put in the fast path's socket map.
    pub const POD_SOCKETS: u32 = 0;
    /// The node proxy's accepted sockets (outbound listener) put in the socket map.
    pub const PROXY_SOCKETS: u32 = 1;
    /// Sockets the map refused (full, or the 4-tuple already there).
    pub const INSERT_ERRORS: u32 = 2;
    /// Captured sockets left out because their address is not their pod's (a pod claiming
    /// another's address) or their peer is not the proxy.
    pub const REFUSED: u32 = 3;
    /// Writes moved to the peer socket in the kernel, and their bytes.
    pub const REDIRECTED_MSGS: u32 = 4;
    pub const REDIRECTED_BYTES: u32 = 5;
    /// Writes of a socket in the map whose peer is not (yet) there: sent through TCP as usual.
    pub const UNPAIRED_MSGS: u32 = 6;
    /// Writes sent through TCP because the proxy stopped redirects to its socket (its queue
    /// passed the limit: backpressure).
    pub const STOPPED_MSGS: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] =
        ["pod_sockets", "proxy_sockets", "insert_errors", "refused", "redirected_msgs", "redirected_bytes", "unpaired_msgs", "stopped_msgs"];
}

/// Slots of the `COUNTERS` per-CPU array.
pub mod counter {
    /// Connects redirected to the node proxy.
    pub const CAPTURED: u32 = 0;
    /// Connects from enrolled pods to destinations outside the mesh, left alone.
    pub const PASSED: u32 = 1;
    /// Connects the capture wanted to redirect but could not (map full, missing config).
    pub const ERRORS: u32 = 2;
    /// Connects made by the proxy itself (marked sockets outside enrolled pods), never
    /// redirected. A marked socket of an enrolled pod is captured like any other.
    pub const PROXY_SKIPPED: u32 = 3;
    /// Connects from cgroups that are not enrolled pods (unmarked).
    pub const NOT_ENROLLED: u32 = 4;
    /// Established captured connections whose original destination was recorded by 4-tuple.
    pub const TRACKED: u32 = 5;
    /// Plaintext connection attempts from outside the mesh dropped at a STRICT pod.
    pub const STRICT_DENIED: u32 = 6;
    /// Plaintext connection attempts dropped by an AuthorizationPolicy.
    pub const AUTHZ_DENIED: u32 = 7;
    /// Plaintext connection attempts a mesh pod's policy allowed.
    pub const PLAINTEXT_ALLOWED: u32 = 8;
    /// Kubelet connections let through to a declared probe port.
    pub const PROBES: u32 = 9;
    /// Connection attempts of the node proxy (or the kubelet) recognised by their 4-tuple.
    pub const TRUSTED: u32 = 10;
    /// IPv6 packets to a judged pod whose transport header could not be found (dropped).
    pub const UNPARSED: u32 = 11;
    /// Packets of open plaintext connections a policy change denied, dropped.
    pub const REVOKED_DROPS: u32 = 12;
    pub const COUNT: u32 = 13;
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "passed",
        "errors",
        "proxy_skipped",
        "not_enrolled",
        "tracked",
        "strict_denied",
        "authz_denied",
        "plaintext_allowed",
        "probes",
        "trusted",
        "unparsed",
        "revoked_drops",
    ];
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    unsafe impl aya::Pod for CaptureConfig {}
    unsafe impl aya::Pod for PodEntry {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for FourTuple {}
    unsafe impl aya::Pod for PodPort {}
    unsafe impl aya::Pod for InboundEntry {}
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for PlaintextStats {}
    unsafe impl aya::Pod for PlainKey {}
    unsafe impl aya::Pod for PlainConn {}
    unsafe impl aya::Pod for FastConfig {}
}
