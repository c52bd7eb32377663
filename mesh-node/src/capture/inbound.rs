//! What the kernel's `mesh_inbound` knows of each local mesh pod: how a connection attempt that
//! is not the node proxy's own (plaintext from outside the mesh: another node's pod, a pod of an
//! unenrolled namespace, a host process, anything SNATed to the node) is judged, in the kernel,
//! at the pod's own socket.
//!
//! Such a caller has no identity, so Istio's rules reduce to its source address and the
//! destination port: no principal and no namespace, `ipBlocks`/`notIpBlocks` against the real
//! source address, `ports`/`notPorts` against the pod's port. The proxy compiles, with the
//! same evaluator it uses for its own connections ([`crate::l4::authz::evaluate`]), each pod and
//! port into a verdict table over source addresses: every CIDR the pod's policies name cuts the
//! address space into regions on which every rule answers the same, so one evaluation per
//! region, stored as a longest-prefix-match entry, is the whole policy for that port.
//!
//! Ports a policy or a port-level PeerAuthentication names, and the kubelet's probe ports, get
//! entries of their own; every other port shares the pod-wide entry.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use mesh_common::{INBOUND_PROBE, MTLS_OPEN, MTLS_STRICT, PodPort, VERDICT_ALLOW, VERDICT_DENY};

use crate::config::{AuthorizationPolicy, Cluster, IpBlock, MtlsMode, Pod};
use crate::l4::authz::{Request, SourceIp, evaluate};

/// A verdict table: (address prefix length 0..=128, address, verdict), IPv4 as IPv4-mapped
/// IPv6. Always holds `::/0`, so every source finds an answer.
pub type Table = Vec<(u8, u128, u8)>;

/// How attempts to one pod port are judged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// `None`: every source is allowed.
    pub table: Option<Table>,
    pub mode: u8,
    pub flags: u8,
}

/// Every local mesh pod's judgements: `port: 0` is the pod-wide one.
pub fn compile(cluster: &Cluster, node: &str) -> BTreeMap<PodPort, Judgement> {
    let mut out = BTreeMap::new();
    let port_level: BTreeSet<u16> = cluster.peer_authentications().flat_map(|pa| pa.port_level_mtls.keys().copied()).collect();
    for pod in cluster.pods().filter(|p| p.node == node && cluster.is_enrolled(p)) {
        let IpAddr::V4(ip4) = pod.ip else { continue };
        let key = |port| PodPort { ip4: super::ip_key(ip4), port, _pad: 0 };
        let policies = cluster.authorization_policies_for(pod);
        let named = policy_ports(&policies);
        let blocks = address_blocks(&policies);
        // Any port no rule names stands for all of them.
        let other = (1..=u16::MAX).find(|p| !named.contains(p)).unwrap_or(u16::MAX);
        let pod_wide = judge(cluster, pod, &policies, &blocks, 0, other);
        let mut ports: BTreeSet<u16> = pod.container_ports.iter().map(|(_, p)| *p).collect();
        ports.extend(&port_level);
        ports.extend(&named);
        ports.extend(&pod.probe_ports);
        for port in ports {
            let j = judge(cluster, pod, &policies, &blocks, port, port);
            if j != pod_wide {
                out.insert(key(port), j);
            }
        }
        out.insert(key(0), pod_wide);
    }
    out
}

fn judge(cluster: &Cluster, pod: &Pod, policies: &[&AuthorizationPolicy], blocks: &BTreeSet<(u128, u8)>, port: u16, as_port: u16) -> Judgement {
    let mode = if cluster.mtls_mode_for(pod, port) == MtlsMode::Strict { MTLS_STRICT } else { MTLS_OPEN };
    let flags = if port != 0 && pod.probe_ports.contains(&port) { INBOUND_PROBE } else { 0 };
    let table = if policies.is_empty() { None } else { table(policies, blocks, as_port) };
    Judgement { table, mode, flags }
}

