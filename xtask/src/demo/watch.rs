//! The `meshctl` commands that show what a step shows, as typed in another terminal while the
//! demo runs: the node proxy's admin API listens on the node's own loopback (127.0.0.1:15000
//! in the node's network namespace), so they run there through `ip netns exec`. The demo runs
//! the very command line it prints when it shows an output, so a printed command is known to work.
use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use mesh_e2e::{bins, cluster::run_with_timeout};

use super::Demo;

/// The command line for another terminal: meshctl on node `node` with `args`.
pub fn command(d: &Demo, node: usize, args: &str) -> String {
    format!("sudo ip netns exec {} {} {args}", d.c.node(node).netns, bins::path("meshctl").display())
}

/// Prints the command and its output, running the printed command line itself (as root already,
/// so without `sudo`); fails if it does not succeed.
pub fn show(d: &mut Demo, node: usize, args: &str, what: &str) -> anyhow::Result<String> {
    let line = command(d, node, args);
    let out = run(&line)?;
    let indented: Vec<String> = out.lines().map(|l| format!("    {l}")).collect();
    d.view.say(&format!("  {what}:\n  $ {line}\n{}", indented.join("\n")));
    Ok(out)
}

/// Prints commands without running them.
pub fn hint(d: &mut Demo, lines: &[(usize, &str, &str)]) {
    let mut s = String::from("  the same from another terminal:");
    for (node, args, what) in lines {
        s.push_str(&format!("\n  $ {}    # {what}", command(d, *node, args)));
    }
    d.view.say(&s);
}

fn run(line: &str) -> anyhow::Result<String> {
    let as_root = line.strip_prefix("sudo ").unwrap_or(line);
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(as_root).stdin(std::process::Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(10)).with_context(|| format!("running `{as_root}`"))?;
    if !out.status.success() {
        bail!("`{as_root}` failed with {}: {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How to watch the demo from another terminal, checked by running the first command once.
pub fn introduce(d: &mut Demo) -> anyhow::Result<()> {
    let top = command(d, 0, "top");
    let endpoints = command(d, 0, "endpoints lemo-dev/recall");
    run(&command(d, 0, "ready")).context("meshctl as printed for another terminal")?;
    d.view.say(&format!(
        "\nWatch it live from another terminal while the demo runs (node-a's proxy: calls/s, success, p99; recall's endpoints\nwith their ejection state on node-a, then on node-b):\n  $ {top}\n  $ {endpoints}\n  $ {}",
        command(d, 1, "endpoints lemo-dev/recall")
    ));
    Ok(())
}
