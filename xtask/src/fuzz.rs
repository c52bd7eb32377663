//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets of `fuzz/` (libFuzzer,
//! nightly), one after the other, each for N seconds, and reports executions per target. The
//! committed seeds (`fuzz/corpus/TARGET`) are read, never written: what the fuzzer finds goes
//! to `target/fuzz/corpus/TARGET`, crashes to `fuzz/artifacts/TARGET`. Not part of CI.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::workspace_root;

pub const TARGETS: &[&str] = &["config_yaml", "sniff", "http1_request", "hbone_connect", "csr", "admin_request"];

/// One target's run.
pub struct Outcome {
    pub target: String,
    pub executions: u64,
    pub seconds: u64,
    pub crashed: bool,
    pub log: std::path::PathBuf,
}

pub fn fuzz(target: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_tools()?;
    let mut outcomes = Vec::new();
    for t in targets {
        let outcome = run_target(t, seconds)?;
        eprintln!(
            "fuzz {}: {} executions in {} s{}",
            outcome.target,
            outcome.executions,
            outcome.seconds,
            if outcome.crashed { " -- CRASH, see the log" } else { ", no crash" }
        );
        outcomes.push(outcome);
    }
    println!("| target | seconds | executions | result |\n|---|---|---|---|");
    for o in &outcomes {
        println!("| {} | {} | {} | {} |", o.target, o.seconds, o.executions, if o.crashed { "crash" } else { "ok" });
    }
    let crashed: Vec<String> = outcomes.iter().filter(|o| o.crashed).map(|o| format!("{} ({})", o.target, o.log.display())).collect();
    if !crashed.is_empty() {
        bail!("crashes found: {}; reproduce with `cargo +nightly fuzz run --fuzz-dir fuzz TARGET fuzz/artifacts/TARGET/<file>`", crashed.join(", "));
    }
    Ok(())
}

/// A `cargo +nightly` command that does not inherit the outer (stable) cargo's choices.
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(workspace_root());
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The nightly toolchain must be there (setup installs it); cargo-fuzz is installed if missing.
fn ensure_tools() -> anyhow::Result<()> {
    let toolchains = Command::new("rustup").args(["toolchain", "list"]).output().context("rustup toolchain list")?;
    if !String::from_utf8_lossy(&toolchains.stdout).lines().any(|l| l.starts_with("nightly")) {
        bail!("fuzzing needs the nightly toolchain: rustup toolchain install nightly (or cargo xtask setup)");
    }
    let present = nightly_cargo().args(["fuzz", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if present.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    eprintln!("installing cargo-fuzz");
    let status = Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]).status().context("cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed with {status}");
    }
    Ok(())
}

fn run_target(target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let root = workspace_root();
    let work = root.join("target/fuzz/corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log = root.join("target/fuzz").join(format!("{target}.log"));
    let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let artifacts = root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    eprintln!("fuzz {target}: {seconds} s (log: {})", log.display());
    let status = nightly_cargo()
        .args(["fuzz", "run", "--fuzz-dir", "fuzz", "-O", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Inputs big enough for a few YAML documents or requests, small enough to stay fast.
        .arg("-max_len=16384")
        .arg("-rss_limit_mb=3072")
        .arg("-timeout=20")
        .arg("-print_final_stats=1")
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .with_context(|| format!("cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (executions, ran) = final_stats(&text);
    Ok(Outcome { target: target.into(), executions, seconds: ran.unwrap_or(seconds), crashed: !status.success(), log })
}

/// Executions and seconds from libFuzzer's last lines (`Done 123 runs in 60 second(s)`, or
/// `stat::number_of_executed_units: 123` after a crash).
fn final_stats(log: &str) -> (u64, Option<u64>) {
    for line in log.lines().rev() {
        if let Some(rest) = line.strip_prefix("Done ") {
            let mut words = rest.split_whitespace();
            let runs = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let secs = words.nth(2).and_then(|w| w.parse().ok());
            return (runs, secs);
        }
    }
    let units = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (units, None)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        assert_eq!(final_stats("#1 INITED\nDone 12345 runs in 61 second(s)\nstat::number_of_executed_units: 12345\n"), (12345, Some(61)));
        assert_eq!(final_stats("==1== ERROR: libFuzzer: deadly signal\nstat::number_of_executed_units: 77\n"), (77, None));
        assert_eq!(final_stats(""), (0, None));
    }

    #[test]
    fn every_target_has_a_source_and_committed_seeds() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
        for t in TARGETS {
            assert!(root.join(format!("fuzz/fuzz_targets/{t}.rs")).exists(), "{t}");
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t} in fuzz/Cargo.toml");
            let seeds = std::fs::read_dir(root.join("fuzz/corpus").join(t)).map(|d| d.count()).unwrap_or(0);
            assert!(seeds > 0, "{t} has committed seeds");
        }
    }
}
