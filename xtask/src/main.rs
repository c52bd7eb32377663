//! Project tasks: `cargo xtask setup | test | demo | bench | fuzz`.
mod bench;
mod bench_abuse;
mod bench_account;
mod bench_chart;
mod bench_failure;
mod bench_l7;
mod bench_overhead;
mod bench_scale;
mod bench_scale_chart;
mod bench_soak;
mod bench_sockmap;
mod bench_surge;
mod bench_telemetry;
mod bench_util;
mod demo;
mod fuzz;
mod hot_symbols;
mod profile;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "xtask", about = "mesh project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: nightly rust-src, bpf-linker, bpftool, iproute2.
    Setup,
    /// Set up, build, and run every test (unit and end-to-end; the latter need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The users' story on two simulated nodes (needs root): gRPC balancing over one channel
    /// with mTLS, the canary, a failing pod (retries, ejection), a 2x burst, the proxies' cost.
    /// Each step checks what it shows; a failed expectation exits non-zero.
    Demo {
        /// About how long the whole script runs (at least 75): the steady phases stretch with it.
        #[arg(long, default_value_t = demo::DEFAULT_SECONDS)]
        seconds: u64,
        /// Run only this step (1-5).
        #[arg(long)]
        step: Option<u8>,
    },
    /// Latency and throughput: direct pod-to-pod vs through the mesh (L4), per-request proxying
    /// vs an Envoy sidecar pair (L7), one failing pod of five (failure), and a surge past capacity
    /// (surge). Needs root.
    Bench {
        /// `overhead`: no mesh vs Envoy sidecars vs the mesh on the seed's seven services
        /// (writes target/bench/overhead.{md,json,*.svg}); `micro`: Criterion benchmarks of the
        /// proxy's hot paths. Without it: the l4/l7/failure/surge parts (see --only).
        #[arg(value_enum)]
        suite: Option<Suite>,
        /// With `overhead`: short runs, a smoke test that every mode produces numbers.
        #[arg(long)]
        quick: bool,
        /// Where to write the L4 JSON results; l7.json and failure.json go next to it.
        #[arg(long, default_value = "target/bench/l4.json")]
        json: PathBuf,
        /// Seconds per L4 latency run and per failure-scenario run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seconds per L7 fixed-rate latency run.
        #[arg(long, default_value_t = 8)]
        l7_seconds: u64,
        /// Seconds per max-rps run, L4 and L7 (h2load, after a 1 s warm-up).
        #[arg(long, default_value_t = 5)]
        max_seconds: u64,
        /// Run only these parts (comma-separated or repeated); default: all.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<BenchPart>,
        /// Runs of each measured configuration, interleaved; medians with min-max are reported
        /// (default: 3, or 1 with --quick).
        #[arg(long)]
        repeats: Option<usize>,
        /// Exit non-zero when a target is missed (the numbers are for people: not used in CI).
        #[arg(long)]
        check: bool,
        /// A ztunnel binary: the L4 bench adds a ztunnel pair as a peer (skipped when absent).
        #[arg(long)]
        ztunnel: Option<PathBuf>,
        /// With `scale` and `soak`: minutes of the soak at the seed's load (0 with `scale`: no soak).
        #[arg(long, default_value_t = 30)]
        soak_minutes: u64,
    },
    /// Sample which mesh-node functions run at the seed's load (perf) and write them, hottest
    /// first, to mesh-node/hot-symbols.txt: the release build lays them out together so the
    /// data path's code takes few pages.
    HotSymbols {
        /// Seconds of load sampled.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Where the mesh's CPU goes on one L7 pair (the L7 bench's cluster), the overhead bench's
    /// mesh cluster at the seed's load (`--seed`), the L4 bench's request-response (`--l4`) or
    /// one bulk transfer (the L4 bench's): CPU
    /// per 1000 requests (or per GiB) of each node proxy and the CA, p50
    /// and p99 (or Gbit/s), for each variant of `mesh-node run` arguments, interleaved; `--perf`
    /// adds the hottest symbols, `--strace` the syscalls. For working on cost, not for reports.
    Profile {
        /// gRPC-shaped h2c instead of HTTP/1.1.
        #[arg(long)]
        grpc: bool,
        /// The overhead bench's mesh cluster (seven services, two nodes) at the seed's load
        /// instead of one pair; CPU per 1000 service requests, latency of bff's requests.
        #[arg(long, conflicts_with_all = ["grpc", "bulk_mib"])]
        seed: bool,
        /// The L4 bench's request-response instead (1 KiB each way over 4 raw TCP connections,
        /// cross node, mTLS): what the L4 pair spends beside a ztunnel pair.
        #[arg(long, conflicts_with_all = ["grpc", "seed", "bulk_mib"])]
        l4: bool,
        /// With `--seed`: every Service port named `tcp`, so the proxies tunnel connections and
        /// never handle a request (callers spread their calls over pod addresses themselves):
        /// what the seed's load costs the L4 layer alone.
        #[arg(long, requires = "seed")]
        opaque: bool,
        /// Bulk transfers of this many MiB (cross node, mTLS; the L4 bench's cluster) instead
        /// of requests; CPU is then per GiB.
        #[arg(long)]
        bulk_mib: Option<u64>,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Extra `mesh-node run` arguments of one variant (repeat the flag for more; none: the
        /// default only). `NAME=value` words are environment variables for its proxies.
        #[arg(long = "variant", allow_hyphen_values = true)]
        variants: Vec<String>,
        /// Sample the first run with perf and print the hottest symbols.
        #[arg(long)]
        perf: bool,
        /// Count each proxy's syscalls per request (strace -c) in the first repeat.
        #[arg(long)]
        strace: bool,
    },
    /// Run the cargo-fuzz targets (nightly; cargo-fuzz is installed if missing), one after the
    /// other, and report executions per target. Targets: config_yaml, sniff, http1_request,
    /// hbone_connect, csr, admin_request. Not part of `test`.
    Fuzz {
        /// One target; default: all of them in turn.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    Overhead,
    Micro,
    /// A legitimate client through the mesh while an attacker pod misbehaves (idle connections,
    /// slowloris, stalled uploads, TLS garbage); writes target/bench/abuse.json.
    Abuse,
    /// How cost grows: node proxy memory, config apply time and BPF map entries for 10 to 5,000
    /// pods (most config-only), RSS per idle and active connection up to 10,000, and a soak
    /// (--soak-minutes); writes target/bench/scale.{json,*.svg}.
    Scale,
    /// Only the soak of `scale`: the seed's services and load for --soak-minutes (default 30),
    /// RSS, descriptors and p99 per minute; writes target/bench/soak.json and scale-soak.svg.
    Soak,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchPart {
    L4,
    L7,
    Failure,
    /// Load doubling past capacity, without protection and with adaptive concurrency.
    Surge,
    /// Only the telemetry on/off comparison of the l7 part, on a cluster of its own.
    Telemetry,
    /// The socket fast path: the mesh without and with `--sockmap`, same run (sockmap.json).
    Sockmap,
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    // What `cargo run` told xtask about itself must not reach the builds it starts: ring's build
    // script reruns when CARGO_MANIFEST_DIR changes, so every `cargo xtask demo` or bench, and
    // the next plain `cargo build` after it, rebuilt ring, rustls and everything above them.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || ["CARGO_MANIFEST_DIR", "CARGO_MANIFEST_PATH", "CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&key.as_ref())
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Builds the binaries the simulated cluster runs, and points the harness at them.
pub fn build_bins(release: bool) -> anyhow::Result<()> {
    // A given build (e.g. a baseline to compare a change against) is used as it is.
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        eprintln!("using the binaries in {} (MESH_BIN_DIR)", PathBuf::from(dir).display());
        return Ok(());
    }
    let mut cmd = cargo();
    cmd.args(["build", "--bins", "-p", "mesh-node", "-p", "mesh-e2e"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = workspace_root().join("target").join(if release { "release" } else { "debug" });
    // SAFETY: set before any other thread exists.
    unsafe { std::env::set_var("MESH_BIN_DIR", dir) };
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    mesh_e2e::cluster::preflight().with_context(|| format!("{what} builds a simulated cluster with real eBPF"))
}

/// With `--check`, a missed target fails the command; without, misses are only listed.
fn fail_on_misses(check: bool, missed: &[String]) -> anyhow::Result<()> {
    if missed.is_empty() {
        return Ok(());
    }
    eprintln!("targets not met: {}", missed.join(", "));
    if check {
        bail!("{} target(s) not met (--check)", missed.len());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::HotSymbols { seconds } => {
            setup::setup()?;
            require_root("sampling the proxies")?;
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            hot_symbols::run(&workspace_root().join("mesh-node/hot-symbols.txt"), seconds)
        }
        Task::Profile { grpc, seed, l4, opaque, bulk_mib, seconds, rate, repeats, variants, perf, strace } => {
            setup::setup()?;
            require_root("profiling the proxies")?;
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            profile::run(&profile::Opts { grpc, seed, l4, opaque, bulk_mib, seconds, rate, repeats, variants, perf, strace })
        }
        Task::Fuzz { target, seconds } => fuzz::fuzz(target.as_deref(), seconds),
        Task::Test { args } => {
            setup::setup()?;
            require_root("the end-to-end tests")?;
            build_bins(false)?;
            run(cargo().args(["test", "--workspace", "--exclude", "mesh-ebpf"]).args(&args))?;
            // The overhead benchmark's smoke test: every mode (no mesh, Envoy sidecars, mesh)
            // produces numbers; what they are is the full benchmark's business.
            if args.is_empty() {
                // The Criterion hot-path benchmarks, each run once as a test, so they keep building.
                run(cargo().args(["test", "-p", "mesh-node", "--bench", "hot_paths"]))?;
                let out = workspace_root().join("target/bench-smoke");
                bench_overhead::run(&out, &bench_overhead::Opts { quick: true, repeats: 1 })?;
                bench_overhead::check_numbers(&out.join("overhead.json"))?;
            }
            Ok(())
        }
        Task::Demo { seconds, step } => {
            // Given binaries (MESH_BIN_DIR) need no toolchain to build them.
            if std::env::var_os("MESH_BIN_DIR").is_none() {
                setup::setup()?;
            }
            require_root("the demo")?;
            build_bins(true)?;
            demo::run(demo::Opts { seconds, step })
        }
        Task::Bench { suite: Some(Suite::Abuse), seconds, .. } => {
            setup::setup()?;
            require_root("the benchmark")?;
            build_bins(true)?;
            bench_abuse::run(&workspace_root().join("target/bench/abuse.json"), seconds)
        }
        Task::Bench { suite: Some(Suite::Scale), soak_minutes, .. } => {
            setup::setup()?;
            require_root("the benchmark")?;
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            bench_scale::run(&workspace_root().join("target/bench"), &bench_scale::Opts { soak_minutes })
        }
        Task::Bench { suite: Some(Suite::Soak), soak_minutes, .. } => {
            setup::setup()?;
            require_root("the benchmark")?;
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            anyhow::ensure!(soak_minutes >= 3, "--soak-minutes {soak_minutes}: the soak needs at least 3 minutes (a third of them is warm-up)");
            bench_soak::run_alone(&workspace_root().join("target/bench"), soak_minutes)
        }
        Task::Bench { suite: Some(Suite::Micro), .. } => run(cargo().args(["bench", "-p", "mesh-node", "--bench", "hot_paths"])),
        Task::Bench { suite: Some(Suite::Overhead), quick, repeats, check, .. } => {
            setup::setup()?;
            require_root("the benchmark")?;
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            let out = workspace_root().join("target/bench");
            let missed = bench_overhead::run(&out, &bench_overhead::Opts { quick, repeats: repeats.unwrap_or(if quick { 1 } else { 3 }) })?;
            if quick {
                bench_overhead::check_numbers(&out.join("overhead.json"))?;
            }
            fail_on_misses(check, &missed)
        }
        Task::Bench { json, seconds, l7_seconds, max_seconds, only, quick, repeats, check, ztunnel, .. } => {
            let repeats = repeats.unwrap_or(if quick { 1 } else { 3 });
            let mut missed = Vec::new();
            let part = |p: BenchPart| only.is_empty() || only.contains(&p);
            setup::setup()?;
            require_root("the benchmark")?;
            // MESH_BENCH_PREBUILT=1: use the binaries already in MESH_BIN_DIR (development).
            if std::env::var_os("MESH_BENCH_PREBUILT").is_none() || std::env::var_os("MESH_BIN_DIR").is_none() {
                build_bins(true)?;
            }
            let json = workspace_root().join(json);
            let sibling = |name: &str| json.with_file_name(name);
            let started = std::time::Instant::now();
            let mut failed = Vec::new();
            if part(BenchPart::L4) {
                missed.extend(bench::run(&json, &bench::Opts { seconds, max_seconds, repeats, ztunnel })?);
            }
            if part(BenchPart::Sockmap)
                && let Err(e) = bench_sockmap::run(&sibling("sockmap.json"), seconds, repeats)
            {
                eprintln!("bench sockmap: {e:#}");
                failed.push("sockmap");
            }
            if part(BenchPart::Failure)
                && let Err(e) = bench_failure::run(&sibling("failure.json"), seconds)
            {
                eprintln!("bench failure: {e:#}");
                failed.push("failure");
            }
            if part(BenchPart::Surge)
                && let Err(e) = bench_surge::run(&sibling("surge.json"))
            {
                eprintln!("bench surge: {e:#}");
                failed.push("surge");
            }
            if only.contains(&BenchPart::Telemetry)
                && let Err(e) = bench_telemetry::run_alone(&sibling("telemetry.json"), l7_seconds)
            {
                eprintln!("bench telemetry: {e:#}");
                failed.push("telemetry");
            }
            if part(BenchPart::L7) {
                match bench_l7::run(&sibling("l7.json"), &bench_l7::Opts { seconds: l7_seconds, max_seconds, repeats }) {
                    Ok(m) => missed.extend(m),
                    Err(e) => {
                        eprintln!("bench l7: {e:#}");
                        failed.push("l7");
                    }
                }
            }
            eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
            if !failed.is_empty() {
                bail!("bench parts failed: {}", failed.join(", "));
            }
            fail_on_misses(check, &missed)
        }
    }
}
