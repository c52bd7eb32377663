//! Step 3: a recall pod starts failing. bff-0 calls through the seed's route (retries) and sees
//! nothing of it; bff-1, through a route without retries, sees the calls that failed until its
//! node's proxy ejected the pod. The ejection (when, for how long, as meshctl shows it), then the
//! pod heals and gets calls again once its ejection time is over.
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use super::{
    Demo, expect,
    load::{Load, Spec},
    steps::CONCURRENCY,
    topology::{NO_RETRIES, NS, signal_server},
    watch,
};

const POD: &str = "recall-1";
/// The seed's DestinationRule: `consecutive5xxErrors: 5`, `baseEjectionTime: 30s`.
const CONSECUTIVE_ERRORS: u64 = 5;
const BASE_EJECTION: Duration = Duration::from_secs(30);
/// How long the proxies may take to eject the failing pod, and to send it calls again once its
/// ejection is over (a third of bff-0's calls go to each v1 pod: the first within a second).
const EJECT_WITHIN: Duration = Duration::from_secs(10);
const RETURN_WITHIN: Duration = Duration::from_secs(15);

/// When node `node` ejected the pod, as first seen, and the ejection time left then.
struct Ejection {
    seen: Instant,
    remaining: Duration,
}

impl Ejection {
    fn ends(&self) -> Instant {
        self.seen + self.remaining
    }
}

/// The pod's ejection on node `node`, if `meshctl endpoints` shows one.
fn ejection(d: &Demo, node: usize) -> anyhow::Result<Option<Ejection>> {
    let out = d.c.meshctl(node, &["-o", "json", "endpoints", &format!("{NS}/recall")])?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| format!("meshctl endpoints on {}: {}", d.c.node(node).name, String::from_utf8_lossy(&out.stderr)))?;
    let pod = format!("{NS}/{POD}");
    let ejected = v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["pod"] == pod.as_str() && e["health"] == "ejected")
        .filter_map(|e| e["ejection_remaining_ms"].as_u64())
        .max();
    Ok(ejected.map(|ms| Ejection { seen: Instant::now(), remaining: Duration::from_millis(ms) }))
}

