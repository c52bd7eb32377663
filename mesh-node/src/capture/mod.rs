//! Loads the eBPF capture programs, attaches them to the node's pod cgroup, and keeps their maps
//! in step with the cluster config.
//!
//! The programs' links and shared maps are pinned in bpffs ([`pin`]), so the capture outlives
//! the process: a new proxy started beside a running one takes the links over (each now runs
//! the new program) and the live maps with them, and the old proxy, seeing its programs
//! replaced, leaves everything in place when it stops. A proxy that stops with no successor
//! ([`Capture::release`]) and `mesh-node uninstall` detach and unpin everything. A proxy that
//! crashes leaves the capture attached (pods' connections are refused until a proxy runs
//! again, rather than escaping the mesh's policies).
pub mod announce;
pub mod backpressure;
pub mod cgroup;
pub mod inbound;
mod orig_dst;
pub mod pin;
pub mod sockmap;
mod view;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, lpm_trie::{Key, LpmTrie}},
    programs::{CgroupSkb, CgroupSockAddr, SkReuseport, SockOps},
};
use mesh_common::{
    CaptureConfig, DEST_POD_IP, DEST_SERVICE_VIP, InboundEntry, MTLS_STRICT, PlainConn, PlaintextStats, PodEntry, PodPort, TRUSTED_PROXY, VERDICT_ALLOW,
    VerdictKey, counter,
};
pub use orig_dst::OrigDstTable;
pub use sockmap::{FastPathState, FastPathView};
pub use view::{BpfView, ProgramDesc};
use tracing::{debug, info, warn};

use crate::config::Cluster;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); running as uid {0}")]
    NotRoot(u32),
    #[error("no cgroup2 filesystem is mounted (looked in /proc/mounts); socket capture needs cgroup v2")]
    NoCgroup2,
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0} (kernel too old, or BPF disabled?)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("the capture needs an IPv4 address for the node proxy, got {0}")]
    NotIpv4(IpAddr),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error(
        "the node proxy does not run under --cgroup {0}: pods could not tell its connections from a host process's (run it as a pod of the cgroup's subtree, as the DaemonSet does under kubepods)"
    )]
    OutsideCgroup(PathBuf),
    #[error("finding the node proxy's own cgroup: {0}")]
    WhoAmI(std::io::Error),
}

/// Where captured connections should go, and what to attach to.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The cgroup whose subtree holds this node's pods.
    pub cgroup: PathBuf,
    /// The kubelet's cgroup; `None`: the first of [`cgroup::KUBELET_CGROUPS`] that exists; a
    /// path `none`: no kubelet probes are let through.
    pub kubelet_cgroup: Option<PathBuf>,
    /// The node proxy's address as pods reach it.
    pub proxy_ip: IpAddr,
    pub proxy_port: u16,
    /// aya-log level for the kernel programs (0 off .. 5 trace).
    pub bpf_log_level: u8,
    /// bpffs directory where links and shared maps are pinned (one per node).
    pub pin_dir: PathBuf,
    /// `--sockmap`: the socket fast path between pods and the node proxy ([`sockmap`]).
    pub sockmap: bool,
}

/// The maps a new proxy shares with the one it replaces (everything but the log buffer and
/// the programs' read-only globals, which belong to each loaded object).
const SHARED_MAPS: [&str; 21] = [
    "CONFIG",
    "ENROLLED",
    "MESH_DESTS",
    "SOCK_ORIG",
    "ORIG_DST",
    "COUNTERS",
    "INBOUND",
    "VERDICTS",
    "PLAINTEXT",
    "TRUSTED_CGROUPS",
    "SOCK_ROLE",
    "TRUSTED_CONNS",
    "PLAIN_PENDING",
    "PLAIN_CONNS",
    "REVOKED",
    "REVOKING",
    "FAST_CONFIG",
    "SOCK_POD",
    "FAST_SOCKS",
    "FAST_COUNTERS",
    "FAST_STOP",
];

/// The programs and the cgroup hooks they are linked to.
const HOOKS: [(&str, u32); 4] = [
    ("mesh_connect4", pin::BPF_CGROUP_INET4_CONNECT),
    ("mesh_connect6", pin::BPF_CGROUP_INET6_CONNECT),
    ("mesh_sockops", pin::BPF_CGROUP_SOCK_OPS),
    ("mesh_inbound", pin::BPF_CGROUP_INET_INGRESS),
];

