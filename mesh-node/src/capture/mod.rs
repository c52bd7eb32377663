//! Loads the eBPF capture programs, attaches them to the node's pod cgroup, and keeps their maps
//! in step with the cluster config.
//!
//! Dropping [`Capture`] detaches everything: the programs are attached through bpf_links owned
//! by this process, so even a crash leaves nothing behind.
pub mod cgroup;
mod orig_dst;
mod view;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps},
};
use mesh_common::{CaptureConfig, DEST_POD_IP, DEST_SERVICE_VIP, MTLS_OPEN, MTLS_STRICT, PodEntry, PodPort, counter};
pub use orig_dst::OrigDstTable;
pub use view::{BpfView, ProgramDesc};
use tracing::{debug, info, warn};

use crate::config::{Cluster, MtlsMode};

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
}

/// Where captured connections should go, and what to attach to.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The cgroup whose subtree holds this node's pods.
    pub cgroup: PathBuf,
    /// The node proxy's address as pods reach it.
    pub proxy_ip: IpAddr,
    pub proxy_port: u16,
    /// aya-log level for the kernel programs (0 off .. 5 trace).
    pub bpf_log_level: u8,
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
    inbound_mtls: HashMap<MapData, PodPort, u8>,
    proxy_sources: HashMap<MapData, u32, u8>,
    counters: Arc<Counters>,
    orig_dst: Arc<OrigDstTable>,
    state: Arc<Mutex<CaptureState>>,
    cgroup: PathBuf,
    view: Arc<BpfView>,
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
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(CaptureError::NotRoot(uid));
        }
        let IpAddr::V4(proxy_ip4) = opts.proxy_ip else {
            return Err(CaptureError::NotIpv4(opts.proxy_ip));
        };
        let cgroup_path = cgroup::resolve(&opts.cgroup)?;
        raise_memlock_limit();

        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &opts.bpf_log_level, false)
            .load(EBPF_OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => debug!("eBPF logs unavailable: {e}"),
        }

        let cgroup_file = std::fs::File::open(&cgroup_path).map_err(|e| CaptureError::Cgroup {
            path: cgroup_path.clone(),
            reason: e.to_string(),
        })?;
        // Load both programs before taking maps out of the object: loading resolves map
        // references through the object's own map fds.
        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect4")?;
        connect4.load().map_err(|source| CaptureError::Program { name: "mesh_connect4", source })?;
        let connect6: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect6")?;
        connect6.load().map_err(|source| CaptureError::Program { name: "mesh_connect6", source })?;
        let sockops: &mut SockOps = program(&mut ebpf, "mesh_sockops")?;
        sockops.load().map_err(|source| CaptureError::Program { name: "mesh_sockops", source })?;
        let inbound: &mut CgroupSkb = program(&mut ebpf, "mesh_inbound")?;
        inbound.load().map_err(|source| CaptureError::Program { name: "mesh_inbound", source })?;
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
        let inbound_mtls = take_map(&mut ebpf, "INBOUND_MTLS")?;
        let proxy_sources = take_map(&mut ebpf, "PROXY_SOURCES")?;
        let dests = take_map(&mut ebpf, "MESH_DESTS")?;
        let counters = Arc::new(Counters(take_map(&mut ebpf, "COUNTERS")?));
        let orig_dst = Arc::new(OrigDstTable::new(take_map(&mut ebpf, "ORIG_DST")?));
        // The loaded programs hold their own references to CONFIG.
        drop(config);

        // bpf_link attachments are always multi-attach in the kernel (flags must be 0), so we
        // coexist with the CNI's and the host's own cgroup programs.
        let connect4: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect4")?;
        connect4
            .attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name: "mesh_connect4", source })?;
        let connect6: &mut CgroupSockAddr = program(&mut ebpf, "mesh_connect6")?;
        connect6
            .attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name: "mesh_connect6", source })?;
        let sockops: &mut SockOps = program(&mut ebpf, "mesh_sockops")?;
        sockops
            .attach(cgroup_file.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name: "mesh_sockops", source })?;
        let inbound: &mut CgroupSkb = program(&mut ebpf, "mesh_inbound")?;
        inbound
            .attach(cgroup_file.as_fd(), CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program { name: "mesh_inbound", source })?;
        info!(cgroup = %cgroup_path.display(), proxy = %format!("{proxy_ip4}:{}", opts.proxy_port), "capture attached");

        let state = Arc::new(Mutex::new(CaptureState { cgroup: cgroup_path.clone(), ..Default::default() }));
        let view = Arc::new(BpfView::open(&ebpf, &cgroup_path, view_maps));
        Ok(Self { ebpf, enrolled, dests, inbound_mtls, proxy_sources, counters, orig_dst, state, cgroup: cgroup_path, view })
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

    /// Read-only view of the kernel side (programs, their links, map contents) for the admin API.
    pub fn view(&self) -> Arc<BpfView> {
        self.view.clone()
    }

    /// Makes the kernel maps match the config: every Service VIP and every enrolled pod's IP is
    /// a mesh destination; the cgroups of this node's enrolled pods are enrolled.
    pub fn sync(&mut self, cluster: &Cluster, node: &str) {
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
        let (want_mtls, want_sources) = inbound_policy(cluster, node);
        sync_map(&mut self.inbound_mtls, "INBOUND_MTLS", &want_mtls);
        sync_map(&mut self.proxy_sources, "PROXY_SOURCES", &want_sources);
        sync_map(&mut self.dests, "MESH_DESTS", &want_dests);
        sync_map(&mut self.enrolled, "ENROLLED", &want_cgroups);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.enrolled = enrolled_pods;
        state.mesh_destinations = want_dests.len();
    }

    /// Programs currently loaded by this capture (for tests and `meshctl`).
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(n, _)| n.to_owned()).collect()
    }
}

