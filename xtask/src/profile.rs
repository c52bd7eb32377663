//! `cargo xtask profile`: where the mesh's CPU goes on one L7 pair (the L7 bench's cluster:
//! `client-mesh` on node-a calling `srv` on node-b through both node proxies, HBONE mTLS, the
//! seed's policies), on the overhead bench's mesh cluster at the seed's load (`--seed`), on the
//! L4 bench's request-response (`--l4`) or on one bulk transfer (`--bulk-mib`), for working on
//! the proxy's cost rather than reporting it.
//!
//! Each variant is a set of extra `mesh-node run` arguments (the empty one is the default);
//! every repeat restarts both proxies with each variant in turn and measures them at a fixed
//! rate, so variants are compared interleaved in one run on this noisy VM. Prints, per variant,
//! the CPU each process spends per 1000 requests and the p50/p99. `--perf` also samples the
//! first variant's proxies with `perf` and prints the hottest symbols and the kernel / proxy /
//! library split (`MESH_PROFILE_KEEP=FILE` keeps the perf data).
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use mesh_e2e::{SimCluster, bins};

use crate::{
    bench_account::spread,
    bench::CROSS_NODE_TARGET,
    bench_l7::{self, APP_PORT, BODY, GRPC_VIP, HTTP_VIP},
    bench_overhead,
    bench_util::{cpu_seconds, ms, ok_count, probe_json},
};

pub struct Opts {
    pub grpc: bool,
    /// The overhead bench's mesh cluster (seven services on two nodes) at the seed's load
    /// instead of one L7 pair; CPU per 1000 service requests.
    pub seed: bool,
    /// The L4 bench's request-response (cross node, mTLS) instead of HTTP.
    pub l4: bool,
    /// With `seed`: every port named `tcp`, so the proxies only tunnel.
    pub opaque: bool,
    /// MiB per bulk transfer (the L4 bench's cluster, cross node, mTLS) instead of requests.
    pub bulk_mib: Option<u64>,
    pub seconds: u64,
    pub rate: u64,
    pub repeats: usize,
    pub variants: Vec<String>,
    pub perf: bool,
    pub strace: bool,
}

pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let probe = bins::path("mesh-probe");
    let c = if opts.bulk_mib.is_some() || opts.l4 {
        let c = SimCluster::start(crate::bench::spec(true, false))?;
        crate::bench::start_servers(&c)?;
        c
    } else if opts.seed {
        let c = SimCluster::start(bench_overhead::spec_with(bench_overhead::Mode::Mesh, opts.opaque))?;
        // Opaque ports balance per connection: callers spread their calls over the pods
        // themselves, so the calls cross nodes as often as without a mesh.
        bench_overhead::start_apps_with(&c, bench_overhead::Mode::Mesh, opts.opaque)?;
        c.apply_config("policies.yaml", &bench_overhead::policies())?;
        c
    } else {
        let c = SimCluster::start(bench_l7::spec())?;
        c.serve_in_pod("srv", &probe, &["http-serve", "--name", "srv", "--port", &APP_PORT.to_string(), "--body-bytes", &BODY.to_string()], APP_PORT)?;
        c.apply_config("policy.yaml", &bench_l7::policies())?;
        c
    };
    let url = if opts.seed {
        format!("http://{}:{}/", c.pod("bff").ip, bench_overhead::APP_PORT)
    } else if opts.grpc {
        format!("http://{GRPC_VIP}:50051/grpc")
    } else {
        format!("http://{HTTP_VIP}:80/")
    };
    let url = url.as_str();
    // bff requests a second that make the seed's service requests.
    let seed_rate = bench_overhead::SERVICE_RPS / bench_overhead::FANOUT;
    let mut variants = opts.variants.clone();
    if variants.is_empty() {
        variants.push(String::new());
    }
    // Per variant: (cpu per 1k requests of node-a's proxy, node-b's, the CA, p50, p99).
    let mut results: Vec<Vec<[f64; 5]>> = vec![Vec::new(); variants.len()];
    for rep in 0..opts.repeats.max(1) {
        for (vi, variant) in variants.iter().enumerate() {
            // `NAME=value` words are environment variables for this variant's proxies.
            let (env, args): (Vec<&str>, Vec<&str>) = variant
                .split_whitespace()
                .partition(|w| w.split_once('=').is_some_and(|(k, _)| !k.starts_with('-') && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')));
            for v in variants.iter().flat_map(|v| v.split_whitespace()) {
                if let Some((k, _)) = v.split_once('=') {
                    // SAFETY: xtask is single-threaded here; the variable only steers children.
                    unsafe { std::env::remove_var(k) };
                }
            }
            for (k, v) in env.iter().filter_map(|w| w.split_once('=')) {
                // SAFETY: as above.
                unsafe { std::env::set_var(k, v) };
            }
            for i in 0..c.nodes.len() {
                c.set_proxy_args(i, &args);
                c.restart_proxy(i)?;
            }
            let body = BODY.to_string();
            let rate = opts.rate.to_string();
            let count = (opts.rate * opts.seconds).to_string();
            let mib = opts.bulk_mib.unwrap_or(0);
            let (bulk_bytes, warm_bytes) = ((mib << 20).to_string(), ((mib / 8).max(16) << 20).to_string());
            let mut base = vec!["http", url, "--conns", "4", "--timeout-ms", "5000", "--body-bytes", &body];
            if opts.grpc {
                base.extend(["--h2", "--grpc"]);
            } else {
                base.extend(["--method", "POST"]);
            }
            let with = |extra: &[&str]| {
                let mut a = base.clone();
                a.extend_from_slice(extra);
                probe_json(&c, "client-mesh", &a, Duration::from_secs(opts.seconds + 60))
            };
            let bulk = |client: &str, target: &str, bytes: &str| probe_json(&c, client, &["bulk", target, "--bytes", bytes], Duration::from_secs(120));
            let rr = |seconds: u64| {
                let (rate, seconds) = (opts.rate.to_string(), seconds.to_string());
                let args = ["rr", CROSS_NODE_TARGET, "--rate", &rate, "--seconds", &seconds, "--conns", "4", "--size", "1024"];
                probe_json(&c, "client-mesh", &args, Duration::from_secs(opts.seconds + 60))
            };
            if opts.bulk_mib.is_some() {
                if rep == 0 && vi == 0 {
                    let d = bulk("client-direct", &format!("{}:7000", c.pod("srv-b").ip), &bulk_bytes)?;
                    eprintln!("profile: direct bulk {:.2} Gbit/s", d["mbit_per_s"].as_f64().unwrap_or(0.0) / 1000.0);
                }
                // Warm-up (an eighth of the transfer): the tunnel and its windows.
                bulk("client-mesh", CROSS_NODE_TARGET, &warm_bytes)?;
            } else if opts.l4 {
                rr(1)?;
            } else if opts.seed {
                bench_overhead::load(&c, url, seed_rate, 3, &[])?;
            } else {
                with(&["--rate", "500", "--count", "500"])?;
            }
            let pids: Vec<u32> = [c.proxy_pid(0), c.proxy_pid(1), c.ca_pid()].into_iter().map(|p| p.unwrap_or(0)).collect();
            let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(&[*p])).collect();
            let perf = (opts.perf && rep == 0 && vi == 0).then(|| start_perf(&pids[..2], opts.seconds)).transpose()?;
            let strace: Vec<_> = if opts.strace && rep == 0 { pids[..2].iter().map(|p| start_strace(*p)).collect::<anyhow::Result<_>>()? } else { Vec::new() };
            let lat = if opts.bulk_mib.is_some() {
                bulk("client-mesh", CROSS_NODE_TARGET, &bulk_bytes)?
            } else if opts.l4 {
                rr(opts.seconds)?
            } else if opts.seed {
                bench_overhead::load(&c, url, seed_rate, opts.seconds, &[])?
            } else {
                with(&["--rate", &rate, "--count", &count])?
            };
            // CPU per 1000 (service) requests, or per GiB moved.
            let per = match opts.bulk_mib {
                Some(mib) => mib as f64 / 1024.0,
                None if opts.seed => ok_count(&lat).max(1) as f64 * bench_overhead::FANOUT / 1000.0,
                None if opts.l4 => lat["requests"].as_u64().unwrap_or(0).max(1) as f64 / 1000.0,
                None => ok_count(&lat).max(1) as f64 / 1000.0,
            };
            let cpu: Vec<f64> = pids.iter().zip(&before).map(|(p, b)| (cpu_seconds(&[*p]) - b) / per).collect();
            let row = if opts.bulk_mib.is_some() {
                [cpu[0], cpu[1], cpu[2], lat["mbit_per_s"].as_f64().unwrap_or(0.0) / 1000.0, 0.0]
            } else {
                [cpu[0], cpu[1], cpu[2], ms(&lat, "p50_us"), ms(&lat, "p99_us")]
            };
            let outcome = if opts.bulk_mib.is_some() { format!("{:.3} Gbit/s", row[3]) } else { format!("p50 {:.3} ms, p99 {:.3} ms", row[3], row[4]) };
            eprintln!(
                "profile: repeat {} variant {:?}: vCPU-s per {}: node-a {:.3}, node-b {:.3}, CA {:.3}; {outcome}",
                rep + 1,
                variant,
                if opts.bulk_mib.is_some() { "GiB" } else { "1k requests" },
                row[0],
                row[1],
                row[2],
            );
            results[vi].push(row);
            for (node, child) in ["node-a", "node-b"].iter().zip(strace) {
                report_strace(node, child, if opts.bulk_mib.is_some() { per } else { per * 1000.0 })?;
            }
            if let Some((child, data)) = perf {
                report_perf(child, &data)?;
            }
        }
    }
    if opts.bulk_mib.is_some() {
        println!(
            "\nbulk, {} MiB per transfer, cross node, mTLS, {} repeat(s), median [min-max]; CPU in vCPU-s per GiB",
            opts.bulk_mib.unwrap_or(0),
            opts.repeats.max(1)
        );
    } else if opts.l4 {
        println!(
            "\nL4 request-response, 1 KiB each way over 4 connections, cross node, mTLS, at {} rps for {} s, {} repeat(s), median [min-max]",
            opts.rate,
            opts.seconds,
            opts.repeats.max(1)
        );
    } else if opts.seed {
        println!(
            "\nthe seed's load{} ({} service requests a second, {} bff requests) for {} s, {} repeat(s), median [min-max]; CPU per 1k service requests, latency of bff's requests",
            if opts.opaque { ", every port opaque TCP (tunnelled, no HTTP routing; callers round-robin over pod addresses)" } else { "" },
            bench_overhead::SERVICE_RPS,
            seed_rate.round(),
            opts.seconds,
            opts.repeats.max(1)
        );
    } else {
        println!(
            "\n{} at {} rps for {} s, {} repeat(s), median [min-max]",
            if opts.grpc { "gRPC" } else { "HTTP/1.1" },
            opts.rate,
            opts.seconds,
            opts.repeats.max(1)
        );
    }
    let per = if opts.bulk_mib.is_some() { "GiB" } else { "1k" };
    println!(
        "{:<40} {:>20} {:>20} {:>20} {:>20} {:>20}",
        "variant",
        format!("node-a vCPU-s/{per}"),
        format!("node-b vCPU-s/{per}"),
        format!("pair+CA vCPU-s/{per}"),
        if opts.bulk_mib.is_some() { "Gbit/s" } else { "p50 ms" },
        if opts.bulk_mib.is_some() { "" } else { "p99 ms" }
    );
    for (variant, rows) in variants.iter().zip(&results) {
        let col = |f: &dyn Fn(&[f64; 5]) -> f64| spread(&rows.iter().map(f).collect::<Vec<_>>()).show(3);
        println!(
            "{:<40} {:>20} {:>20} {:>20} {:>20} {:>20}",
            if variant.is_empty() { "(default)" } else { variant },
            col(&|r| r[0]),
            col(&|r| r[1]),
            col(&|r| r[0] + r[1] + r[2]),
            col(&|r| r[3]),
            if opts.bulk_mib.is_some() { String::new() } else { col(&|r| r[4]) }
        );
    }
    Ok(())
}

