//! `/bpf`: what the kernel side of the capture holds right now: programs and their links,
//! enrolled cgroups, the mesh destination map, counters.
use std::net::IpAddr;

use serde_json::{Value, json};

use super::AdminState;

pub fn bpf(state: &AdminState) -> Value {
    let cluster = state.proxy.cluster();
    let capture = state.capture_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_kernel = state.bpf.enrolled_cgroups();
    let programs: Vec<Value> = state
        .bpf
        .programs()
        .into_iter()
        .map(|p| {
            let attached = !p.links.is_empty();
            let mut v = serde_json::to_value(p).unwrap_or_default();
            v["attached"] = json!(attached);
            v
        })
        .collect();
    let enrolled: Vec<Value> = capture
        .enrolled
        .iter()
        .map(|(pod, ids)| {
            json!({
                "pod": pod,
                "cgroup_ids": ids,
                // The capture only acts on cgroups in the kernel map; a pod whose ids are all
                // missing there is not captured whatever the config says.
                "in_kernel_map": !ids.is_empty() && ids.iter().all(|id| in_kernel.contains_key(id)),
            })
        })
        .collect();
    let destinations: Vec<Value> = state
        .bpf
        .mesh_destinations()
        .into_iter()
        .map(|d| {
            let ip = IpAddr::V4(d.ip);
            let owner = match d.kind {
                "service-vip" => cluster.service_by_vip(ip).map(|s| format!("{}/{}", s.namespace, s.name)),
                _ => cluster.pod_by_ip(ip).map(|p| format!("{}/{}", p.namespace, p.name)),
            };
            json!({"ip": d.ip, "kind": d.kind, "owner": owner})
        })
        .collect();
    json!({
        "cgroup": state.bpf.cgroup,
        "programs": programs,
        "enrolled_pods": enrolled,
        "enrolled_cgroups_in_kernel": in_kernel.len(),
        "mesh_destinations": destinations,
        "counters": state.capture_counters.read(),
        "fast_path": state.fast_path.to_json(),
    })
}
