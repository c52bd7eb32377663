//! The socket fast path (`mesh-node run --sockmap`, off by default).
//!
//! A captured connection's first hop, the pod's socket to the socket the node proxy accepted on
//! its outbound listener, never leaves the node. With the fast path on, `mesh_fast_sockops`
//! puts both sockets in the `FAST_SOCKS` sockhash when they are established, and `mesh_fast_msg`
//! (an `sk_msg` program on that map) moves each write of one straight into the other's receive
//! queue: no TCP segments, no veth, no bridge, no softirq. Only these pairs ever enter the map
//! (see the README, "The socket fast path"): the proxy's side is known by its listener's address
//! in the proxy's own network namespace, the pod's side by the pod address its cgroup was
//! enrolled with, checked at connect.
//!
//! Everything here may fail without taking the capture down: a kernel that refuses a part of it
//! (netns cookies in sock_ops need Linux 5.15) leaves the fast path `unavailable`, reported once
//! as a warning, on `/bpf` and in the metrics, and connections take the TCP path as before.
//!
//! The map, its counters and `FAST_CONFIG` are pinned with the capture's other shared maps and
//! the sock_ops program has a pinned link like the others, so a successor takes them over: the
//! sockets of connections open across a restart stay paired (each keeps the `sk_msg` program it
//! was inserted with), and the successor's programs handle new ones.
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, SockHash},
    programs::{SkMsg, SockOps},
};
use mesh_common::{FastConfig, FourTuple, fast_counter};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{
    backpressure::Backpressure,
    pin::{self, LinkSetup, PinDir},
};

/// The sock_ops program's name, which is also its pinned link's.
pub(super) const FAST_SOCKOPS: &str = "mesh_fast_sockops";
const FAST_MSG: &str = "mesh_fast_msg";
/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("reading the node proxy's network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14): {0}")]
    NetnsCookie(io::Error),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
}

/// Whether writes between pods and the node proxy take the fast path.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum FastPathState {
    /// Not asked for (`--sockmap` not given).
    Off,
    /// Asked for, and every part of it is in the kernel.
    Active,
    /// Asked for, but the kernel refused a part of it: connections take the TCP path.
    Unavailable { reason: String },
}

/// The fast path's kernel state, read by the admin API and the metrics.
pub struct FastPathView {
    state: FastPathState,
    socks: Option<SockHash<MapData, FourTuple>>,
    counters: Option<PerCpuArray<MapData, u64>>,
}

impl FastPathView {
    pub fn state(&self) -> &FastPathState {
        &self.state
    }

    /// The kernel's counters, summed over CPUs, by name (zero when the map is out of reach).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        fast_counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self.counters.as_ref().and_then(|c| c.get(&(i as u32), 0).ok()).map_or(0, |v| v.iter().sum());
                (*name, total)
            })
            .collect()
    }

    /// Sockets in the map now (each open accelerated connection has two).
    pub fn sockets(&self) -> usize {
        self.socks.as_ref().map_or(0, |m| m.keys().filter(Result::is_ok).count())
    }

    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.state).unwrap_or_default();
        v["sockets"] = json!(self.sockets());
        v["counters"] = json!(self.counters());
        v
    }
}

/// Loads the fast path's programs (before maps are taken out of the object, as every program).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), FastPathError> {
    let sockops: &mut SockOps = program(ebpf, FAST_SOCKOPS)?;
    sockops.load().map_err(|source| FastPathError::Program { name: FAST_SOCKOPS, source })?;
    let msg: &mut SkMsg = program(ebpf, FAST_MSG)?;
    msg.load().map_err(|source| FastPathError::Program { name: FAST_MSG, source })
}

/// The fast path's link, when this proxy installed it (it joins the capture's links).
pub(super) struct FastLink {
    pub link: OwnedFd,
    pub prog_id: u32,
    /// The program the pinned link ran before (a previous proxy's), if there was one.
    pub previous: Option<u32>,
}

pub(super) struct Setup {
    pub view: FastPathView,
    pub link: Option<FastLink>,
    pub config: Option<Array<MapData, FastConfig>>,
    /// While the fast path is on: the watch on the proxy sockets' queues.
    pub backpressure: Option<std::sync::Arc<Backpressure>>,
}