/// Every port a rule of `policies` names (`ports` and `notPorts`).
fn policy_ports(policies: &[&AuthorizationPolicy]) -> BTreeSet<u16> {
    let ops = policies.iter().flat_map(|p| &p.rules).flat_map(|r| &r.to);
    ops.flat_map(|o| o.ports.iter().chain(&o.not_ports)).copied().collect()
}

/// Every address block a rule of `policies` names, as IPv6 prefixes (IPv4 mapped).
fn address_blocks(policies: &[&AuthorizationPolicy]) -> BTreeSet<(u128, u8)> {
    let sources = policies.iter().flat_map(|p| &p.rules).flat_map(|r| &r.from);
    sources.flat_map(|s| s.ip_blocks.iter().chain(&s.not_ip_blocks)).map(prefix_of).collect()
}

const V4_MAPPED: (u128, u8) = (0xffff_0000_0000, 96);

fn prefix_of(b: &IpBlock) -> (u128, u8) {
    let (bits, len) = match b.addr {
        IpAddr::V4(a) => (V4_MAPPED.0 | u128::from(u32::from(a)), 96 + b.prefix_len),
        IpAddr::V6(a) => (u128::from(a), b.prefix_len),
    };
    (bits & mask(len), len)
}

fn mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

fn last(prefix: (u128, u8)) -> u128 {
    prefix.0 | !mask(prefix.1)
}

fn inside(inner: (u128, u8), outer: (u128, u8)) -> bool {
    inner.1 > outer.1 && inner.0 & mask(outer.1) == outer.0
}

/// The address an evaluation stands for: IPv4-mapped ones are IPv4, as the kernel's IPv4
/// packets are.
fn address(bits: u128) -> IpAddr {
    if bits & mask(96) == V4_MAPPED.0 { IpAddr::V4(Ipv4Addr::from(bits as u32)) } else { IpAddr::V6(Ipv6Addr::from(bits)) }
}

/// The verdict table for a caller without identity on `port`; `None` when it allows every
/// source. The longest prefix containing an address decides which blocks hold it (blocks are
/// nested or disjoint), so the verdict of any one address of a region left by the prefixes
/// inside it is the region's.
fn table(policies: &[&AuthorizationPolicy], blocks: &BTreeSet<(u128, u8)>, port: u16) -> Option<Table> {
    // IPv4 and IPv6 sources never share a region: no IPv6 block holds an IPv4 caller.
    let mut prefixes: BTreeSet<(u128, u8)> = blocks.clone();
    prefixes.insert((0, 0));
    prefixes.insert(V4_MAPPED);
    let mut out = Table::new();
    let mut any_deny = false;
    for &p in &prefixes {
        let mut inner: Vec<(u128, u8)> = prefixes.iter().copied().filter(|q| inside(*q, p)).collect();
        inner.sort();
        let Some(rep) = uncovered(p, &inner) else { continue };
        let req = Request { source_principal: None, source_namespace: None, source_ip: SourceIp::Known(address(rep)), destination_port: port };
        let verdict = if evaluate(policies, &req).is_allow() { VERDICT_ALLOW } else { VERDICT_DENY };
        any_deny |= verdict == VERDICT_DENY;
        out.push((p.1, p.0, verdict));
    }
    if !any_deny {
        return None;
    }
    // Every region without an answer of its own must still find one: the longest enclosing
    // prefix with an entry. Fully covered prefixes have none, so their inner ones answer.
    if !out.iter().any(|(len, bits, _)| (*bits, *len) == (0, 0)) {
        out.push((0, 0, VERDICT_DENY));
    }
    out.sort();
    Some(out)
}

/// The verdict of `table` for a source address (IPv4 mapped), as the kernel's longest-prefix
/// match gives it.
pub fn verdict(table: &Table, addr: u128) -> u8 {
    table.iter().filter(|(len, net, _)| addr & mask(*len) == *net).max_by_key(|(len, _, _)| *len).map_or(VERDICT_DENY, |e| e.2)
}

