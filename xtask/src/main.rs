//! Project tasks: `cargo xtask setup | test | demo | bench`.
mod bench;
mod demo;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

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
    /// Run the local demo: the seed's services on two simulated nodes (needs root).
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Latency and throughput: direct pod-to-pod vs through the mesh (needs root).
    Bench {
        /// Where to write the JSON results.
        #[arg(long, default_value = "target/bench/l4.json")]
        json: PathBuf,
        /// Seconds per latency run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Test { args } => {
            setup::setup()?;
            require_root("the end-to-end tests")?;
            build_bins(false)?;
            run(cargo().args(["test", "--workspace", "--exclude", "mesh-ebpf"]).args(&args))
        }
        Task::Demo { seconds } => {
            setup::setup()?;
            require_root("the demo")?;
            build_bins(true)?;
            demo::run(seconds)
        }
        Task::Bench { json, seconds } => {
            setup::setup()?;
            require_root("the benchmark")?;
            build_bins(true)?;
            bench::run(&workspace_root().join(json), seconds)
        }
    }
}
