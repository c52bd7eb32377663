//! `cargo xtask demo`: the seed's shape (a BFF calling recall, rank and rerank) on two simulated
//! nodes, with a live view of which pod answered each call.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_e2e::{ClusterSpec, SimCluster, bins};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// (service, VIP, port, target port, pods as (name, node))
const SERVICES: &[(&str, [u8; 4], u16, u16, &[(&str, usize)])] = &[
    ("lemo-service-recall", [10, 96, 0, 81], 8081, 8081, &[("recall-1", 0), ("recall-2", 1), ("recall-3", 1)]),
    ("lemo-service-rank", [10, 96, 0, 82], 8082, 8082, &[("rank-1", 1)]),
    ("lemo-service-rerank", [10, 96, 0, 83], 8083, 8083, &[("rerank-1", 0)]),
];

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace("lemo-dev", true).pod("bff", "lemo-dev", 0, "bff", 8000);
    for (svc, vip, port, target, pods) in SERVICES {
        let app = svc.trim_start_matches("lemo-service-");
        for (pod, node) in *pods {
            spec = spec.pod(pod, "lemo-dev", *node, app, *target);
        }
        spec = spec.service(svc, "lemo-dev", *vip, app, *port, *target);
    }
    spec
}

pub fn run(seconds: Option<u64>) -> anyhow::Result<()> {
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!("demo: building two simulated nodes (network namespaces, cgroups, eBPF capture, node proxies)...");
    let cluster = SimCluster::start(spec())?;
    cluster.start_servers()?;
    eprintln!("demo: bff (node-a) calls recall, rank and rerank through their Service VIPs; Ctrl-C to stop\n");

    // answers[service][pod] = count; "error ..." lines are counted under the error kind.
    let answers: Arc<Mutex<BTreeMap<String, BTreeMap<String, u64>>>> = Arc::default();
    let probe = bins::path("mesh-probe");
    let limit = seconds.unwrap_or(3600);
    let mut readers = Vec::new();
    for (svc, vip, port, _, _) in SERVICES {
        let addr = format!("{}.{}.{}.{}:{port}", vip[0], vip[1], vip[2], vip[3]);
        // 20 calls a second per service, bounded by the demo's time limit.
        let count = (limit * 20).to_string();
        let mut child = cluster.spawn_piped("bff", &probe, &["who", &addr, "--count", &count, "--interval-ms", "50", "--timeout-ms", "2000"])?;
        let stdout = child.stdout.take().expect("piped");
        let answers = answers.clone();
        let svc = svc.to_string();
        readers.push((child, std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let pod = line.split_whitespace().take(if line.starts_with("error") { 2 } else { 1 }).collect::<Vec<_>>().join(" ");
                *answers.lock().unwrap().entry(svc.clone()).or_default().entry(pod).or_default() += 1;
            }
        })));
    }

    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(limit) {
        std::thread::sleep(Duration::from_secs(1));
        print_summary(&answers.lock().unwrap(), start.elapsed());
    }
    eprintln!("\ndemo: stopping; tearing the simulated cluster down");
    for (mut child, reader) in readers {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
    }
    let final_answers = answers.lock().unwrap().clone();
    let stats: Vec<_> = (0..2).filter_map(|i| cluster.stats(i).ok()).collect();
    drop(cluster);
    print_summary(&final_answers, start.elapsed());
    for s in stats {
        println!("{}: capture {} | proxy {}", s["node"], s["capture"], s["proxy"]);
    }
    let recall = final_answers.get("lemo-service-recall").cloned().unwrap_or_default();
    let reached = ["recall-1", "recall-2", "recall-3"].iter().filter(|p| recall.get(**p).is_some_and(|n| *n > 0)).count();
    println!("recall pods reached: {reached} of 3");
    if reached < 3 {
        anyhow::bail!("traffic did not reach every recall pod");
    }
    Ok(())
}

fn print_summary(answers: &BTreeMap<String, BTreeMap<String, u64>>, elapsed: Duration) {
    println!("--- {:>5.1}s ----------------------------------------------", elapsed.as_secs_f64());
    for (svc, pods) in answers {
        let total: u64 = pods.values().sum();
        let row: Vec<String> = pods.iter().map(|(p, n)| format!("{p}: {n}")).collect();
        println!("{svc:<22} {total:>6} calls  {}", row.join("  "));
    }
}
