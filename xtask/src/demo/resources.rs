//! Step 5 and the live view's last line: what the two node proxies cost during the run (their
//! processes' utime+stime and memory, sampled about once a second), beside what seven Envoy
//! sidecars took in the overhead benchmark's last saved result.
use std::{
    fs,
    time::{Duration, Instant},
};

use mesh_e2e::SimCluster;
use serde_json::Value;

use super::{Demo, expect};
use crate::{bench_account::proc_mem, bench_util::cpu_seconds};

/// One sidecar's default memory request in Istio (128Mi): a node proxy above it would cost more
/// than the one sidecar it replaces.
const SIDECAR_REQUEST_MIB: f64 = 128.0;
const SIDECAR_REQUEST_VCPU: f64 = 0.1;

#[derive(Clone, Default)]
struct Node {
    name: String,
    cpu_start: f64,
    cpu_last: f64,
    /// CPU share over the last sample interval.
    vcpu_now: f64,
    rss_mib: f64,
    pss_mib: f64,
    rss_max_mib: f64,
    /// Processes found at the last sample.
    procs: usize,
}

pub struct Sampler {
    started: Instant,
    last: Instant,
    nodes: Vec<Node>,
}

/// A node proxy's processes: the proxy and anything else in its container's cgroup.
fn node_pids(c: &SimCluster, i: usize) -> Vec<u32> {
    let mut pids: Vec<u32> = c.proxy_pid(i).into_iter().collect();
    let procs = fs::read_to_string(c.node(i).cgroup.join("mesh-node/cgroup.procs")).unwrap_or_default();
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter(|p| Some(*p) != c.proxy_pid(i)));
    pids
}

impl Sampler {
    pub fn new(c: &SimCluster) -> Self {
        let nodes = (0..c.nodes.len())
            .map(|i| {
                let cpu = cpu_seconds(&node_pids(c, i));
                Node { name: c.node(i).name.clone(), cpu_start: cpu, cpu_last: cpu, ..Default::default() }
            })
            .collect();
        let now = Instant::now();
        let mut s = Self { started: now, last: now, nodes };
        s.measure(c, Duration::ZERO);
        s
    }

    /// Samples at most once a second.
    pub fn sample(&mut self, c: &SimCluster) {
        let dt = self.last.elapsed();
        if dt >= Duration::from_secs(1) {
            self.measure(c, dt);
        }
    }

    fn measure(&mut self, c: &SimCluster, dt: Duration) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let pids = node_pids(c, i);
            n.procs = pids.len();
            let cpu = cpu_seconds(&pids);
            if !dt.is_zero() {
                n.vcpu_now = (cpu - n.cpu_last) / dt.as_secs_f64();
            }
            n.cpu_last = cpu;
            let mem: Vec<_> = pids.iter().filter_map(|p| proc_mem(*p)).collect();
            n.rss_mib = mem.iter().map(|m| m.rss_kib).sum::<u64>() as f64 / 1024.0;
            n.pss_mib = mem.iter().map(|m| m.pss_kib).sum::<u64>() as f64 / 1024.0;
            n.rss_max_mib = n.rss_max_mib.max(n.rss_mib);
        }
        self.last = Instant::now();
    }

    /// `proxies: node-a 4.1% CPU 14 MiB | node-b 2.0% CPU 13 MiB`
    pub fn line(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(|n| format!("{} {:>4.1}% CPU {:>5.1} MiB", n.name, n.vcpu_now * 100.0, n.rss_mib)).collect();
        format!("node proxies: {}", nodes.join(" | "))
    }

    fn run_vcpu(&self, n: &Node) -> f64 {
        (n.cpu_last - n.cpu_start) / self.last.duration_since(self.started).as_secs_f64().max(1e-3)
    }
}

pub fn report(d: &mut Demo) -> anyhow::Result<()> {
    d.sampler.measure(&d.c, d.sampler.last.elapsed());
    let s = &d.sampler;
    let seconds = s.last.duration_since(s.started).as_secs_f64();
    let mut text = format!("\n[5/5] Resources: the two node proxies over the {seconds:.0} s the demo ran (utime+stime of their processes; memory now / at most)\n");
    let (mut vcpu, mut pss) = (0.0, 0.0);
    for n in &s.nodes {
        let v = s.run_vcpu(n);
        vcpu += v;
        pss += n.pss_mib;
        text.push_str(&format!("  {}: {:.3} vCPU on average, RSS {:.1} MiB (at most {:.1}), PSS {:.1} MiB\n", n.name, v, n.rss_mib, n.rss_max_mib, n.pss_mib));
    }
    text.push_str(&format!("  both: {vcpu:.3} vCPU, {pss:.1} MiB PSS, for 6 pods on 2 nodes\n"));
    text.push_str(&sidecars_beside(&crate::workspace_root().join("target/bench/overhead.json")));
    d.view.say(text.trim_end());
    for n in &s.nodes {
        expect(n.procs > 0 && n.rss_mib > 0.0, || format!("{}'s proxy was not measured ({} processes, RSS {:.1} MiB)", n.name, n.procs, n.rss_mib))?;
        expect(n.rss_max_mib < SIDECAR_REQUEST_MIB, || format!("{}'s proxy reached {:.1} MiB RSS, more than one sidecar's default request ({SIDECAR_REQUEST_MIB} MiB)", n.name, n.rss_max_mib))?;
    }
    Ok(())
}