/// How the capture was set up at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Nothing was pinned: attached anew.
    Fresh,
    /// A previous proxy's links and maps were taken over.
    TookOver,
}

/// What [`Capture::release`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Another proxy has taken the links over: everything stays attached and pinned for it.
    HandedOver,
    /// No successor: links detached, pins removed.
    Detached { links: usize, maps: usize },
}

/// What the capture currently knows, for the admin endpoint and `meshctl`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CaptureState {
    pub cgroup: PathBuf,
    /// Enrolled local pods ("ns/name") and the cgroup ids found for them.
    pub enrolled: BTreeMap<String, Vec<u64>>,
    pub mesh_destinations: usize,
}

pub struct Capture {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodEntry>,
    dests: HashMap<MapData, u32, u8>,
    inbound: HashMap<MapData, PodPort, InboundEntry>,
    verdicts: LpmTrie<MapData, VerdictKey, u8>,
    plaintext: PerCpuHashMap<MapData, u32, PlaintextStats>,
    plain_conns: HashMap<MapData, u64, PlainConn>,
    revoked: HashMap<MapData, u64, u8>,
    revoking: Array<MapData, u32>,
    /// The inbound judgements of the last sync.
    judged: Option<BTreeMap<PodPort, inbound::Judgement>>,
    counters: Arc<Counters>,
    orig_dst: Arc<OrigDstTable>,
    state: Arc<Mutex<CaptureState>>,
    cgroup: PathBuf,
    view: Arc<BpfView>,
    pin_dir: PathBuf,
    fast_path: Arc<FastPathView>,
    fast_backpressure: Option<Arc<backpressure::Backpressure>>,
    /// `FAST_CONFIG`, and whether this capture created the fast path's link (not took it over).
    fast_config: Option<Array<MapData, mesh_common::FastConfig>>,
    fast_link_created: bool,
    /// Our links (also pinned); holding them open is not what keeps them attached, the pins are.
    _links: Vec<OwnedFd>,
    /// Kernel ids of our programs: a pinned link running another program means a successor.
    prog_ids: Vec<u32>,
    /// Per hook, the program the pinned link ran before we took it over.
    previous: Vec<(&'static str, Option<u32>)>,
    start: Start,
}

/// Per-CPU counters of the kernel programs.
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    /// Sums over CPUs, by name.
    pub fn read(&self) -> BTreeMap<&'static str, u64> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self.0.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (*name, total)
            })
            .collect()
    }
}

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

impl Capture {
    pub fn attach(opts: &CaptureOptions) -> Result<Self, CaptureError> {
        require_root()?;
        let IpAddr::V4(proxy_ip4) = opts.proxy_ip else {
            return Err(CaptureError::NotIpv4(opts.proxy_ip));
        };
        let cgroup_path = cgroup::resolve(&opts.cgroup)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup_path).map_err(|e| CaptureError::Cgroup { path: cgroup_path.clone(), reason: e.to_string() })?;
        raise_memlock_limit();

