//! `cargo xtask bench scale`: how the node proxy's cost grows with the cluster and with the
//! connections it holds, then (bench_soak) whether it stays flat over time.
//!
//! 1. Pods: 10, 100, 1,000 and 5,000 pods, a Service (with its EndpointSlice), a DestinationRule,
//!    a VirtualService and an AuthorizationPolicy per 5 pods. Four pods are real (network
//!    namespaces with processes, captured by eBPF: `client` on node-a; `web-v1`, `web-v2` and
//!    `hold` on node-b); the rest exist only in the config directory the proxies watch, spread
//!    over both nodes, never sent traffic. Per size: each proxy's PSS and RSS (smaps_rollup, after
//!    the allocator trimmer's turn), how long both took to load the config, the config apply time
//!    (a VirtualService routing a new header value to `web-v2` written, until a real request from
//!    `client` through both proxies lands on `web-v2`), and node-a's BPF map entries (bpftool,
//!    the maps the proxy holds open).
//! 2. Connections: 1k, 5k and 10k connections from `client` to `hold` (a TCP port: L4, one HBONE
//!    stream each between the nodes), idle, then each carrying an HTTP/1.1 request every 5 s. Both
//!    proxies run with `--max-connections`/`--max-connections-per-source` raised to 12,000 (the
//!    default per-source cap, from `--memory-budget-mib 192`, refuses one source past 384).
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_e2e::{ClusterSpec, SimCluster, bins, cluster::run_with_timeout};
use serde_json::{Value, json};

use crate::{
    bench_abuse::node_proxy_pid,
    bench_account::proc_mem,
    bench_scale_chart::{COLORS, Chart, Series, line_chart},
    bench_util::{rss_mib, seed_policies, write_json},
};

pub const NS: &str = "scale";
const WEB_VIP: &str = "10.96.9.1";
const HOLD_ADDR: &str = "10.96.9.2:7000";
const REAL_PODS: usize = 4;
const PODS_PER_SERVICE: usize = 5;
pub const POD_COUNTS: [usize; 4] = [10, 100, 1000, 5000];
pub const CONN_COUNTS: [u64; 3] = [1000, 5000, 10000];
/// The proxies' connection caps for this bench (per listener and per source).
pub const CONN_CAP: &str = "12000";
const ACTIVE_INTERVAL_MS: u64 = 5000;
/// Config apply time measurements per cluster size (median reported).
const APPLY_REPEATS: usize = 3;

pub struct Opts {
    pub soak_minutes: u64,
}

fn spec() -> ClusterSpec {
    let mut s = ClusterSpec::new(2)
        .namespace(NS, true)
        .pod("client", NS, 0, "client", 9000)
        .pod_labelled("web-v1", NS, 1, "web", &[("version", "v1")], "http", 8080)
        .pod_labelled("web-v2", NS, 1, "web", &[("version", "v2")], "http", 8080)
        .service_named("web", NS, [10, 96, 9, 1], "web", "http", 80, 8080)
        .pod_labelled("hold", NS, 1, "hold", &[], "tcp", 7000)
        .service_named("hold", NS, [10, 96, 9, 2], "hold", "tcp", 7000, 7000);
    s.start_proxies = false;
    s
}

pub fn proxy_args() -> [&'static str; 4] {
    ["--max-connections", CONN_CAP, "--max-connections-per-source", CONN_CAP]
}