/// Seven Envoy sidecars: from target/bench/overhead.json when a benchmark saved one, labelled as
/// such; otherwise what is missing and how to make it, and Istio's default requests.
fn sidecars_beside(path: &std::path::Path) -> String {
    let requests = format!(
        "  Istio's default requests for seven sidecars (reserved, not measured): {:.1} vCPU, {:.0} MiB\n",
        7.0 * SIDECAR_REQUEST_VCPU,
        7.0 * SIDECAR_REQUEST_MIB
    );
    let Ok(bytes) = fs::read(path) else {
        return format!(
            "  seven Envoy sidecars: no measurement here ({} is absent); `cargo xtask bench overhead` measures them beside the mesh on this machine\n{requests}",
            path.display()
        );
    };
    let Ok(r) = serde_json::from_slice::<Value>(&bytes) else {
        return format!("  seven Envoy sidecars: {} is not readable JSON; run `cargo xtask bench overhead` again\n{requests}", path.display());
    };
    let stat = |mode: &str, key: &str| r["modes"][mode]["stats"][key]["median"].as_f64();
    let (Some(s_cpu), Some(s_pss), Some(m_cpu), Some(m_pss)) =
        (stat("sidecars", "steady_proxy_vcpu"), stat("sidecars", "steady_pss_mib"), stat("mesh", "steady_proxy_vcpu"), stat("mesh", "steady_pss_mib"))
    else {
        return format!("  seven Envoy sidecars: {} lacks the steady CPU/PSS medians; run `cargo xtask bench overhead` again\n{requests}", path.display());
    };
    // A run on a host that took the VM's CPU away says more about the host than the modes.
    let steal = ["no_mesh", "sidecars", "mesh"].iter().filter_map(|m| stat(m, "steady_node_steal_vcpu")).fold(0.0, f64::max);
    let steal = if steal >= crate::bench_account::STEAL_NOTE_VCPU {
        format!("    (the host took up to {steal:.2} vCPU from this VM in that run's steady phases: its numbers are the host's as much as the modes')\n")
    } else {
        String::new()
    };
    format!(
        "  from the overhead benchmark's last saved result ({}, {}{}, {} repeat(s), {:.0} service calls/s):\n    seven Envoy sidecars {s_cpu:.3} vCPU, {s_pss:.1} MiB PSS; the mesh there {m_cpu:.3} vCPU, {m_pss:.1} MiB PSS\n{steal}{requests}",
        path.display(),
        r["machine"]["date"].as_str().unwrap_or("undated"),
        if r["quick"] == true { ", a --quick run" } else { "" },
        r["repeats"],
        r["load"]["service_rps"].as_f64().unwrap_or(0.0),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn sidecars_come_from_the_saved_benchmark_labelled_or_their_absence_is_said() {
        let dir = std::env::temp_dir().join(format!("demo-resources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("overhead.json");
        let absent = super::sidecars_beside(&path);
        assert!(absent.contains("is absent") && absent.contains("cargo xtask bench overhead"), "{absent}");
        let stat = |v: f64| json!({"median": v, "min": v, "max": v, "n": 3});
        let saved = json!({
            "repeats": 3, "quick": false, "machine": {"date": "2026-12-01 10:00 UTC"}, "load": {"service_rps": 700.0},
            "modes": {
                "sidecars": {"stats": {"steady_proxy_vcpu": stat(0.61), "steady_pss_mib": stat(160.5)}},
                "mesh": {"stats": {"steady_proxy_vcpu": stat(0.12), "steady_pss_mib": stat(30.25)}},
            },
        });
        std::fs::write(&path, saved.to_string()).unwrap();
        let text = super::sidecars_beside(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains("from the overhead benchmark's last saved result"), "{text}");
        assert!(text.contains("2026-12-01 10:00 UTC") && text.contains("3 repeat(s)") && text.contains("700 service calls/s"), "{text}");
        assert!(text.contains("seven Envoy sidecars 0.610 vCPU, 160.5 MiB PSS; the mesh there 0.120 vCPU, 30.2 MiB PSS"), "{text}");
        assert!(!text.contains("the host took"), "{text}");
        let mut stolen = saved.clone();
        stolen["modes"]["sidecars"]["stats"]["steady_node_steal_vcpu"] = stat(0.9);
        let dir = std::env::temp_dir().join(format!("demo-resources-steal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("overhead.json"), stolen.to_string()).unwrap();
        let text = super::sidecars_beside(&dir.join("overhead.json"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains("the host took up to 0.90 vCPU from this VM"), "{text}");
    }
}
