//! Whole-node accounting for the benchmarks: memory as a node pays it, node CPU beside the
//! proxies' own, medians and spread over repeats, and targets that can fail.
//!
//! Memory. Per process, from `/proc/PID/smaps_rollup`: RSS, PSS and USS (private: Private_Clean +
//! Private_Dirty). Per simulated node (the mesh CA counted on the node it runs on), what the node
//! pays: the private memory of every mesh process on it, plus one copy of each binary's shared
//! pages. A binary's shared pages are approximated as the largest `RSS - USS` among the group's
//! processes of that executable (same file: device and inode of `/proc/PID/exe`). That
//! approximation also counts shared libraries (libc, ...) once per binary: a little more than a
//! real node pays, where they are shared with everything else too.
//!
//! CPU. Node CPU is the time the VM's CPUs were not idle: wall time x CPUs, less `/proc/stat`'s
//! idle + iowait and the host's steal. Here the whole VM is "the node" (both simulated nodes, the
//! load generator and the applications share it), so what a mode adds shows as the difference to
//! the no-mesh run of the same phase, including kernel work outside the proxies (iptables and
//! conntrack for sidecars, eBPF and softirq for the mesh). Proxy CPU is the processes' own
//! utime + stime (`/proc/PID/stat`).
//!
//! Why not the sum of user + system + irq + softirq: on a kernel with tick-based CPU accounting
//! (`CONFIG_TICK_CPU_ACCOUNTING`, this VM's, HZ 250) those fields are sampled at each 4 ms tick,
//! and a load paced at 1000 or 143 requests a second runs in step with the tick: the L7 bench's
//! mesh pair at 1000 rps read 1.02 vCPU in one repeat and 0.07 in another while the simulated
//! cluster's cgroup (the scheduler's exact runtime) said 0.48 and 0.43. Idle and iowait
//! are exact on a tickless kernel (`NO_HZ`: the idle entry and exit are timed), and steal comes
//! from the hypervisor's clock, so their complement is exact too. The tick-sampled user, system
//! and irq shares are kept only to split that exact total.
use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::{Value, json};

use crate::bench_util::{clk_tck, cpu_seconds, verdict};

/// One process's memory, KiB.
#[derive(Clone, Debug, Default)]
pub struct ProcMem {
    pub pid: u32,
    /// (device, inode) of the executable, and its file name.
    pub exe: (u64, u64),
    pub exe_name: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub uss_kib: u64,
}

