//! A read-only view of the capture's kernel state for the admin API and `meshctl bpf`.
//!
//! It holds its own file descriptors on the ENROLLED and MESH_DESTS maps (opened by id), so
//! the admin reads what the kernel programs actually see, not what `sync` meant to write, and
//! never needs the `Capture` itself, which the daemon's loop owns mutably.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use mesh_common::{DEST_POD_IP, DEST_SERVICE_VIP, PodEntry};
use tracing::warn;

/// One of the capture's programs and the hook it is attached to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramDesc {
    pub name: String,
    /// The kernel hook, as bpftool names it.
    pub hook: &'static str,
    /// The kernel's program id (`bpftool prog show id N`), if the kernel told us.
    pub id: Option<u32>,
}

pub struct BpfView {
    pub cgroup: PathBuf,
    pub programs: Vec<ProgramDesc>,
    enrolled: Option<HashMap<MapData, u64, PodEntry>>,
    dests: Option<HashMap<MapData, u32, u8>>,
}

/// A program's state as the kernel reports it now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramStatus {
    #[serde(flatten)]
    pub program: ProgramDesc,
    pub attach_point: String,
    /// bpf_link ids pointing at this program; empty means it is loaded but not attached.
    pub links: Vec<u32>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MeshDest {
    pub ip: Ipv4Addr,
    pub kind: &'static str,
}

const HOOKS: [(&str, &str); 4] = [
    ("mesh_connect4", "cgroup/connect4"),
    ("mesh_connect6", "cgroup/connect6"),
    ("mesh_sockops", "sockops"),
    ("mesh_inbound", "cgroup_skb/ingress"),
];

/// The kernel id of a hash map still in the object.
pub(super) fn map_id(ebpf: &Ebpf, name: &str) -> Option<u32> {
    match ebpf.map(name)? {
        Map::HashMap(data) => data.info().ok().map(|i| i.id()),
        _ => None,
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(id: Option<u32>, name: &str) -> Option<HashMap<MapData, K, V>> {
    let opened = MapData::from_id(id?).and_then(Map::from_map_data).and_then(HashMap::try_from);
    opened.map_err(|e| warn!("eBPF map {name}: opening a read-only view for the admin API: {e}")).ok()
}

impl BpfView {
    pub(super) fn open(ebpf: &Ebpf, cgroup: &Path, (enrolled, dests): (Option<u32>, Option<u32>)) -> Self {
        let programs = HOOKS
            .iter()
            .map(|(name, hook)| ProgramDesc {
                name: (*name).to_owned(),
                hook,
                id: ebpf.program(name).and_then(|p| p.info().ok()).map(|i| i.id()),
            })
            .collect();
        Self {
            cgroup: cgroup.to_owned(),
            programs,
            enrolled: open_hash(enrolled, "ENROLLED"),
            dests: open_hash(dests, "MESH_DESTS"),
        }
    }

    /// Each program with the bpf_links the kernel has for it: proof it is attached, not just
    /// loaded.
    pub fn programs(&self) -> Vec<ProgramStatus> {
        let mut links: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for link in aya::programs::loaded_links().filter_map(Result::ok) {
            links.entry(link.program_id()).or_default().push(link.id());
        }
        self.programs
            .iter()
            .map(|p| ProgramStatus {
                program: p.clone(),
                attach_point: self.cgroup.display().to_string(),
                links: p.id.and_then(|id| links.get(&id).cloned()).unwrap_or_default(),
            })
            .collect()
    }

    /// Cgroup ids in the kernel's ENROLLED map, with the pod IP each was enrolled with.
    pub fn enrolled_cgroups(&self) -> BTreeMap<u64, Ipv4Addr> {
        let Some(map) = &self.enrolled else { return BTreeMap::new() };
        map.iter().filter_map(Result::ok).map(|(id, e)| (id, Ipv4Addr::from(e.ip4.to_ne_bytes()))).collect()
    }

    /// The kernel's MESH_DESTS map: addresses whose connections are captured.
    pub fn mesh_destinations(&self) -> Vec<MeshDest> {
        let Some(map) = &self.dests else { return Vec::new() };
        let entries: BTreeSet<(Ipv4Addr, u8)> =
            map.iter().filter_map(Result::ok).map(|(ip, kind)| (Ipv4Addr::from(ip.to_ne_bytes()), kind)).collect();
        entries
            .into_iter()
            .map(|(ip, kind)| MeshDest {
                ip,
                kind: match kind {
                    DEST_SERVICE_VIP => "service-vip",
                    DEST_POD_IP => "pod-ip",
                    _ => "unknown",
                },
            })
            .collect()
    }
}