        // Held until the links are in place: a stopping proxy or an uninstall waits for us.
        let pins = pin::PinDir::lock(&opts.pin_dir)?;
        let maps_dir = pins.maps_dir()?;
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &opts.bpf_log_level, false);
        let map_paths: Vec<(&str, PathBuf)> = SHARED_MAPS.iter().map(|m| (*m, maps_dir.join(m))).collect();
        for (name, path) in &map_paths {
            // Loads the pinned map if there is one (a running or previous proxy's), else
            // creates and pins it.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => debug!("eBPF logs unavailable: {e}"),
        }

        let cgroup_file = std::fs::File::open(&cgroup_path).map_err(|e| CaptureError::Cgroup {
            path: cgroup_path.clone(),
            reason: e.to_string(),
        })?;
        // Load every program before taking maps out of the object: loading resolves map
        // references through the object's own map fds.
        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect4")?;
        connect4.load().map_err(|source| CaptureError::Program { name: "mesh_connect4", source })?;
        let connect6: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect6")?;
        connect6.load().map_err(|source| CaptureError::Program { name: "mesh_connect6", source })?;
        let sockops: &mut SockOps = program(&mut ebpf, "mesh_sockops")?;
        sockops.load().map_err(|source| CaptureError::Program { name: "mesh_sockops", source })?;
        let inbound: &mut CgroupSkb = program(&mut ebpf, "mesh_inbound")?;
        inbound.load().map_err(|source| CaptureError::Program { name: "mesh_inbound", source })?;
        let kubelet: &mut SockOps = program(&mut ebpf, "mesh_kubelet")?;
        kubelet.load().map_err(|source| CaptureError::Program { name: "mesh_kubelet", source })?;
        let reuseport: &mut SkReuseport = program(&mut ebpf, "mesh_reuseport")?;
        reuseport.load().map_err(|source| CaptureError::Program { name: "mesh_reuseport", source })?;
        // The fast path's programs only when asked for; their failure is not the capture's.
        let fast_loaded = if opts.sockmap { sockmap::load(&mut ebpf) } else { Ok(()) };
        let mut config: Array<MapData, CaptureConfig> = take_map(&mut ebpf, "CONFIG")?;
        let cfg = CaptureConfig {
            proxy_ip4: u32::from_ne_bytes(proxy_ip4.octets()),
            proxy_port: opts.proxy_port,
            _pad: 0,
            proxy_mark: mesh_common::PROXY_MARK,
        };
        config
            .set(mesh_common::CONFIG_INDEX, cfg, 0)
            .map_err(|source| CaptureError::Map { name: "CONFIG", source })?;
        // Ids first: once taken out of the object, a map's id is out of reach.
        let view_maps = (view::map_id(&ebpf, "ENROLLED"), view::map_id(&ebpf, "MESH_DESTS"));
        let enrolled = take_map(&mut ebpf, "ENROLLED")?;
        let inbound = take_map(&mut ebpf, "INBOUND")?;
        let verdicts = take_map(&mut ebpf, "VERDICTS")?;
        let plaintext = take_map(&mut ebpf, "PLAINTEXT")?;
        let plain_conns = take_map(&mut ebpf, "PLAIN_CONNS")?;
        let revoked = take_map(&mut ebpf, "REVOKED")?;
        let revoking = take_map(&mut ebpf, "REVOKING")?;
        let mut trusted_cgroups: HashMap<MapData, u64, u8> = take_map(&mut ebpf, "TRUSTED_CGROUPS")?;
        let mut whoami: HashMap<MapData, u64, u64> = take_map(&mut ebpf, "WHOAMI")?;
        let dests = take_map(&mut ebpf, "MESH_DESTS")?;
        let counters = Arc::new(Counters(take_map(&mut ebpf, "COUNTERS")?));
        let orig_dst = Arc::new(OrigDstTable::new(take_map(&mut ebpf, "ORIG_DST")?));
        // The loaded programs hold their own references to CONFIG.
        drop(config);

        // Link each program: a pinned link (a running or previous proxy's) is switched to our
        // program in one atomic step, so no connect in between goes uncaptured; otherwise a new
        // link is attached. bpf_links are multi-attach: the CNI's and the host's own cgroup
        // programs keep running.
        let mut links = Vec::new();
        let mut prog_ids = Vec::new();
        let mut previous = Vec::new();
        let mut took_over = 0;
        let kubelet = cgroup::kubelet(opts.kubelet_cgroup.as_deref())?;
        let kubelet_file = match &kubelet {
            Some((path, _)) => Some(std::fs::File::open(path).map_err(|e| CaptureError::Cgroup { path: path.clone(), reason: e.to_string() })?),
            None => None,
        };
        let hooks = HOOKS.iter().map(|(name, attach_type)| (*name, *attach_type, cgroup_file.as_fd(), cgroup_id));
        let kubelet_hook = kubelet_file.as_ref().zip(kubelet.as_ref()).map(|(f, (_, id))| ("mesh_kubelet", pin::BPF_CGROUP_SOCK_OPS, f.as_fd(), *id));
        for (name, attach_type, cgroup_fd, cgroup_id) in hooks.chain(kubelet_hook) {
            let prog = ebpf.program(name).ok_or(CaptureError::Missing(name))?;
            let prog_fd = prog.fd().map_err(|source| CaptureError::Program { name, source })?;
            let id = prog.info().map_err(|source| CaptureError::Program { name, source })?.id();
            let (link, setup) = pins.install_link(name, prog_fd.as_fd(), cgroup_fd, cgroup_id, attach_type)?;
            match setup {
                pin::LinkSetup::Created => {
                    debug!(program = name, prog_id = id, "attached");
                    previous.push((name, None));
                }
                pin::LinkSetup::TookOver { previous_prog } => {
                    took_over += 1;
                    info!(program = name, prog_id = id, previous_prog, "took over the pinned link");
                    previous.push((name, Some(previous_prog)));
                }
            }
            links.push(link);
            prog_ids.push(id);
        }
        let fast = sockmap::setup(&mut ebpf, &pins, opts.sockmap, fast_loaded, cgroup_file.as_fd(), cgroup_id);
        let mut fast_link_created = false;
        if let Some(l) = fast.link {
            fast_link_created = l.previous.is_none();
            previous.push((sockmap::FAST_SOCKOPS, l.previous));
            links.push(l.link);
            prog_ids.push(l.prog_id);
        }
        pins.remove_stale_maps();
        drop(pins);
        // Before any connection of ours to a pod: STRICT and policy-guarded pods let through
        // only what the kernel knows to be ours.
        let own = whoami_probe(&mut whoami).map_err(CaptureError::WhoAmI)?.ok_or_else(|| CaptureError::OutsideCgroup(cgroup_path.clone()))?;
        trusted_cgroups.insert(own, TRUSTED_PROXY, 0).map_err(|source| CaptureError::Map { name: "TRUSTED_CGROUPS", source })?;
        match &kubelet {
            Some((path, _)) => info!(kubelet_cgroup = %path.display(), "kubelet probes: let through to the probe ports pods declare"),
            None => warn!("no kubelet cgroup (--kubelet-cgroup): probes to STRICT or policy-guarded pods are refused like any plaintext caller"),
        }
        let start = if took_over > 0 { Start::TookOver } else { Start::Fresh };
        info!(
            cgroup = %cgroup_path.display(),
            proxy = %format!("{proxy_ip4}:{}", opts.proxy_port),
            pin_dir = %opts.pin_dir.display(),
            ?start,
            "capture attached"
        );

        let state = Arc::new(Mutex::new(CaptureState { cgroup: cgroup_path.clone(), ..Default::default() }));
        let view = Arc::new(BpfView::open(&ebpf, &cgroup_path, view_maps));
        Ok(Self {
            ebpf,
            enrolled,
            dests,
            inbound,
            verdicts,
            plaintext,
            plain_conns,
            revoked,
            revoking,
            judged: None,
            counters,
            orig_dst,
            state,
            cgroup: cgroup_path,
            view,
            pin_dir: opts.pin_dir.clone(),
            fast_path: Arc::new(fast.view),
            fast_backpressure: fast.backpressure,
            fast_config: fast.config,
            fast_link_created,
            _links: links,
            prog_ids,
            previous,
            start,
        })
    }

    /// Attaches the listener-migration program to the SO_REUSEPORT group of `listener`: when a
    /// stopping proxy closes its listener of the group, the connections queued on it move to
    /// its successor's instead of being reset (without needing `net.ipv4.tcp_migrate_req`).
    pub fn migrate_on_close(&mut self, listener: &impl std::os::fd::AsFd) -> Result<(), CaptureError> {
        let prog: &mut SkReuseport = program(&mut self.ebpf, "mesh_reuseport")?;
        prog.attach(listener).map_err(|source| CaptureError::Program { name: "mesh_reuseport", source })
    }

    /// Whether this capture started fresh or took over a previous proxy's.
    pub fn start(&self) -> Start {
        self.start
    }

    /// Whether another proxy has taken the links over since we attached.
    pub fn superseded(&self) -> Result<bool, CaptureError> {
        let pins = pin::PinDir::lock(&self.pin_dir)?;
        Ok(self.superseded_in(&pins))
    }

    fn superseded_in(&self, pins: &pin::PinDir) -> bool {
        pins.links().iter().any(|(name, state)| match state {
            Ok(s) => !self.prog_ids.contains(&s.prog_id),
            Err(e) => {
                warn!(link = name, "pinned link: {e}");
                false
            }
        })
    }

    /// Undoes the attach of a proxy whose start failed: the links taken over from a running
    /// proxy go back to its programs (it keeps serving as if we had never started); links we
    /// created are detached and unpinned.
    pub fn abandon(mut self) {
        if self.start == Start::Fresh {
            match self.release() {
                Ok(r) => info!(?r, "start failed: capture released"),
                Err(e) => warn!("start failed; releasing the capture: {e}"),
            }
            return;
        }
        let pins = match pin::PinDir::lock(&self.pin_dir) {
            Ok(p) => p,
            Err(e) => return warn!("start failed; handing the capture back: {e}"),
        };
        let current: BTreeMap<String, u32> = pins.links().into_iter().filter_map(|(n, s)| Some((n, s.ok()?.prog_id))).collect();
        if self.fast_link_created && current.get(sockmap::FAST_SOCKOPS).is_some_and(|id| self.prog_ids.contains(id)) {
            // The proxy we took over from had no fast path: it keeps running without one.
            sockmap::switch_off(&pins, self.fast_config.as_mut());
        }
        for (name, prev) in &self.previous {
            let ours = current.get(*name).is_some_and(|id| self.prog_ids.contains(id));
            match prev {
                Some(prev) if ours => match pins.restore_link(name, *prev) {
                    Ok(()) => info!(program = name, prog_id = prev, "start failed: link handed back to the previous program"),
                    // Its proxy is gone: ours, equivalent, keeps running from the pin.
                    Err(e) => warn!(program = name, "start failed; handing the link back: {e}"),
                },
                _ => {}
            }
        }
    }

    /// Stops capturing, unless a successor has taken over: then its links and the shared maps
    /// stay as they are. Without one, detaches every link and removes the pins, so a clean
    /// exit leaves nothing attached.
    pub fn release(self) -> Result<Release, CaptureError> {
        let pins = pin::PinDir::lock(&self.pin_dir)?;
        if self.superseded_in(&pins) {
            return Ok(Release::HandedOver);
        }
        let (links, maps) = pins.remove_all()?;
        Ok(Release::Detached { links, maps })
    }

    pub fn orig_dst(&self) -> Arc<OrigDstTable> {
        self.orig_dst.clone()
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    pub fn state(&self) -> Arc<Mutex<CaptureState>> {
        self.state.clone()
    }

    /// The socket fast path's state and kernel counters, for the admin API and metrics.
    pub fn fast_path(&self) -> Arc<FastPathView> {
        self.fast_path.clone()
    }

    /// The watch on the proxy sockets' queues, while the fast path is on.
    pub fn fast_backpressure(&self) -> Option<Arc<backpressure::Backpressure>> {
        self.fast_backpressure.clone()
    }

    /// Read-only view of the kernel side (programs, their links, map contents) for the admin API.
    pub fn view(&self) -> Arc<BpfView> {
        self.view.clone()
    }

    /// Makes the kernel maps match the config: every Service VIP and every enrolled pod's IP is
    /// a mesh destination; the cgroups of this node's enrolled pods are enrolled; inbound
    /// judgements follow the pods' policies. Returns how many open plaintext connections the
    /// config newly denies (their packets are dropped from now on).
    pub fn sync(&mut self, cluster: &Cluster, node: &str) -> usize {
        let mut want_dests: BTreeMap<u32, u8> = BTreeMap::new();
        for svc in cluster.services() {
            for ip in &svc.cluster_ips {
                if let IpAddr::V4(v4) = ip {
                    want_dests.insert(ip_key(*v4), DEST_SERVICE_VIP);
                }
            }
        }
        let mut want_cgroups: BTreeMap<u64, PodEntry> = BTreeMap::new();
        let mut enrolled_pods = BTreeMap::new();
        let mut pod_cgroups = cgroup::pods_cgroups(&self.cgroup);
        for pod in cluster.pods().filter(|p| cluster.is_enrolled(p)) {
            if let IpAddr::V4(v4) = pod.ip {
                want_dests.entry(ip_key(v4)).or_insert(DEST_POD_IP);
            }
            if pod.node != node {
                continue;
            }
            let ids = pod_cgroups.remove(&pod.uid).unwrap_or_default();
            let ip4 = match pod.ip {
                IpAddr::V4(v4) => ip_key(v4),
                IpAddr::V6(_) => 0,
            };
            for id in &ids {
                want_cgroups.insert(*id, PodEntry { ip4, _pad: 0 });
            }
            enrolled_pods.insert(format!("{}/{}", pod.namespace, pod.name), ids);
        }
        // Enrolled first: the kernel finds an IPv6 caller's pod by its cgroup.
        sync_map(&mut self.enrolled, "ENROLLED", &want_cgroups);
        let judgements = inbound::compile(cluster, node);
        self.sync_inbound(&judgements);
        // Open plaintext connections need judging again only when the judgements changed: new
        // ones meet the current tables at their SYN.
        let revoked = if self.judged.as_ref() == Some(&judgements) { 0 } else { self.revoke_plaintext(&judgements) };
        self.judged = Some(judgements);
        sync_map(&mut self.dests, "MESH_DESTS", &want_dests);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.enrolled = enrolled_pods;
        state.mesh_destinations = want_dests.len();
        revoked
    }

    /// Re-judges the open plaintext connections to this node's mesh pods (the kernel tracks
    /// those their policy allowed when they opened) against `judgements`: the ones now denied
    /// are revoked, and the kernel drops their packets. Returns how many are newly revoked.
    fn revoke_plaintext(&mut self, judgements: &BTreeMap<PodPort, inbound::Judgement>) -> usize {
        let open: Vec<(u64, PlainConn)> = self.plain_conns.iter().filter_map(Result::ok).collect();
        let mut want = BTreeMap::new();
        for (cookie, conn) in &open {
            let at = |port| PodPort { ip4: conn.pod, port, _pad: 0 };
            // A pod no longer judged here (gone, or out of the mesh) keeps what it has.
            let Some(j) = judgements.get(&at(conn.dport)).or_else(|| judgements.get(&at(0))) else { continue };
            let allowed = j.mode != MTLS_STRICT && j.table.as_ref().is_none_or(|t| inbound::verdict(t, u128::from_be_bytes(conn.src)) == VERDICT_ALLOW);
            if !allowed {
                want.insert(*cookie, 1u8);
            }
        }
        let before: BTreeSet<u64> = self.revoked.keys().filter_map(Result::ok).collect();
        let new = want.keys().filter(|c| !before.contains(c)).count();
        // The count first when it grows, last when it shrinks: the kernel never skips a
        // revoked cookie.
        let count = u32::try_from(want.len()).unwrap_or(u32::MAX);
        if count > 0 {
            let _ = self.revoking.set(0, count, 0);
        }
        sync_map(&mut self.revoked, "REVOKED", &want);
        if count == 0 {
            let _ = self.revoking.set(0, 0, 0);
        }
        if new > 0 {
            info!(connections = new, "policy change: open plaintext connections to local pods now denied; their packets are dropped");
        }
        new
    }

    /// Writes the kernel's inbound judgements: verdict tables first (a class id is a hash of its
    /// table, so two proxies syncing the same config during a hand-over write the same ids),
    /// then the pod entries that point at them, then tables no entry uses any more.
    fn sync_inbound(&mut self, want: &BTreeMap<PodPort, inbound::Judgement>) {
        let mut ids: BTreeMap<&inbound::Table, u32> = BTreeMap::new();
        let mut used = BTreeSet::new();
        for table in want.values().filter_map(|j| j.table.as_ref()) {
            if ids.contains_key(table) {
                continue;
            }
            let mut id = table_id(table);
            while id == 0 || used.contains(&id) {
                id = id.wrapping_add(1);
            }
            used.insert(id);
            ids.insert(table, id);
        }
        let mut want_verdicts: BTreeMap<(u32, u8, u128), u8> = BTreeMap::new();
        for (table, id) in &ids {
            for (len, bits, verdict) in table.iter() {
                want_verdicts.insert((*id, *len, *bits), *verdict);
            }
        }
        let have: BTreeMap<(u32, u8, u128), u8> = self
            .verdicts
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let d = k.data();
                ((u32::from_be(d.class_be), (k.prefix_len() - 32) as u8, u128::from_be_bytes(d.addr)), v)
            })
            .collect();
        let key = |(id, len, bits): (u32, u8, u128)| Key::new(32 + u32::from(len), VerdictKey { class_be: id.to_be(), addr: bits.to_be_bytes() });
        for (k, v) in &want_verdicts {
            if have.get(k) != Some(v)
                && let Err(e) = self.verdicts.insert(&key(*k), *v, 0)
            {
                warn!("eBPF map VERDICTS: inserting an entry: {e}");
            }
        }
        let entries: BTreeMap<PodPort, InboundEntry> = want
            .iter()
            .map(|(k, j)| {
                let class = j.table.as_ref().map_or(0, |t| ids[t]);
                (*k, InboundEntry { class, mode: j.mode, flags: j.flags, _pad: 0 })
            })
            .collect();
        sync_map(&mut self.inbound, "INBOUND", &entries);
        for k in have.keys().filter(|k| !want_verdicts.contains_key(k)) {
            if let Err(e) = self.verdicts.remove(&key(*k)) {
                warn!("eBPF map VERDICTS: removing an entry: {e}");
            }
        }
    }

    /// Plaintext connection attempts judged in the kernel, per local mesh pod (summed over
    /// CPUs; counts start over when a pod's entry is evicted or the maps are new).
    pub fn plaintext_counts(&self) -> BTreeMap<Ipv4Addr, PlaintextStats> {
        self.plaintext
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, per_cpu)| {
                let mut sum = PlaintextStats::default();
                for s in per_cpu.iter() {
                    sum.allowed += s.allowed;
                    sum.strict_denied += s.strict_denied;
                    sum.authz_denied += s.authz_denied;
                    sum.probes += s.probes;
                }
                (Ipv4Addr::from(ip.to_ne_bytes()), sum)
            })
            .collect()
    }

    /// Programs currently loaded by this capture (for tests and `meshctl`).
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_owned()).collect()
    }
}