/// PeerAuthentication of this node's mesh pods, pod-wide and per port where a port differs,
/// and the addresses the node proxy reaches them from (which STRICT pods accept).
fn inbound_policy(cluster: &Cluster, node: &str) -> (BTreeMap<PodPort, u8>, BTreeMap<u32, u8>) {
    let mut mtls = BTreeMap::new();
    let mut sources = BTreeMap::new();
    if let Some(IpAddr::V4(ip)) = cluster.node(node).map(|n| n.ip) {
        sources.insert(ip_key(ip), 1);
    }
    let value = |m: MtlsMode| if m == MtlsMode::Strict { MTLS_STRICT } else { MTLS_OPEN };
    for pod in cluster.pods().filter(|p| p.node == node && cluster.is_enrolled(p)) {
        let IpAddr::V4(ip4) = pod.ip else { continue };
        let pod_wide = cluster.mtls_mode_for(pod, 0);
        if pod_wide == MtlsMode::Strict {
            mtls.insert(PodPort { ip4: ip_key(ip4), port: 0, _pad: 0 }, MTLS_STRICT);
        }
        let mut ports: BTreeSet<u16> = pod.container_ports.iter().map(|(_, p)| *p).collect();
        for pa in cluster.peer_authentications() {
            ports.extend(pa.port_level_mtls.keys().copied());
        }
        for port in ports {
            let mode = cluster.mtls_mode_for(pod, port);
            if mode != pod_wide {
                mtls.insert(PodPort { ip4: ip_key(ip4), port, _pad: 0 }, value(mode));
            }
        }
        if let Some(IpAddr::V4(src)) = source_toward(pod.ip) {
            sources.insert(ip_key(src), 1);
        }
    }
    (mtls, sources)
}

/// The source address the kernel picks for connections from this node to `ip` (what a pod
/// sees as the proxy's address).
fn source_toward(ip: IpAddr) -> Option<IpAddr> {
    let sock = std::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).ok()?;
    sock.connect((ip, 9)).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

fn ip_key(ip: Ipv4Addr) -> u32 {
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