/// The first address of `p` no prefix of `inner` (sorted, all inside `p`) holds.
fn uncovered(p: (u128, u8), inner: &[(u128, u8)]) -> Option<u128> {
    let mut candidate = p.0;
    for q in inner {
        if q.0 > candidate {
            break;
        }
        candidate = candidate.max(last(*q).checked_add(1)?);
    }
    (candidate <= last(p)).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(text: &str) -> (u128, u8) {
        prefix_of(&IpBlock::parse(text).unwrap())
    }

    fn lookup(t: &Table, ip: IpAddr) -> u8 {
        let bits = match ip {
            IpAddr::V4(a) => V4_MAPPED.0 | u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        verdict(t, bits)
    }

    fn policy(yaml: &str) -> AuthorizationPolicy {
        let c = Cluster::from_yaml_files(vec![("p.yaml", yaml)]).unwrap_or_else(|e| panic!("{e}"));
        c.authorization_policies().next().unwrap().clone()
    }

    const DENY_POD_CIDR: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [10.244.1.0/24], notIpBlocks: [10.244.1.7]}}]
";

    #[test]
    fn deny_block_with_hole() {
        let p = policy(DENY_POD_CIDR);
        let blocks = address_blocks(&[&p]);
        let t = table(&[&p], &blocks, 80).expect("a DENY on a block refuses someone");
        let v = |s: &str| lookup(&t, s.parse().unwrap());
        assert_eq!(v("10.244.1.9"), VERDICT_DENY);
        assert_eq!(v("10.244.1.7"), VERDICT_ALLOW);
        assert_eq!(v("10.244.0.9"), VERDICT_ALLOW);
        assert_eq!(v("fd00::1"), VERDICT_ALLOW);
    }

    #[test]
    fn allow_principals_refuses_every_plaintext_caller() {
        let p = policy(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/ns/sa/bff]}}]
",
        );
        let t = table(&[&p], &address_blocks(&[&p]), 80).unwrap();
        assert_eq!(lookup(&t, "10.0.0.1".parse().unwrap()), VERDICT_DENY);
        assert_eq!(lookup(&t, "fd00::1".parse().unwrap()), VERDICT_DENY);
    }

    #[test]
    fn allow_blocks_and_ports() {
        let p = policy(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from: [{source: {ipBlocks: [192.168.0.0/16, 'fd00::/8']}}]
    to: [{operation: {ports: ['8080']}}]
",
        );
        let blocks = address_blocks(&[&p]);
        let t = table(&[&p], &blocks, 8080).unwrap();
        let v = |s: &str| lookup(&t, s.parse().unwrap());
        assert_eq!(v("192.168.3.4"), VERDICT_ALLOW);
        assert_eq!(v("fd12::1"), VERDICT_ALLOW);
        assert_eq!(v("10.0.0.1"), VERDICT_DENY);
        assert_eq!(v("2001:db8::1"), VERDICT_DENY);
        // Another port: no rule matches, the ALLOW policy refuses everyone.
        let other = table(&[&p], &blocks, 9090).unwrap();
        assert_eq!(lookup(&other, "192.168.3.4".parse().unwrap()), VERDICT_DENY);
        assert_eq!(policy_ports(&[&p]), BTreeSet::from([8080]));
    }

    #[test]
    fn allow_all_needs_no_table() {
        let p = policy(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules: [{}]
",
        );
        assert_eq!(table(&[&p], &address_blocks(&[&p]), 80), None);
    }

    #[test]
    fn fully_covered_prefix_is_skipped() {
        assert_eq!(uncovered(block("10.0.0.0/31"), &[block("10.0.0.0/32"), block("10.0.0.1/32")]), None);
        assert_eq!(uncovered(block("10.0.0.0/30"), &[block("10.0.0.0/32"), block("10.0.0.1/32")]), Some(block("10.0.0.2/32").0));
        assert_eq!(uncovered((0, 0), &[(0, 1), (1 << 127, 1)]), None);
    }
}