/// Asks the kernel which cgroup this process runs in: a socket named in `WHOAMI` by its cookie
/// is connected (to a closed loopback port), and the capture's connect hook writes the cgroup
/// it saw. `None` when the hook did not run: the proxy is outside the attach cgroup.
fn whoami_probe(map: &mut HashMap<MapData, u64, u64>) -> std::io::Result<Option<u64>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    if unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The map is this object's own (not shared), so no other proxy's probe is in it.
    map.insert(cookie, 0, 0).map_err(std::io::Error::other)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 1u16.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes([127, 0, 0, 1]) },
        sin_zero: [0; 8],
    };
    // Refused or in progress: either way the connect hook has run.
    unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t) };
    let seen = map.get(&cookie, 0).map_err(std::io::Error::other);
    let _ = map.remove(&cookie);
    Ok(Some(seen?).filter(|id| *id != 0))
}

/// FNV-1a over the table: the same table gets the same id in every proxy.
fn table_id(table: &inbound::Table) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for (len, bits, verdict) in table {
        for b in [*len].iter().chain(&bits.to_be_bytes()).chain([*verdict].iter()) {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

pub(crate) fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn sync_map<V: aya::Pod + PartialEq, K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
) {
    let have: BTreeSet<K> = map.keys().filter_map(Result::ok).collect();
    for stale in have.iter().filter(|k| !want.contains_key(k)) {
        if let Err(e) = map.remove(stale) {
            warn!("eBPF map {name}: removing an entry: {e}");
        }
    }
    for (k, v) in want {
        if have.contains(k) && map.get(k, 0).is_ok_and(|cur| cur == *v) {
            continue;
        }
        if let Err(e) = map.insert(k, v, 0) {
            warn!("eBPF map {name}: inserting an entry: {e}");
        }
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
    prog.try_into().map_err(|source| CaptureError::Program { name, source })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK");
    }
}

fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the AsyncFd owns the logger, which owns the ring buffer fd it registers.
    let fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            debug!("eBPF logs unavailable: {e}");
            return;
        }
    };
    let mut fd = fd;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Loading and attaching the capture needs root; checked first, so that is what a user hears.
pub fn require_root() -> Result<(), CaptureError> {
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(CaptureError::NotRoot(uid));
    }
    Ok(())
}

/// `mesh-node uninstall`: detaches the capture pinned in `pin_dir` and removes its pins, whether
/// or not a proxy still runs. Returns (links detached, maps unpinned).
pub fn uninstall(pin_dir: &Path) -> Result<(usize, usize), CaptureError> {
    Ok(pin::uninstall(pin_dir)?)
}