pub fn run(out_dir: &Path, opts: &Opts) -> anyhow::Result<()> {
    let started = Instant::now();
    let c = SimCluster::start(spec())?;
    for i in 0..2 {
        c.start_proxy_with(i, &proxy_args())?;
    }
    let probe = bins::path("mesh-probe");
    for name in ["web-v1", "web-v2"] {
        c.serve_in_pod(name, &probe, &["http-serve", "--name", name, "--port", "8080"], 8080)?;
    }
    c.serve_in_pod("hold", &probe, &["http-serve", "--name", "hold", "--port", "7000"], 7000)?;
    c.apply_config("web-route.yaml", &web_route(None))?;
    let pids: Vec<u32> = (0..2).filter_map(|i| node_proxy_pid(&c, i)).collect();
    anyhow::ensure!(pids.len() == 2, "both node proxies should run");

    eprintln!("bench scale: cluster size (config-only pods, {REAL_PODS} real ones)...");
    let mut sizes = Vec::new();
    for total in POD_COUNTS {
        let row = measure_size(&c, &pids, total).with_context(|| format!("{total} pods"))?;
        eprintln!("  {total} pods: {row}");
        sizes.push(row);
    }
    // The connections on the small cluster again: the config-only objects gone.
    let before: Vec<u64> = (0..2).map(|i| c.counter(i, "proxy", "config_reloads")).collect();
    std::fs::remove_file(c.config_dir.join("scale-objects.yaml"))?;
    for (i, b) in before.iter().enumerate() {
        wait_reload(&c, i, *b, Duration::from_secs(60))?;
    }
    std::thread::sleep(Duration::from_secs(6));
    eprintln!("bench scale: connections held through the proxies ({} per proxy allowed)...", CONN_CAP);
    // Warm-up: the tunnel between the nodes, pools, certificates.
    let warm = c.run_in_pod("client", &probe, &["abuse", "active", HOLD_ADDR, "--count", "20", "--seconds", "3", "--interval-ms", "500"], Duration::from_secs(30))?;
    eprintln!("  warm-up: {}", String::from_utf8_lossy(&warm.stdout).trim());
    std::thread::sleep(Duration::from_secs(6));
    let mut conns = Vec::new();
    for mode in ["idle", "active"] {
        for n in CONN_COUNTS {
            let row = measure_conns(&c, &pids, mode, n).with_context(|| format!("{n} {mode} connections"))?;
            eprintln!("  {n} {mode}: {row}");
            conns.push(row);
        }
    }

    drop(c);

    let soak = if opts.soak_minutes > 0 { Some(crate::bench_soak::run(opts.soak_minutes)?) } else { None };
    let report = json!({
        "what": {
            "real": format!("{REAL_PODS} pods (network namespaces with processes, eBPF capture, 2 node proxies with mTLS between them); every connection and request"),
            "config_only": "the other pods, their Services, EndpointSlices, DestinationRules, VirtualServices and AuthorizationPolicies: YAML in the watched config directory, never sent traffic",
            "proxy_flags": proxy_args(),
            "services_per_pods": format!("1 per {PODS_PER_SERVICE}"),
            "active_interval_ms": ACTIVE_INTERVAL_MS,
        },
        "sizes": sizes,
        "connections": conns,
        "soak": soak,
        "seconds": started.elapsed().as_secs_f64(),
    });
    print_tables(&report);
    write_charts(out_dir, &report)?;
    write_json(&out_dir.join("scale.json"), &report)
}

/// node i's proxy memory, MiB.
fn mem(pid: u32) -> Value {
    let m = proc_mem(pid).unwrap_or_default();
    json!({"rss_mib": m.rss_kib as f64 / 1024.0, "pss_mib": m.pss_kib as f64 / 1024.0, "uss_mib": m.uss_kib as f64 / 1024.0})
}

pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits until node i's proxy counted `config_reloads` past `before` (bounded).
fn wait_reload(c: &SimCluster, i: usize, before: u64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while c.counter(i, "proxy", "config_reloads") <= before {
        if Instant::now() > deadline {
            bail!("node {i} did not reload its config within {limit:?}:\n{}", tail(&c.proxy_log_plain(i), 20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn measure_size(c: &SimCluster, pids: &[u32], total: usize) -> anyhow::Result<Value> {
    let objects = config_only(total.saturating_sub(REAL_PODS));
    let before: Vec<u64> = (0..2).map(|i| c.counter(i, "proxy", "config_reloads")).collect();
    let t0 = Instant::now();
    c.write_config_file("scale-objects.yaml", &objects.yaml)?;
    for (i, b) in before.iter().enumerate() {
        wait_reload(c, i, *b, Duration::from_secs(120))?;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let mut apply = Vec::new();
    for r in 0..APPLY_REPEATS {
        apply.push(apply_time(c, &format!("{total}-{r}"))?);
    }
    apply.sort_by(f64::total_cmp);
    // The allocator trimmer (every 5 s) gets its turn before memory is read.
    std::thread::sleep(Duration::from_secs(6));
    let maps = bpf_maps(pids[0]);
    Ok(json!({
        "pods": total, "real_pods": REAL_PODS, "config_only_pods": objects.pods, "services": objects.services + 2,
        "policies": objects.policies + 2, "config_bytes": objects.yaml.len(),
        "memory": [mem(pids[0]), mem(pids[1])],
        "config_load_s": load_s,
        "apply_ms": apply.iter().map(|s| s * 1000.0).collect::<Vec<_>>(),
        "apply_ms_median": apply[apply.len() / 2] * 1000.0,
        "bpf_maps_node_a": maps,
    }))
}

/// Writes a VirtualService sending `x-scale-gen: GEN` to web-v2, then sends real requests with
/// that header from `client` until one lands on web-v2: seconds from the write.
fn apply_time(c: &SimCluster, gen_: &str) -> anyhow::Result<f64> {
    let probe = bins::path("mesh-probe");
    let url = format!("http://{WEB_VIP}/");
    let header = format!("x-scale-gen: {gen_}");
    let t0 = Instant::now();
    c.write_config_file("web-route.yaml", &web_route(Some(gen_)))?;
    for _ in 0..3000 {
        if t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        let out = c.run_in_pod("client", &probe, &["http", &url, "--header", &header, "--timeout-ms", "2000"], Duration::from_secs(5))?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if v["by_pod"]["web-v2"].as_u64().unwrap_or(0) > 0 {
            return Ok(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("a request with {header} never reached web-v2 within 60 s")
}

/// web's subsets and its route: everything to v1, `x-scale-gen: GEN` to v2.
fn web_route(gen_: Option<&str>) -> String {
    let matched = gen_.map_or(String::new(), |g| format!("  - match:\n    - headers:\n        x-scale-gen: {{exact: \"{g}\"}}\n    route:\n    - destination: {{host: web, subset: v2}}\n"));
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  subsets:\n  - name: v1\n    labels: {{version: v1}}\n  - name: v2\n    labels: {{version: v2}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n{matched}  - route:\n    - destination: {{host: web, subset: v1}}\n"
    )
}

pub struct Objects {
    pub yaml: String,
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
}

/// `pods` pods that exist only in the config (10.245.0.0/16, alternating nodes), a Service with
/// its EndpointSlice per 5 of them (10.97.0.0/16), and per Service the seed's DestinationRule and
/// VirtualService and an AuthorizationPolicy allowing the namespace.
pub fn config_only(pods: usize) -> Objects {
    use std::fmt::Write as _;
    let mut y = String::new();
    let services = pods.div_ceil(PODS_PER_SERVICE);
    let ip = |k: usize, a: u8| format!("10.{a}.{}.{}", k / 250, k % 250 + 1);
    for k in 0..pods {
        let svc = k / PODS_PER_SERVICE;
        let node = ["node-a", "node-b"][k % 2];
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cfg-{k}\n  namespace: {NS}\n  uid: 00000000-0000-4000-9000-{k:012x}\n  labels:\n    app: cfg-{svc}\nspec:\n  nodeName: {node}\n  serviceAccountName: cfg-{svc}\n  containers:\n  - name: app\n    image: app\n    ports:\n    - name: http\n      containerPort: 8080\nstatus:\n  phase: Running\n  podIP: {0}\n  podIPs:\n  - ip: {0}\n  conditions:\n  - type: Ready\n    status: \"True\"\n---\n",
            ip(k, 245)
        );
    }
    for j in 0..services {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: cfg-{j}\n  namespace: {NS}\nspec:\n  clusterIP: {}\n  selector:\n    app: cfg-{j}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: cfg-{j}-sim\n  namespace: {NS}\n  labels:\n    kubernetes.io/service-name: cfg-{j}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n",
            ip(j, 97)
        );
        for k in (j * PODS_PER_SERVICE)..((j + 1) * PODS_PER_SERVICE).min(pods) {
            let node = ["node-a", "node-b"][k % 2];
            let _ = write!(
                y,
                "- addresses: [\"{}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, namespace: {NS}, name: cfg-{k}}}\n",
                ip(k, 245)
            );
        }
        y.push_str("---\n");
        y.push_str(&seed_policies(&format!("cfg-{j}"), NS));
        let _ = write!(
            y,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: cfg-{j}\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: cfg-{j}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"{NS}\"]\n---\n"
        );
    }
    Objects { yaml: y, pods, services, policies: services * 3 }
}

/// The BPF maps the process holds open (ids from /proc/PID/fdinfo), each with its entries now
/// (bpftool's dump) and capacity.
pub fn bpf_maps(pid: u32) -> Value {
    let mut ids: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("map_id:")).and_then(|v| v.trim().parse().ok())
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    let bpftool = |args: &[&str]| -> Option<Value> {
        let mut cmd = Command::new("bpftool");
        cmd.arg("-j").args(args);
        let out = run_with_timeout(cmd, Duration::from_secs(30)).ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    };
    let maps: Vec<Value> = ids
        .iter()
        .filter_map(|id| {
            let id = id.to_string();
            let show = bpftool(&["map", "show", "id", &id])?;
            let entries = bpftool(&["map", "dump", "id", &id]).and_then(|d| d.as_array().map(Vec::len));
            Some(json!({"name": show["name"], "type": show["type"], "max_entries": show["max_entries"], "entries": entries}))
        })
        .collect();
    json!(maps)
}

fn measure_conns(c: &SimCluster, pids: &[u32], mode: &str, n: u64) -> anyhow::Result<Value> {
    let base_fds: Vec<usize> = pids.iter().map(|p| fds(*p)).collect();
    let base: Vec<Value> = pids.iter().map(|p| mem(*p)).collect();
    let probe = bins::path("mesh-probe");
    let probe_s = probe.to_string_lossy().into_owned();
    let (count, interval) = (n.to_string(), ACTIVE_INTERVAL_MS.to_string());
    let hold_s: u64 = 40;
    let args = ["-n", "10", &probe_s, "abuse", mode, HOLD_ADDR, "--count", &count, "--seconds", &hold_s.to_string(), "--interval-ms", &interval];
    let t0 = Instant::now();
    let child = c.spawn_piped("client", Path::new("nice"), &args)?;
    // Until node-a's proxy holds (nearly) every connection, at most 25 s.
    let want = base_fds[0] + (n as f64 * 0.99) as usize;
    while fds(pids[0]) < want && t0.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let open_s = t0.elapsed().as_secs_f64();
    // Held (and, active, used at least once per interval) for a while before reading.
    std::thread::sleep(Duration::from_millis(ACTIVE_INTERVAL_MS + 3000));
    let held_fds: Vec<usize> = pids.iter().map(|p| fds(*p)).collect();
    let held: Vec<Value> = pids.iter().map(|p| mem(*p)).collect();
    let out = child.wait_with_output()?;
    let client: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!({"error": String::from_utf8_lossy(&out.stdout).to_string()}));
    // Back to quiet before the next level: the connections gone, the trimmer's turn.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().zip(&base_fds).any(|(p, b)| fds(*p) > b + 16) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(6));
    let per_conn = |i: usize| {
        let d_fds = held_fds[i].saturating_sub(base_fds[i]) as f64;
        let d_rss = held[i]["rss_mib"].as_f64().unwrap_or(0.0) - base[i]["rss_mib"].as_f64().unwrap_or(0.0);
        // Per connection the proxy actually holds (one descriptor each: the client side on
        // node-a, the server side on node-b), not per connection the client asked for.
        if d_fds > 0.0 { d_rss * 1024.0 / d_fds } else { f64::NAN }
    };
    Ok(json!({
        "mode": mode, "connections": n, "open_s": open_s,
        "fds_before": base_fds, "fds_held": held_fds,
        "memory_before": base, "memory_held": held,
        "rss_kib_per_connection": [per_conn(0), per_conn(1)],
        "rss_after_mib": pids.iter().map(|p| rss_mib(*p)).collect::<Vec<_>>(),
        "client": client,
    }))
}

/// A count for a table cell (`Value`'s Display ignores widths).
fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn print_tables(r: &Value) {
    println!("\nscale: cluster size ({} real pods, the rest config-only; a Service, DestinationRule, VirtualService and AuthorizationPolicy per {PODS_PER_SERVICE} pods)", REAL_PODS);
    println!("{:>6} {:>9} {:>9} {:>17} {:>17} {:>10} {:>14} {:>16}", "pods", "services", "YAML KiB", "node-a PSS/RSS", "node-b PSS/RSS", "load s", "apply ms p50", "MESH_DESTS a");
    for s in r["sizes"].as_array().into_iter().flatten() {
        let m = |i: usize, k: &str| f(&s["memory"][i][k]);
        let dests = s["bpf_maps_node_a"].as_array().into_iter().flatten().find(|m| m["name"].as_str().is_some_and(|n| n.starts_with("MESH_DESTS"))).map_or("-".into(), |m| format!("{}/{}", m["entries"], m["max_entries"]));
        println!(
            "{:>6} {:>9} {:>9.0} {:>8.1}/{:<8.1} {:>8.1}/{:<8.1} {:>10.2} {:>14.0} {:>16}",
            u(&s["pods"]), u(&s["services"]), f(&s["config_bytes"]) / 1024.0, m(0, "pss_mib"), m(0, "rss_mib"), m(1, "pss_mib"), m(1, "rss_mib"), f(&s["config_load_s"]), f(&s["apply_ms_median"]), dests
        );
    }
    if let Some(last) = r["sizes"].as_array().and_then(|a| a.last()) {
        let maps: Vec<String> = last["bpf_maps_node_a"].as_array().into_iter().flatten().map(|m| format!("{} {}/{}", m["name"].as_str().unwrap_or("?"), m["entries"], m["max_entries"])).collect();
        println!("node-a BPF maps at {} pods (entries/capacity): {}", last["pods"], maps.join(", "));
    }
    println!("\nscale: connections client (node-a) -> hold (node-b), L4 over HBONE, proxies with --max-connections{{,-per-source}} {CONN_CAP}");
    println!("{:>7} {:>7} {:>8} {:>16} {:>16} {:>17} {:>17} {:>12} {:>8}", "mode", "conns", "open s", "node-a RSS MiB", "node-b RSS MiB", "KiB/conn a / b", "fds held a / b", "requests ok", "failed");
    for c in r["connections"].as_array().into_iter().flatten() {
        println!(
            "{:>7} {:>7} {:>8.1} {:>6.1} -> {:<6.1} {:>6.1} -> {:<6.1} {:>8.1} / {:<6.1} {:>8} / {:<6} {:>12} {:>8}",
            c["mode"].as_str().unwrap_or(""),
            u(&c["connections"]),
            f(&c["open_s"]),
            f(&c["memory_before"][0]["rss_mib"]),
            f(&c["memory_held"][0]["rss_mib"]),
            f(&c["memory_before"][1]["rss_mib"]),
            f(&c["memory_held"][1]["rss_mib"]),
            f(&c["rss_kib_per_connection"][0]),
            f(&c["rss_kib_per_connection"][1]),
            u(&c["fds_held"][0]),
            u(&c["fds_held"][1]),
            u(&c["client"]["requests_ok"]),
            u(&c["client"]["failed"]),
        );
    }
    if !r["soak"].is_null() {
        crate::bench_soak::print_table(&r["soak"]);
    }
}

fn write_charts(dir: &Path, r: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let sizes = r["sizes"].as_array().cloned().unwrap_or_default();
    let pts = |node: usize, k: &str| sizes.iter().map(|s| (f(&s["pods"]), f(&s["memory"][node][k]))).collect::<Vec<_>>();
    let mem_series = vec![
        Series { label: "node-a RSS".into(), color: COLORS[0], points: pts(0, "rss_mib") },
        Series { label: "node-a PSS".into(), color: COLORS[1], points: pts(0, "pss_mib") },
        Series { label: "node-b RSS".into(), color: COLORS[2], points: pts(1, "rss_mib") },
        Series { label: "node-b PSS".into(), color: COLORS[3], points: pts(1, "pss_mib") },
    ];
    let note = format!("{REAL_PODS} real pods; the rest config-only. A Service, DR, VS and AuthorizationPolicy per {PODS_PER_SERVICE} pods.");
    let chart = Chart { title: "Node proxy memory vs pods in the cluster", x_label: "pods (log scale)", y_label: "MiB", log_x: true, note: &note };
    std::fs::write(dir.join("scale-memory.svg"), line_chart(&chart, &mem_series))?;
    let apply = vec![
        Series { label: "apply (write to routed)".into(), color: COLORS[0], points: sizes.iter().map(|s| (f(&s["pods"]), f(&s["apply_ms_median"]))).collect() },
        Series { label: "both proxies loaded".into(), color: COLORS[1], points: sizes.iter().map(|s| (f(&s["pods"]), f(&s["config_load_s"]) * 1000.0)).collect() },
    ];
    let chart = Chart { title: "Config apply time vs pods in the cluster", x_label: "pods (log scale)", y_label: "ms", log_x: true, note: "apply: median of 3, a VirtualService written until a real request is routed by it; poll every 200 ms" };
    std::fs::write(dir.join("scale-apply.svg"), line_chart(&chart, &apply))?;
    let conns = r["connections"].as_array().cloned().unwrap_or_default();
    let cs = |mode: &str, node: usize| conns.iter().filter(|c| c["mode"] == mode).map(|c| (f(&c["connections"]), f(&c["memory_held"][node]["rss_mib"]))).collect::<Vec<_>>();
    let series = vec![
        Series { label: "node-a, idle".into(), color: COLORS[0], points: cs("idle", 0) },
        Series { label: "node-a, active".into(), color: COLORS[1], points: cs("active", 0) },
        Series { label: "node-b, idle".into(), color: COLORS[2], points: cs("idle", 1) },
        Series { label: "node-b, active".into(), color: COLORS[3], points: cs("active", 1) },
    ];
    let chart = Chart { title: "Node proxy RSS vs connections held (L4 over HBONE)", x_label: "concurrent connections", y_label: "RSS MiB", log_x: false, note: "active: an HTTP/1.1 request every 5 s on each connection; node-a holds the clients' side, node-b the server's" };
    std::fs::write(dir.join("scale-connections.svg"), line_chart(&chart, &series))?;
    if !r["soak"].is_null() {
        std::fs::write(dir.join("scale-soak.svg"), crate::bench_soak::chart(&r["soak"]))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_only_objects_in_proportion() {
        let o = super::config_only(996);
        assert_eq!((o.pods, o.services, o.policies), (996, 200, 600));
        assert_eq!(o.yaml.matches("kind: Pod\n").count(), 996);
        assert_eq!(o.yaml.matches("kind: AuthorizationPolicy\n").count(), 200);
        assert_eq!(o.yaml.matches("- addresses:").count(), 996);
    }
}
