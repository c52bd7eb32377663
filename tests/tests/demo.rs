//! End to end: `cargo xtask demo` in its short form (`--seconds 75`) plays the users' story on a
//! simulated cluster of its own and checks every step itself (balancing shares, mTLS identities,
//! the 90/10 canary, no errors behind retries while a pod fails, its ejection and return, p99
//! bounded in a burst, the proxies' cost); it must exit 0 having said so.
//! Runs the `xtask` binary beside the others (`cargo xtask test` builds it: it is what runs).
//! Needs root; run through `cargo xtask test`.
use std::{process::Command, time::Duration};

use mesh_e2e::{bins, cluster::run_with_timeout};

#[test]
fn the_demo_plays_every_step_and_checks_it() {
    let xtask = bins::path("xtask");
    let dir = xtask.parent().expect("bin dir").to_path_buf();
    let mut cmd = Command::new(&xtask);
    // The binaries under test, as built: the demo builds nothing then.
    cmd.args(["demo", "--seconds", "75"]).env("MESH_BIN_DIR", &dir);
    let out = run_with_timeout(cmd, Duration::from_secs(170)).expect("the demo finishes within 170 s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo exited {}:\n{stdout}\n{stderr}", out.status);
    for want in [
        "[1/5]",
        "-> spiffe://cluster.local/ns/lemo-dev/sa/recall  mutual_tls",
        "[2/5]",
        "[3/5]",
        "ejected by node-a's proxy",
        "errors seen by bff-0 with the mesh's retries: 0 of",
        "[4/5]",
        "[5/5]",
        "every expectation held",
    ] {
        assert!(stdout.contains(want), "the demo's output lacks {want:?}:\n{stdout}");
    }
    // Not a terminal: plain live lines, no cursor movement.
    assert!(!stdout.contains("\x1b["), "escape sequences in plain output:\n{stdout}");
    assert!(stdout.lines().any(|l| l.trim_start().starts_with('[') && l.contains("calls/s  failed")), "no live lines:\n{stdout}");
}