/// Sets the fast path up as `wanted` says, once the capture's own links are in place and the
/// programs loaded (`loaded` tells whether they did). Never fails: what goes wrong leaves the
/// fast path off (`Unavailable`) and is logged once.
pub(super) fn setup(ebpf: &mut Ebpf, pins: &PinDir, wanted: bool, loaded: Result<(), FastPathError>, cgroup: BorrowedFd<'_>, cgroup_id: u64) -> Setup {
    let mut config: Option<Array<MapData, FastConfig>> = take(ebpf, "FAST_CONFIG").map_err(|e| warn!("socket fast path: {e}")).ok();
    let socks: Option<SockHash<MapData, FourTuple>> = take(ebpf, "FAST_SOCKS").map_err(|e| warn!("socket fast path: {e}")).ok();
    let counters = take(ebpf, "FAST_COUNTERS").map_err(|e| warn!("socket fast path: {e}")).ok();
    let stop = take(ebpf, "FAST_STOP");
    if !wanted {
        switch_off(pins, config.as_mut());
        return Setup { view: FastPathView { state: FastPathState::Off, socks, counters }, link: None, config, backpressure: None };
    }
    // Without the backpressure map the fast path is not turned on at all.
    let enabled = loaded.and_then(|()| stop).and_then(|stop| Ok((enable(ebpf, pins, config.as_mut(), socks.as_ref(), cgroup, cgroup_id)?, stop)));
    match enabled {
        Ok((link, stop)) => {
            info!("socket fast path on: pod <-> node proxy writes move between sockets in the kernel");
            Setup {
                view: FastPathView { state: FastPathState::Active, socks, counters },
                link: Some(link),
                config,
                backpressure: Some(Backpressure::new(stop)),
            }
        }
        Err(e) => {
            warn!("socket fast path unavailable, connections take the TCP path: {e}");
            switch_off(pins, config.as_mut());
            Setup { view: FastPathView { state: FastPathState::Unavailable { reason: e.to_string() }, socks, counters }, link: None, config, backpressure: None }
        }
    }
}

/// The `sk_msg` program on the map first (sockets take the map's program when they join it),
/// then the sock_ops link that fills the map, then the switch connects read.
fn enable(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    config: Option<&mut Array<MapData, FastConfig>>,
    socks: Option<&SockHash<MapData, FourTuple>>,
    cgroup: BorrowedFd<'_>,
    cgroup_id: u64,
) -> Result<FastLink, FastPathError> {
    let config = config.ok_or(FastPathError::Missing("FAST_CONFIG"))?;
    let socks = socks.ok_or(FastPathError::Missing("FAST_SOCKS"))?;
    let proxy_netns = netns_cookie().map_err(FastPathError::NetnsCookie)?;
    let msg: &mut SkMsg = program(ebpf, FAST_MSG)?;
    msg.attach(socks.fd()).map_err(|source| FastPathError::Program { name: FAST_MSG, source })?;
    let prog = ebpf.program(FAST_SOCKOPS).ok_or(FastPathError::Missing(FAST_SOCKOPS))?;
    let prog_fd = prog.fd().map_err(|source| FastPathError::Program { name: FAST_SOCKOPS, source })?;
    let prog_id = prog.info().map_err(|source| FastPathError::Program { name: FAST_SOCKOPS, source })?.id();
    let (link, setup) = pins.install_link(FAST_SOCKOPS, prog_fd.as_fd(), cgroup, cgroup_id, pin::BPF_CGROUP_SOCK_OPS)?;
    let previous = match setup {
        LinkSetup::Created => None,
        LinkSetup::TookOver { previous_prog } => Some(previous_prog),
    };
    config
        .set(0, FastConfig { enabled: 1, _pad: 0, proxy_netns }, 0)
        .map_err(|source| FastPathError::Map { name: "FAST_CONFIG", source })?;
    Ok(FastLink { link, prog_id, previous })
}

/// Turns the fast path off for new connections: the switch connects read goes off and the
/// pinned sock_ops link goes (a previous proxy's, which would keep inserting sockets for a
/// program this proxy does not run and look like a successor's; or ours, when a start fails
/// after installing it while the previous proxy, still serving, never had one).
pub(super) fn switch_off(pins: &PinDir, config: Option<&mut Array<MapData, FastConfig>>) {
    if let Some(c) = config {
        let _ = c.set(0, FastConfig::default(), 0);
    }
    match pins.remove_link(FAST_SOCKOPS) {
        Ok(true) => info!("socket fast path: link removed"),
        Ok(false) => {}
        Err(e) => warn!("socket fast path: removing its link: {e}"),
    }
}

/// The cookie of the network namespace this process runs in.
fn netns_cookie() -> io::Result<u64> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 buffer of the length passed.
    if unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FastPathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(FastPathError::Missing(name))?;
    T::try_from(map).map_err(|source| FastPathError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, FastPathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(FastPathError::Missing(name))?;
    prog.try_into().map_err(|source| FastPathError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/bpf` and `meshctl bpf` read these keys; a kernel that refused the fast path says why.
    #[test]
    fn view_reports_state_reason_sockets_and_every_counter() {
        let view = FastPathView { state: FastPathState::Unavailable { reason: "no netns cookie".into() }, socks: None, counters: None };
        let v = view.to_json();
        assert_eq!(v["state"], "unavailable");
        assert_eq!(v["reason"], "no netns cookie");
        assert_eq!(v["sockets"], 0);
        let counters = v["counters"].as_object().unwrap();
        assert_eq!(counters.len(), fast_counter::COUNT as usize);
        assert!(counters.values().all(|n| n == 0), "{v}");
        let off = FastPathView { state: FastPathState::Off, socks: None, counters: None }.to_json();
        assert_eq!(off["state"], "off");
        assert!(off.get("reason").is_none(), "{off}");
    }
}