pub fn proc_mem(pid: u32) -> Option<ProcMem> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim_start_matches(':').split_whitespace().next()?.parse().ok())).unwrap_or(0)
    };
    let meta = fs::metadata(format!("/proc/{pid}/exe")).ok();
    let exe_name = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    Some(ProcMem {
        pid,
        exe: meta.map_or((0, pid as u64), |m| (m.dev(), m.ino())),
        exe_name,
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
        uss_kib: field("Private_Clean:") + field("Private_Dirty:"),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What one group of processes (a node's mesh processes) costs, MiB.
#[derive(Clone, Debug, Default)]
pub struct GroupMem {
    pub name: String,
    pub procs: Vec<ProcMem>,
    /// Sum of USS + each binary's shared pages once.
    pub node_mib: f64,
    pub private_mib: f64,
    pub shared_mib: f64,
    pub rss_mib: f64,
    pub pss_mib: f64,
}

pub fn group_mem(name: &str, pids: &[u32]) -> GroupMem {
    let procs: Vec<ProcMem> = pids.iter().filter_map(|p| proc_mem(*p)).collect();
    let mut shared: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for p in &procs {
        let s = shared.entry(p.exe).or_default();
        *s = (*s).max(p.rss_kib.saturating_sub(p.uss_kib));
    }
    let private: u64 = procs.iter().map(|p| p.uss_kib).sum();
    let shared_kib: u64 = shared.values().sum();
    GroupMem {
        name: name.into(),
        node_mib: mib(private + shared_kib),
        private_mib: mib(private),
        shared_mib: mib(shared_kib),
        rss_mib: mib(procs.iter().map(|p| p.rss_kib).sum()),
        pss_mib: mib(procs.iter().map(|p| p.pss_kib).sum()),
        procs,
    }
}

/// Memory of every group (nodes, control plane) and their total.
#[derive(Clone, Debug, Default)]
pub struct Accounting {
    pub groups: Vec<GroupMem>,
}

impl Accounting {
    pub fn take(groups: &[(String, Vec<u32>)]) -> Self {
        Self { groups: groups.iter().map(|(n, p)| group_mem(n, p)).collect() }
    }
    pub fn node_mib(&self) -> f64 {
        self.groups.iter().map(|g| g.node_mib).fold(0.0, |a, b| a + b)
    }
    pub fn rss_mib(&self) -> f64 {
        self.groups.iter().map(|g| g.rss_mib).fold(0.0, |a, b| a + b)
    }
    pub fn pss_mib(&self) -> f64 {
        self.groups.iter().map(|g| g.pss_mib).fold(0.0, |a, b| a + b)
    }
    pub fn private_mib(&self) -> f64 {
        self.groups.iter().map(|g| g.private_mib).fold(0.0, |a, b| a + b)
    }
    pub fn to_json(&self) -> Value {
        json!({
            "node_accounted_mib": self.node_mib(),
            "rss_mib": self.rss_mib(),
            "pss_mib": self.pss_mib(),
            "private_mib": self.private_mib(),
            "groups": self.groups.iter().map(|g| json!({
                "name": g.name,
                "node_accounted_mib": g.node_mib,
                "private_mib": g.private_mib,
                "shared_once_per_binary_mib": g.shared_mib,
                "rss_mib": g.rss_mib,
                "pss_mib": g.pss_mib,
                "processes": g.procs.iter().map(|p| json!({
                    "pid": p.pid, "exe": p.exe_name,
                    "rss_mib": mib(p.rss_kib), "pss_mib": mib(p.pss_kib), "uss_mib": mib(p.uss_kib),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `/proc/stat`'s all-CPU line, in ticks of `clk_tck()`.
#[derive(Clone, Copy, Debug, Default)]
struct NodeTicks {
    /// user + nice, system, irq + softirq: sampled at the scheduler tick (see the module doc).
    user: u64,
    system: u64,
    irq: u64,
    /// idle + iowait: exact on a tickless kernel.
    idle: u64,
    steal: u64,
    /// The `cpuN` lines: the CPUs the all-CPU line sums (not this process's affinity).
    cpus: usize,
}

fn node_ticks() -> NodeTicks {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return NodeTicks::default() };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let g = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is in user already)
    let cpus = stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    NodeTicks { user: g(0) + g(1), system: g(2), irq: g(5) + g(6), idle: g(3) + g(4), steal: g(7), cpus }
}

/// Node CPU over `wall` seconds on `cpus` CPUs between two readings, vCPU:
/// (busy, user, system, irq + softirq, steal). Busy is the CPUs' time less idle and steal; the
/// tick-sampled user / system / irq split it in their proportions.
fn node_use(a: NodeTicks, b: NodeTicks, wall: f64, cpus: f64, tck: f64) -> [f64; 5] {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / tck;
    let (idle, steal) = (d(a.idle, b.idle), d(a.steal, b.steal));
    let busy = (wall * cpus - idle - steal).max(0.0);
    let sampled = [d(a.user, b.user), d(a.system, b.system), d(a.irq, b.irq)];
    let total: f64 = sampled.iter().sum();
    let share = |x: f64| if total > 0.0 { busy * x / total } else { 0.0 };
    [busy / wall, share(sampled[0]) / wall, share(sampled[1]) / wall, share(sampled[2]) / wall, steal / wall]
}

/// CPU seconds a cgroup (v2, with its descendants) has used: `cpu.stat`'s usage_usec, which
/// cgroup v2 keeps without the cpu controller.
fn cgroup_cpu_seconds(cgroup: &Path) -> Option<f64> {
    let stat = fs::read_to_string(cgroup.join("cpu.stat")).ok()?;
    stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse::<f64>().ok()).map(|us| us / 1e6)
}

/// How node CPU is counted, for the reports.
pub const NODE_CPU_METHOD: &str = "the time the whole VM's CPUs were not idle: wall time x CPUs less /proc/stat's idle, iowait and steal, which a tickless kernel times exactly (its user, system and irq fields are sampled at the 4 ms tick and only split that total)";

/// Steal above this (vCPU, over a phase) is reported.
pub const STEAL_NOTE_VCPU: f64 = 0.05;

/// Node and process CPU over a phase (and a cgroup's, when given: the simulated cluster's).
pub struct CpuMeter {
    pids: Vec<u32>,
    node0: NodeTicks,
    proc0: f64,
    cgroup: Option<(PathBuf, f64)>,
    t0: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    pub wall_s: f64,
    /// vCPU (cores busy on average) over the phase.
    pub node_vcpu: f64,
    pub node_user_vcpu: f64,
    pub node_system_vcpu: f64,
    pub node_irq_vcpu: f64,
    /// Time the hypervisor ran something else while this VM wanted its CPUs (`steal`): on a
    /// shared host it slows every mode alike, so latency and saturation then say little.
    pub node_steal_vcpu: f64,
    /// The CPUs `node_vcpu` is out of.
    pub node_cpus: usize,
    pub proc_vcpu: f64,
    pub proc_cpu_s: f64,
    /// The cgroup's CPU (every process of the simulated cluster), vCPU.
    pub cluster_vcpu: Option<f64>,
}

impl CpuMeter {
    pub fn start_in(pids: &[u32], cgroup: Option<&Path>) -> Self {
        let cgroup = cgroup.and_then(|c| Some((c.to_path_buf(), cgroup_cpu_seconds(c)?)));
        Self { pids: pids.to_vec(), node0: node_ticks(), proc0: cpu_seconds(pids), cgroup, t0: Instant::now() }
    }
    pub fn stop(&self) -> CpuUse {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        let now = node_ticks();
        let cpus = if now.cpus > 0 { now.cpus } else { cpus() };
        let [node, user, system, irq, steal] = node_use(self.node0, now, wall, cpus as f64, clk_tck());
        let proc_cpu_s = cpu_seconds(&self.pids) - self.proc0;
        let cluster_vcpu = self.cgroup.as_ref().and_then(|(c, c0)| Some((cgroup_cpu_seconds(c)? - c0) / wall));
        if steal >= STEAL_NOTE_VCPU {
            eprintln!("note: the host took {steal:.2} vCPU from this VM (steal) during this phase: its latency and throughput are the host's as much as the mode's");
        }
        CpuUse { wall_s: wall, node_vcpu: node, node_user_vcpu: user, node_system_vcpu: system, node_irq_vcpu: irq, node_steal_vcpu: steal, node_cpus: cpus, proc_vcpu: proc_cpu_s / wall, proc_cpu_s, cluster_vcpu }
    }
}

impl CpuUse {
    pub fn to_json(self) -> Value {
        json!({
            "wall_s": self.wall_s,
            "node_vcpu": self.node_vcpu,
            "node_user_vcpu": self.node_user_vcpu,
            "node_system_vcpu": self.node_system_vcpu,
            "node_irq_softirq_vcpu": self.node_irq_vcpu,
            "node_steal_vcpu": self.node_steal_vcpu,
            "proxy_vcpu": self.proc_vcpu,
            "proxy_cpu_s": self.proc_cpu_s,
            "cluster_vcpu": self.cluster_vcpu,
            // CPU the host took counts: the VM could not have used it either.
            "node_saturated": self.node_vcpu + self.node_steal_vcpu >= 0.9 * self.node_cpus.max(1) as f64,
        })
    }
}

/// Median, min and max of the finite values (NaN when there is none).
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Spread {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN, n: 0 };
    }
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Spread { median, min: v[0], max: v[n - 1], n }
}

impl Spread {
    pub fn to_json(self) -> Value {
        let f = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        json!({"median": f(self.median), "min": f(self.min), "max": f(self.max), "n": self.n})
    }
    /// "1.23 [1.10-1.40]" (the range only with more than one value).
    pub fn show(self, digits: usize) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        if self.n > 1 { format!("{:.digits$} [{:.digits$}-{:.digits$}]", self.median, self.min, self.max) } else { format!("{:.digits$}", self.median) }
    }
}

/// A target: the median over repeats against a limit.
pub struct Target {
    pub key: &'static str,
    pub what: String,
    pub values: Vec<f64>,
    pub limit: f64,
    /// true: the value must be at most the limit; false: at least.
    pub at_most: bool,
    pub unit: &'static str,
    pub digits: usize,
}

impl Target {
    pub fn spread(&self) -> Spread {
        spread(&self.values)
    }
    pub fn met(&self) -> bool {
        let m = self.spread().median;
        m.is_finite() && if self.at_most { m <= self.limit } else { m >= self.limit }
    }
    /// Distance to the limit on the good side (negative: missed by that much).
    pub fn margin(&self) -> f64 {
        let m = self.spread().median;
        if self.at_most { self.limit - m } else { m - self.limit }
    }
    /// Whether every repeat alone would meet (or miss) it: "all", "none" or "some".
    fn repeats_met(&self) -> &'static str {
        let ok = self.values.iter().filter(|v| v.is_finite() && if self.at_most { **v <= self.limit } else { **v >= self.limit }).count();
        if ok == self.values.len() {
            "every repeat"
        } else if ok == 0 {
            "no repeat"
        } else {
            "some repeats"
        }
    }
    pub fn line(&self) -> String {
        let d = self.digits;
        let s = self.spread();
        format!(
            "{}: {}{} (target {} {:.d$}{}): {}, margin {:+.d$}{}; met in {} of {}",
            self.what,
            s.show(d),
            self.unit,
            if self.at_most { "<=" } else { ">=" },
            self.limit,
            self.unit,
            if s.n == 0 { "NOT MEASURED" } else { verdict(self.met()) },
            self.margin(),
            self.unit,
            self.repeats_met(),
            self.values.len()
        )
    }
    pub fn to_json(&self) -> Value {
        let f = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        json!({
            "what": self.what,
            "value": f(self.spread().median),
            "spread": self.spread().to_json(),
            "values": self.values.iter().map(|v| f(*v)).collect::<Vec<_>>(),
            "target": self.limit,
            "at_most": self.at_most,
            "met": self.met(),
            "margin": f(self.margin()),
            "unit": self.unit,
            "digits": self.digits,
        })
    }
}

/// Prints the targets under a heading; returns the JSON map and the keys of the missed ones.
pub fn report_targets(bench: &str, targets: &[Target]) -> (Value, Vec<String>) {
    println!("\n{bench} targets (median of repeats [min-max]):");
    let mut map = serde_json::Map::new();
    let mut missed = Vec::new();
    for t in targets {
        println!("- {}", t.line());
        map.insert(t.key.into(), t.to_json());
        if !t.met() {
            missed.push(format!("{bench}: {}", t.key));
        }
    }
    (Value::Object(map), missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_targets() {
        let s = spread(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread(&[1.0, 2.0]).median, 1.5);
        assert!(spread(&[]).median.is_nan());
        let t = Target { key: "k", what: "x".into(), values: vec![0.1, 0.3, 0.2], limit: 0.25, at_most: true, unit: "", digits: 2 };
        assert!(t.met());
        assert!((t.margin() - 0.05).abs() < 1e-9);
        assert!(t.line().contains("some repeats"), "{}", t.line());
        let nan = Target { key: "k", what: "x".into(), values: vec![f64::NAN], limit: 1.0, at_most: false, unit: "", digits: 1 };
        assert!(!nan.met());
    }

    #[test]
    fn node_cpu_is_what_was_not_idle_split_by_the_sampled_shares() {
        let a = NodeTicks { user: 100, system: 50, irq: 10, idle: 1000, steal: 5, cpus: 2 };
        // 10 s on 2 CPUs at 100 ticks/s: 2000 ticks, of which 1500 idle and 100 stolen, so 400
        // busy, while the tick saw 30 of user, 10 of system and 0 of irq (a load in step with it).
        let b = NodeTicks { user: 130, system: 60, irq: 10, idle: 2500, steal: 105, cpus: 2 };
        let [busy, user, system, irq, steal] = node_use(a, b, 10.0, 2.0, 100.0);
        let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(close(busy, 0.4) && close(steal, 0.1), "busy {busy} steal {steal}");
        assert!(close(user, 0.3) && close(system, 0.1) && close(irq, 0.0), "{user} {system} {irq}");
        // A tick that saw nothing busy still leaves the exact total.
        let quiet = NodeTicks { idle: 2500, steal: 5, ..a };
        let [busy, user, ..] = node_use(a, quiet, 10.0, 2.0, 100.0);
        assert!(close(busy, 0.5) && close(user, 0.0), "busy {busy} user {user}");
        // This machine's own reading counts its CPUs.
        assert!(node_ticks().cpus >= 1);
    }

    #[test]
    fn own_process_memory() {
        let me = proc_mem(std::process::id()).expect("own smaps_rollup");
        assert!(me.rss_kib > 0 && me.uss_kib <= me.rss_kib && me.pss_kib <= me.rss_kib);
        // Two entries for the same process: its shared pages are counted once.
        let g = group_mem("self", &[std::process::id(), std::process::id()]);
        assert!((g.private_mib - 2.0 * me.uss_kib as f64 / 1024.0).abs() < 1.0);
        assert!(g.shared_mib <= (me.rss_kib - me.uss_kib) as f64 / 1024.0 + 1.0);
    }
}
