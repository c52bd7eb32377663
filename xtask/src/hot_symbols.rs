//! `cargo xtask hot-symbols`: which functions of `mesh-node` run at the seed's steady load, for
//! the linker to lay them out together (`mesh-node/hot-symbols.txt`, used by `mesh-node/build.rs`
//! in release builds).
//!
//! Why: the kernel maps code 64 KiB around every page first touched, and without an order the
//! few hundred KiB the data path runs are spread over 15 MB of `.text`, so a busy proxy keeps
//! about 8 MiB of code resident. Laid out together they take a few pages.
//!
//! How: the overhead bench's mesh cluster (seven services, the seed's policies, both node
//! proxies and the CA) at the seed's load and then idle (timers, config polls, rescans), sampled
//! with `perf record` (cpu-clock at 20 kHz, so that what an idle proxy runs for a few
//! microseconds a second is sampled too; frame-pointer call chains, where there are frame
//! pointers, add callers); every `mesh-node` function seen, those sampled themselves first,
//! hottest first.
//! Rerun it after large changes to the data path: names that no longer exist are skipped by the
//! linker, new functions just land in the usual order.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_e2e::SimCluster;

use crate::bench_overhead::{self, APP_PORT, FANOUT, Mode, SERVICE_RPS};

pub fn run(out: &Path, seconds: u64) -> anyhow::Result<()> {
    if Command::new("perf").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
        bail!("hot-symbols needs `perf` (Debian: apt install linux-perf)");
    }
    let c = SimCluster::start(bench_overhead::spec(Mode::Mesh))?;
    bench_overhead::start_apps(&c, Mode::Mesh)?;
    c.apply_config("policies.yaml", &bench_overhead::policies())?;
    let pids: Vec<u32> = bench_overhead::mesh_groups(&c).into_iter().flat_map(|g| g.1).collect();
    anyhow::ensure!(pids.len() == 3, "two node proxies and the CA should run, found {pids:?}");
    let url = format!("http://{}:{APP_PORT}/", c.pod("bff").ip);
    let rate = SERVICE_RPS / FANOUT;
    // Warm-up first: start-up and first-connection code is not what the order is for.
    bench_overhead::load(&c, &url, rate, 3, &[])?;
    let data = std::env::temp_dir().join(format!("mesh-hot-symbols-{}.perf", std::process::id()));
    let pid_list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut perf = Command::new("perf")
        .args(["record", "-q", "-F", "19999", "-e", "cpu-clock", "-g", "-p", &pid_list, "-o"])
        .arg(&data)
        .args(["--", "sleep", &(seconds + IDLE_SECONDS + 1).to_string()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    thread::sleep(Duration::from_millis(500));
    eprintln!("hot-symbols: {seconds} s at {SERVICE_RPS} service rps, sampling pids {pid_list}...");
    let load = bench_overhead::load(&c, &url, rate, seconds, &[])?;
    eprintln!("hot-symbols: then {IDLE_SECONDS} s idle...");
    let status = perf.wait()?;
    drop(c);
    anyhow::ensure!(status.success(), "perf record failed: {status}");
    let script = Command::new("perf")
        .args(["script", "-F", "ip,sym,dso", "--no-demangle", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("perf script")?;
    let _ = std::fs::remove_file(&data);
    let symbols = mesh_node_symbols(&String::from_utf8_lossy(&script.stdout));
    anyhow::ensure!(symbols.len() >= 100, "only {} mesh-node symbols sampled: is the binary stripped?", symbols.len());
    let mut file = format!(
        "# Functions of mesh-node seen running at the seed's load and idle (cargo xtask hot-symbols:\n# {seconds} s, {} requests, then {IDLE_SECONDS} s idle; perf samples at 20 kHz), those sampled\n# themselves first: {} symbols. The release build links them together (mesh-node/build.rs)\n# so the code a running proxy uses takes few pages.\n",
        load["requests"].as_u64().unwrap_or(0),
        symbols.len()
    );
    for name in &symbols {
        file.push_str(name);
        file.push('\n');
    }
    std::fs::write(out, file)?;
    println!("hot-symbols: {} symbols written to {}", symbols.len(), out.display());
    Ok(())
}

/// Seconds sampled after the load: what an idle proxy runs (timers, polls, rescans).
const IDLE_SECONDS: u64 = 30;

/// From `perf script -F ip,sym,dso` (one frame a line, samples separated by blank lines, the
/// leaf first): the binary's named functions, those seen as a leaf first (most samples first),
/// then those seen only as callers (most samples first).
fn mesh_node_symbols(script: &str) -> Vec<String> {
    use std::collections::HashMap;
    let (mut own, mut anywhere) = (HashMap::<&str, u64>::new(), HashMap::<&str, u64>::new());
    let mut leaf = true;
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() {
            leaf = true;
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(_ip), Some(sym), Some(dso)) = (fields.next(), fields.next(), fields.next()) else { continue };
        // `(/path/mesh-node)`, or `(/path/mesh-node (deleted))` split at the space.
        let ours = dso.trim_start_matches('(').trim_end_matches(')').ends_with("/mesh-node");
        if ours && sym != "[unknown]" {
            let sym = sym.split("+0x").next().unwrap_or(sym);
            if leaf {
                *own.entry(sym).or_default() += 1;
            }
            *anywhere.entry(sym).or_default() += 1;
        }
        // Kernel frames above the first user one: that function was running (in a syscall).
        if !dso.contains("kernel.kallsyms") {
            leaf = false;
        }
    }
    let mut ranked: Vec<(&str, u64, u64)> = anywhere.iter().map(|(s, n)| (*s, own.get(s).copied().unwrap_or(0), *n)).collect();
    ranked.sort_by(|a, b| (b.1 > 0).cmp(&(a.1 > 0)).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)).then(a.0.cmp(b.0)));
    ranked.into_iter().map(|(s, ..)| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_first_then_callers_only_the_binarys_named_functions() {
        let script = "
\tffffffff82250979 _raw_spin_unlock ([kernel.kallsyms])
\t5d1660 _ZN4poll17h1E (/work/target/release/mesh-node)
\t5d1000 _ZN3run17h2E.llvm.446766 (/work/target/release/mesh-node)

\t5d2000 _ZN5index17h3E (/work/target/release/mesh-node (deleted))
\t5d1660 _ZN4poll17h1E (/work/target/release/mesh-node (deleted))
\t14ceea0 [unknown] (/work/target/release/mesh-node)
\t7f00 memcpy (/usr/lib/x86_64-linux-gnu/libc.so.6)

\t5d2000 _ZN5index17h3E (/work/target/release/mesh-node)
\t5d1000 _ZN3run17h2E.llvm.446766 (/work/target/release/mesh-node)
";
        // index: leaf twice; poll: leaf once (kernel frames above it are not ours), caller once;
        // run: only a caller.
        assert_eq!(mesh_node_symbols(script), ["_ZN5index17h3E", "_ZN4poll17h1E", "_ZN3run17h2E.llvm.446766"]);
    }
}
