//! `cargo xtask demo`: the users' story on two simulated nodes, narrated.
//!
//! The seed's shape (bff calling recall over gRPC; recall v1 x3 and a v2 canary) with the seed's
//! own policies (deploy/examples/lemo-dev) plays a short script; every step says what the mesh
//! did, shows the numbers, and checks them: a failed expectation ends the demo with an error
//! naming it. Files: `topology` (pods, servers, policies), `load` (the bff clients and their
//! per-second tallies), `view` (the live view), `watch` (the meshctl commands for another
//! terminal), `steps` (1 and 2), `failure` (3), `burst` (4), `resources` (5).
mod burst;
mod failure;
mod load;
mod resources;
mod steps;
mod topology;
mod view;
mod watch;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use mesh_e2e::SimCluster;

use self::{resources::Sampler, view::View};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The default length of the whole script, seconds.
pub const DEFAULT_SECONDS: u64 = 90;
/// Below this the share statistics no longer have calls enough (the short form, for tests).
pub const MIN_SECONDS: u64 = 75;
/// What does not stretch with `--seconds` (the seed's 30 s ejection, the burst, setup), and
/// the steady phases that do, at scale 1.
const FIXED_SECONDS: f64 = 53.0;
const FLEX_SECONDS: f64 = 33.0;

pub struct Opts {
    pub seconds: u64,
    /// Run only this step (1-5).
    pub step: Option<u8>,
}

/// What every step works with.
pub struct Demo {
    pub c: SimCluster,
    pub view: View,
    pub sampler: Sampler,
    /// The recall servers' process ids, by pod.
    pub servers: std::collections::BTreeMap<String, u32>,
    started: Instant,
    /// How much the steps' steady phases stretch (their base lengths add up to FLEX_SECONDS).
    pub scale: f64,
}

impl Demo {
    /// Seconds since the cluster was up.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A steady phase of `base` seconds at scale 1, stretched to fit `--seconds`.
    pub fn phase(&self, base: f64) -> Duration {
        Duration::from_secs_f64(base * self.scale)
    }

    /// Sleeps `d` while keeping the live view and the resource samples fresh; fails on Ctrl-C.
    pub fn pause(&mut self, d: Duration, loads: &[&load::Load]) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        loop {
            interrupted()?;
            self.sampler.sample(&self.c);
            self.view.frame(self.t(), loads, &self.sampler);
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(250)));
        }
    }
}

/// Fails once Ctrl-C (or SIGTERM) was received.
pub fn interrupted() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C): the simulated cluster is torn down");
    }
    Ok(())
}

/// A step's expectation: fails the demo with `what` and the numbers when it does not hold.
pub fn expect(holds: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if !holds {
        bail!("expectation failed: {}", what());
    }
    Ok(())
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.seconds < MIN_SECONDS {
        bail!("--seconds {} is too short: the script needs at least {MIN_SECONDS} s (the seed's baseEjectionTime alone is 30 s, and the shares need calls enough)", opts.seconds);
    }
    if let Some(step) = opts.step
        && !(1..=5).contains(&step)
    {
        bail!("--step {step}: the script has steps 1 to 5");
    }
    // SAFETY: plain signal handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut view = View::new();
    view.say("mesh demo: building two simulated nodes (network namespaces, cgroups, real eBPF capture, one node proxy each, the mesh CA)...");
    let (c, servers) = topology::start()?;
    let sampler = Sampler::new(&c);
    let mut demo = Demo { c, view, sampler, servers, started: Instant::now(), scale: (opts.seconds as f64 - FIXED_SECONDS) / FLEX_SECONDS };
    topology::introduce(&mut demo);
    watch::introduce(&mut demo)?;
    let all = opts.step.is_none();
    let want = |n: u8| all || opts.step == Some(n);
    let mut shares = steps::Shares::default();
    let result = (|| -> anyhow::Result<()> {
        if want(1) {
            steps::grpc_balancing(&mut demo, &mut shares)?;
        }
        if want(2) {
            steps::canary(&mut demo, &mut shares)?;
        }
        if want(3) {
            failure::failing_pod(&mut demo)?;
        }
        if want(4) {
            burst::burst(&mut demo)?;
        }
        if want(5) {
            resources::report(&mut demo)?;
        }
        Ok(())
    })();
    demo.view.clear();
    match &result {
        Ok(()) => demo.view.say(&format!("\nmesh demo: every expectation held ({:.0} s); tearing the simulated cluster down", demo.t())),
        Err(e) if STOP.load(Ordering::SeqCst) => demo.view.say(&format!("\nmesh demo: {e:#}")),
        Err(e) => demo.view.say(&format!("\nmesh demo: {e:#}\nnode-a proxy log (last lines):\n{}", tail(&demo.c.proxy_log_plain(0), 15))),
    }
    drop(demo);
    result
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