pub fn failing_pod(d: &mut Demo) -> anyhow::Result<()> {
    d.view.say(&format!(
        "\n[3/5] {POD} (v1, node-b) starts failing: every call answered UNAVAILABLE.\n      bff-0 calls through the seed's route (retries: attempts 3, retryOn 5xx,connect-failure,unavailable);\n      bff-1 (node-b) calls through a route without retries. Outlier detection (the seed's: {CONSECUTIVE_ERRORS} consecutive 5xx, baseEjectionTime {}s) ejects the pod.",
        BASE_EJECTION.as_secs()
    ));
    let before = d.phase(4.0);
    // Bounded: long enough for the whole step, stopped when it is over.
    let duration = before + EJECT_WITHIN + BASE_EJECTION + RETURN_WITHIN + Duration::from_secs(10);
    // Together well within what two v1 pods take while the third is ejected (2 x 50 calls/s).
    let with = Load::start(d, Spec { from: "bff-0", label: "bff-0 (seed routes, retries)", rate: 40.0, duration, concurrency: CONCURRENCY, headers: &[] })?;
    let without = Load::start(d, Spec { from: "bff-1", label: "bff-1 (no retries)", rate: 20.0, duration, concurrency: 8, headers: &[NO_RETRIES] })?;
    let loads = [&with, &without];
    d.pause(before, &loads)?;
    let retries_before = d.c.counter(0, "proxy", "http_retries");

    let failed_at = Instant::now();
    signal_server(d, POD, libc::SIGUSR1)?;
    d.view.say(&format!("  t={:.0}s: {POD} starts failing", d.t()));
    let (mut a, mut b) = (None, None);
    while a.is_none() || b.is_none() {
        expect(failed_at.elapsed() < EJECT_WITHIN, || format!("{POD} not ejected {} s after it began failing (node-a: {}, node-b: {})", EJECT_WITHIN.as_secs(), a.is_some(), b.is_some()))?;
        if a.is_none() {
            a = ejection(d, 0)?;
        }
        if b.is_none() {
            b = ejection(d, 1)?;
        }
        d.pause(Duration::from_millis(200), &loads)?;
    }
    let (a, b) = (a.expect("seen"), b.expect("seen"));
    let after = |e: &Ejection| e.seen.duration_since(failed_at).as_secs_f64();
    d.view.say(&format!(
        "  ejected by node-a's proxy {:.1} s after the failures began, for {:.0} s more; by node-b's after {:.1} s, for {:.0} s more",
        after(&a),
        a.remaining.as_secs_f64(),
        after(&b),
        b.remaining.as_secs_f64()
    ));
    for (node, e) in [("node-a", &a), ("node-b", &b)] {
        expect(e.remaining <= BASE_EJECTION && e.remaining + EJECT_WITHIN > BASE_EJECTION, || {
            format!("{node} ejected {POD} for {:.1} s more, expected baseEjectionTime ({} s) less the time since", e.remaining.as_secs_f64(), BASE_EJECTION.as_secs())
        })?;
    }
    watch::show(d, 0, &format!("endpoints {NS}/recall"), &format!("node-a's view of recall's endpoints, {POD} ejected"))?;

    d.pause(d.phase(5.0).min(Duration::from_secs(10)), &loads)?;
    signal_server(d, POD, libc::SIGUSR2)?;
    let healed = Instant::now();
    d.view.say(&format!("  t={:.0}s: {POD} is healthy again, but still ejected: no calls until its ejection time is over", d.t()));

    // Traffic returns: bff-0's calls reach the pod again once node-a's ejection ends.
    let returned = loop {
        let back = with.windows().into_iter().find(|w| w.at.is_some_and(|at| at > healed) && w.pod(POD) > 0);
        if let Some(w) = back {
            break w.at.expect("timed");
        }
        expect(Instant::now() < a.ends() + RETURN_WITHIN, || format!("{POD} got no calls from bff-0 within {} s after its ejection ended", RETURN_WITHIN.as_secs()))?;
        d.pause(Duration::from_millis(250), &loads)?;
    };
    let retried = d.c.counter(0, "proxy", "http_retries") - retries_before;
    let (w_with, w_without) = (with.total(), without.total());
    // Windows that lie wholly inside node-a's ejection (each covers the second before it).
    let inside: Vec<_> = with.windows().into_iter().filter(|w| w.at.is_some_and(|at| at > a.seen + Duration::from_millis(1500) && at < a.ends())).collect();
    let leaked: u64 = inside.iter().map(|w| w.pod(POD)).sum();
    let calls_inside: u64 = inside.iter().map(|w| w.calls).sum();
    d.view.say(&format!(
        "  {POD} answered again {:.1} s after node-a ejected it (baseEjectionTime {} s)\n  errors seen by bff-0 with the mesh's retries: {} of {} calls (node-a's proxy retried {retried});\n  errors seen by bff-1 without retries: {} of {} calls, until node-b's proxy ejected the pod\n  while ejected, {POD} got {leaked} of bff-0's {calls_inside} calls",
        returned.duration_since(a.seen).as_secs_f64(),
        BASE_EJECTION.as_secs(),
        w_with.failed,
        w_with.calls,
        w_without.failed,
        w_without.calls
    ));
    watch::hint(d, &[(0, &format!("endpoints {NS}/recall"), "ejection state and time left, per node proxy"), (0, "top", "calls/s, success rate and p99 per service")]);
    expect(w_with.failed == 0, || format!("bff-0 saw {} failed calls although the route retries (retried: {retried})", w_with.failed))?;
    expect(retried > 0, || "node-a's proxy retried nothing: the failures never reached it".to_string())?;
    expect(w_without.failed >= CONSECUTIVE_ERRORS, || format!("bff-1 saw {} failed calls without retries, expected at least the {CONSECUTIVE_ERRORS} that eject the pod", w_without.failed))?;
    expect(calls_inside > 0 && leaked == 0, || format!("{POD} got {leaked} of {calls_inside} calls while ejected"))?;
    expect(returned + Duration::from_millis(1500) >= a.ends(), || format!("{POD} got calls {:.1} s before its ejection ended", a.ends().duration_since(returned).as_secs_f64()))?;
    Ok(())
}