fn start_perf(pids: &[u32], seconds: u64) -> anyhow::Result<(std::process::Child, std::path::PathBuf)> {
    let data = std::env::temp_dir().join(format!("mesh-profile-{}.perf", std::process::id()));
    let list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    // `MESH_PROFILE_CALLGRAPH=dwarf` unwinds user stacks without frame pointers (at 999 Hz:
    // each sample copies 8 KiB of stack).
    let (freq, graph) = match std::env::var("MESH_PROFILE_CALLGRAPH") {
        Ok(mode) => ("999", mode),
        Err(_) => ("4999", "fp".to_string()),
    };
    let child = Command::new("perf")
        .args(["record", "-q", "-F", freq, "-e", "cpu-clock", "--call-graph", &graph, "-p", &list, "-o"])
        .arg(&data)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting perf record (apt install linux-perf)")?;
    Ok((child, data))
}

fn report_perf(mut child: std::process::Child, data: &std::path::Path) -> anyhow::Result<()> {
    child.wait()?;
    for sort in ["dso", "sym"] {
        let out = Command::new("perf")
            .args(["report", "--no-children", "--stdio", "-g", "none", "--percent-limit", "0.7", "--sort", sort, "-i"])
            .arg(data)
            .stderr(Stdio::null())
            .output()
            .context("perf report")?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("--- perf, by {sort} ---");
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(60) {
            println!("{line}");
        }
    }
    if let Some(keep) = std::env::var_os("MESH_PROFILE_KEEP") {
        std::fs::copy(data, &keep)?;
    }
    let _ = std::fs::remove_file(data);
    Ok(())
}

fn start_strace(pid: u32) -> anyhow::Result<std::process::Child> {
    Command::new("strace").args(["-c", "-f", "-p", &pid.to_string()]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().context("starting strace")
}

/// Syscalls per request (or GiB) of one proxy (strace -c; it slows the proxy, the counts stay).
fn report_strace(node: &str, child: std::process::Child, requests: f64) -> anyhow::Result<()> {
    // SIGINT makes strace detach and print its table.
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let out = child.wait_with_output()?;
    println!("--- syscalls per request, {node} ---");
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
            let calls: f64 = f[3].parse().unwrap_or(0.0);
            let errors: f64 = if f.len() >= 6 { f[4].parse().unwrap_or(0.0) } else { 0.0 };
            println!("{:>8.2} {:>8.2} errors  {}", calls / requests, errors / requests, f[f.len() - 1]);
        }
    }
    Ok(())
}
