//! A bff client calling recall: `mesh-probe http --h2 --grpc` on ONE HTTP/2 connection (one gRPC
//! channel), paced at a fixed rate, bounded in count (rate x seconds) and per call (timeout),
//! printing a tally every second that a reader thread collects for the live view and the steps.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::Child,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_e2e::{bins, cluster::wait_timeout};
use serde_json::Value;

use super::{Demo, topology};

/// What one call of the client's per-second tally counted.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub at: Option<Instant>,
    pub calls: u64,
    /// Answers that were not OK (gRPC status other than 0, HTTP error) plus calls without answer.
    pub failed: u64,
    pub by_pod: BTreeMap<String, u64>,
    pub p99_ms: f64,
}

impl Window {
    /// The counts of a client's tally: a progress line, or its final report.
    pub fn parse(v: &Value, at: Instant) -> Window {
        let by_pod = v["by_pod"].as_object().map(|o| o.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect()).unwrap_or_default();
        Window { at: Some(at), calls: v["requests"].as_u64().unwrap_or(0), failed: v["not_ok"].as_u64().unwrap_or(0), by_pod, p99_ms: v["p99_us"].as_f64().unwrap_or(0.0) / 1000.0 }
    }

    /// Adds another window's counts (latencies are not summed: p99 keeps the larger).
    pub fn add(&mut self, w: &Window) {
        self.calls += w.calls;
        self.failed += w.failed;
        for (pod, n) in &w.by_pod {
            *self.by_pod.entry(pod.clone()).or_default() += n;
        }
        self.p99_ms = self.p99_ms.max(w.p99_ms);
        self.at = w.at.or(self.at);
    }

    pub fn pod(&self, pod: &str) -> u64 {
        self.by_pod.get(pod).copied().unwrap_or(0)
    }

    /// This pod's share of the answers from `pods`.
    pub fn share(&self, pod: &str, pods: &[&str]) -> f64 {
        let total: u64 = pods.iter().map(|p| self.pod(p)).sum();
        if total == 0 { 0.0 } else { self.pod(pod) as f64 / total as f64 }
    }
}

#[derive(Default)]
struct Shared {
    windows: Vec<Window>,
    report: Option<Value>,
}

/// How a load calls recall.
pub struct Spec<'a> {
    pub from: &'a str,
    pub label: &'a str,
    pub rate: f64,
    pub duration: Duration,
    /// Calls in flight at most (multiplexed on the one connection).
    pub concurrency: u32,
    pub headers: &'a [&'a str],
}

pub struct Load {
    pub label: String,
    child: Option<Child>,
    reader: Option<JoinHandle<()>>,
    shared: Arc<Mutex<Shared>>,
    duration: Duration,
}

impl Load {
    pub fn start(d: &Demo, spec: Spec) -> anyhow::Result<Load> {
        let count = ((spec.rate * spec.duration.as_secs_f64()).round() as u64).max(1).to_string();
        let (rate, concurrency) = (format!("{}", spec.rate), spec.concurrency.to_string());
        let url = format!("http://{}:{}/grpc", topology::VIP, topology::PORT);
        let mut args = vec!["http", &url, "--h2", "--grpc", "--conns", "1", "--count", &count, "--rate", &rate, "--concurrency", &concurrency, "--timeout-ms", "3000", "--progress-ms", "1000"];
        for h in spec.headers {
            args.extend(["--header", h]);
        }
        let mut child = d.c.spawn_piped(spec.from, &bins::path("mesh-probe"), &args).with_context(|| format!("starting the {} client in {}", spec.label, spec.from))?;
        let stdout = child.stdout.take().context("client stdout")?;
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let feed = shared.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                let mut s = feed.lock().unwrap();
                if v["progress"] == true {
                    s.windows.push(Window::parse(&v, Instant::now()));
                } else {
                    s.report = Some(v);
                }
            }
        });
        Ok(Load { label: spec.label.to_string(), child: Some(child), reader: Some(reader), shared, duration: spec.duration })
    }

    /// The last second's tally, if one came.
    pub fn latest(&self) -> Option<Window> {
        self.shared.lock().unwrap().windows.last().cloned()
    }

    pub fn windows(&self) -> Vec<Window> {
        self.shared.lock().unwrap().windows.clone()
    }

    /// Everything tallied so far.
    pub fn total(&self) -> Window {
        let mut total = Window::default();
        for w in self.shared.lock().unwrap().windows.iter() {
            total.add(w);
        }
        total
    }

    /// Waits for the client to finish its calls (bounded: its duration plus the call timeout)
    /// and returns its final report.
    pub fn finish(mut self, d: &mut Demo) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            super::interrupted()?;
            let done = self.child.as_mut().map(|c| c.try_wait()).transpose()?.flatten();
            if let Some(status) = done {
                if !status.success() {
                    bail!("the {} client exited with {status}", self.label);
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("the {} client ({:.0} s of calls) had not finished 15 s after it was due", self.label, self.duration.as_secs_f64());
            }
            d.pause(Duration::from_millis(200), &[&self])?;
        }
        self.child = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let report = self.shared.lock().unwrap().report.take();
        report.with_context(|| format!("the {} client printed no report", self.label))
    }

    /// Lets the client run its course (its calls stay bounded), then returns its final report.
    pub fn run_out(self, d: &mut Demo) -> anyhow::Result<Value> {
        let due = self.duration;
        d.pause(due, &[&self])?;
        self.finish(d)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, Duration::from_secs(5));
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
