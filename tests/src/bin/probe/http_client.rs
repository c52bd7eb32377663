//! `mesh-probe http` / `http-concurrent`: a real hyper client that reports which pod answered.
//!
//! Without `--concurrency` or `--rate`, requests go one at a time, request i on connection
//! i % conns, so a test sees the balancer's order undisturbed. `--concurrency K` keeps K in flight:
//! over the h2 connection(s) with `--h2`, else over K HTTP/1.1 connections (one per worker).
//! `--rate R` paces request starts at R per second overall; latencies then count from each
//! request's scheduled start (late starts are reported), so a stall is not hidden.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request,
    header::{HOST, HeaderName, HeaderValue},
};
use tokio::time::Instant;

use super::{
    conn::{self, Pool, Target},
    report::Tally,
};

#[derive(clap::Args)]
pub struct HttpArgs {
    /// http://HOST:PORT/PATH
    pub url: String,
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Persistent connections; requests are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// HTTP/2 with prior knowledge (h2c), streams multiplexed on each connection.
    #[arg(long)]
    pub h2: bool,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// 'name: value'; repeat for more (and for several values of one header).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Request body of this many bytes.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Request body with this exact text (instead of --body-bytes of 'x').
    #[arg(long)]
    pub body_text: Option<String>,
    /// Aggregate request starts per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Per request, connecting included.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Requests in flight at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Exit 1 unless every request got a 2xx.
    #[arg(long)]
    pub expect_all_ok: bool,
    /// Put the last response body in the report as "last_body".
    #[arg(long)]
    pub print_body: bool,
    /// gRPC-shaped requests (use with --h2): POST, `content-type: application/grpc`,
    /// `te: trailers`, a 5-byte length prefix and a --body-bytes message; the report counts the
    /// `grpc-status` trailers, and a non-zero one is not ok.
    #[arg(long)]
    pub grpc: bool,
    /// Also print, every this many ms while the run lasts, a JSON line `{"progress": true, ..}`
    /// tallying only the requests answered since the previous one (a live view's feed).
    #[arg(long)]
    pub progress_ms: Option<u64>,
}

/// What every request of a run shares.
struct Plan {
    method: Method,
    uri: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    h2: bool,
    count: u64,
    rate: Option<f64>,
    timeout: Duration,
    keep_body: bool,
    workers: usize,
}

struct Run {
    plan: Plan,
    pool: Pool,
    next: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    tally: Mutex<Tally>,
    /// With --progress-ms: the answers since the last progress line.
    window: Option<Mutex<Tally>>,
    start: Instant,
    /// With --rate: requests that started more than 1 ms after their due time, and the worst lag.
    late: AtomicU64,
    max_lag_us: AtomicU64,
    /// With --rate: one permit per request, released at its due time by a pacer thread.
    pacer: Option<Arc<tokio::sync::Semaphore>>,
}

pub fn run(args: HttpArgs) -> anyhow::Result<bool> {
    conn::runtime()?.block_on(run_async(args))
}

async fn run_async(args: HttpArgs) -> anyhow::Result<bool> {
    let target = Target::parse(&args.url).await?;
    let workers = args.concurrency.unwrap_or(if args.rate.is_some() { args.conns } else { 1 }).max(1);
    // An HTTP/1.1 connection carries one exchange at a time: each worker needs its own.
    let conns = if args.h2 { args.conns } else { args.conns.max(workers) };
    let plan = plan(&args, &target, workers)?;
    let run = Arc::new(Run {
        plan,
        pool: Pool::new(target, args.h2, conns),
        next: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        tally: Mutex::new(Tally::default()),
        window: args.progress_ms.map(|_| Mutex::new(Tally::default())),
        start: Instant::now(),
        late: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
        pacer: args.rate.map(|_| Arc::new(tokio::sync::Semaphore::new(0))),
    });
    if let (Some(rate), Some(sem)) = (run.plan.rate, run.pacer.clone()) {
        // tokio's timer ticks in whole milliseconds, too coarse to pace 1000 rps evenly; a
        // thread sleeping on the OS's high-resolution timer releases each request on time.
        let (start, count) = (run.start.into_std(), run.plan.count);
        std::thread::spawn(move || {
            for i in 0..count {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
                sem.add_permits(1);
            }
        });
    }
    let tasks: Vec<_> = (0..workers).map(|w| tokio::spawn(worker(run.clone(), w))).collect();
    let progress = args.progress_ms.map(|ms| tokio::spawn(progress(run.clone(), Duration::from_millis(ms.max(10)))));
    for task in tasks {
        task.await.context("worker panicked")?;
    }
    // The last, partial second is in the final report only.
    if let Some(progress) = progress {
        progress.abort();
    }
    let elapsed_ms = run.start.elapsed().as_secs_f64() * 1000.0;
    let mut tally = run.tally.lock().expect("tally lock");
    let mut report = tally.finish(run.plan.count, run.pool.opened(), run.max_in_flight.load(Ordering::SeqCst), elapsed_ms);
    // How open-loop the pacing stayed: a closed-loop worker falls behind its schedule when
    // answers are slow, which hides latency (coordinated omission).
    report["achieved_rps"] = (run.plan.count as f64 * 1000.0 / elapsed_ms.max(1e-9)).into();
    report["late_starts"] = run.late.load(Ordering::SeqCst).into();
    report["max_start_lag_us"] = run.max_lag_us.load(Ordering::SeqCst).into();
    report["latency_from"] = if run.plan.rate.is_some() { "scheduled start" } else { "send" }.into();
    println!("{report}");
    Ok(!args.expect_all_ok || tally.all_ok())
}

fn plan(args: &HttpArgs, target: &Target, workers: usize) -> anyhow::Result<Plan> {
    let mut headers = Vec::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').with_context(|| format!("--header {h:?} is not 'name: value'"))?;
        headers.push((HeaderName::from_bytes(name.trim().as_bytes())?, HeaderValue::from_str(value.trim())?));
    }
    // h2 needs scheme and authority in the URI (they become :scheme/:authority); HTTP/1.1 sends
    // origin-form with a Host header, as ordinary clients do.
    let uri = if args.h2 {
        format!("http://{}{}", target.authority, target.path_and_query).parse()?
    } else {
        if !headers.iter().any(|(n, _)| n == HOST) {
            headers.push((HOST, HeaderValue::from_str(&target.authority)?));
        }
        target.path_and_query.parse()?
    };
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        bail!("--rate must be positive");
    }
    let (method, body) = if args.grpc {
        headers.push((hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc")));
        headers.push((hyper::header::TE, HeaderValue::from_static("trailers")));
        (Method::POST, super::http_server::grpc_frame(args.body_bytes))
    } else {
        let body = match &args.body_text {
            Some(text) => Bytes::from(text.clone().into_bytes()),
            None => Bytes::from(vec![b'x'; args.body_bytes]),
        };
        (Method::from_bytes(args.method.as_bytes())?, body)
    };
    Ok(Plan {
        method,
        uri,
        headers,
        body,
        h2: args.h2,
        count: args.count,
        rate: args.rate,
        timeout: Duration::from_millis(args.timeout_ms),
        keep_body: args.print_body,
        workers,
    })
}

async fn worker(run: Arc<Run>, w: usize) {
    let plan = &run.plan;
    loop {
        let i = run.next.fetch_add(1, Ordering::SeqCst);
        if i >= plan.count {
            return;
        }
        // With --rate, latency counts from the request's scheduled start, not from when it
        // actually went out: a request held back by a slow answer waits on the clock too
        // (no coordinated omission).
        let mut scheduled = None;
        if let Some(rate) = plan.rate {
            let due = run.start + Duration::from_secs_f64(i as f64 / rate);
            scheduled = Some(due);
            match &run.pacer {
                Some(sem) => sem.acquire().await.expect("pacer semaphore is never closed").forget(),
                None => tokio::time::sleep_until(due).await,
            }
            let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
            if lag > 1000 {
                run.late.fetch_add(1, Ordering::Relaxed);
            }
            run.max_lag_us.fetch_max(lag, Ordering::Relaxed);
        }
        let slot = if plan.workers == 1 || plan.h2 { i as usize % run.pool.slots() } else { w % run.pool.slots() };
        let mut req = Request::builder().method(plan.method.clone()).uri(plan.uri.clone());
        for (name, value) in &plan.headers {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(plan.body.clone())).expect("request parts were validated");

        let now = run.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        run.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let started = Instant::now();
        let result = run.pool.request(slot, req, started + plan.timeout, plan.keep_body).await;
        let latency_us = scheduled.unwrap_or(started).elapsed().as_secs_f64() * 1e6;
        run.in_flight.fetch_sub(1, Ordering::SeqCst);

        if let Some(window) = &run.window {
            let mut window = window.lock().expect("window lock");
            match &result {
                Ok(answer) => window.answer(answer.summary(), latency_us),
                Err(kind) => window.error(kind),
            }
        }
        let mut tally = run.tally.lock().expect("tally lock");
        match result {
            Ok(answer) => tally.answer(answer, latency_us),
            Err(kind) => tally.error(kind),
        }
    }
}

/// Prints a progress line every `every` until aborted.
async fn progress(run: Arc<Run>, every: Duration) {
    let mut tick = tokio::time::interval_at(run.start + every, every);
    loop {
        tick.tick().await;
        print_window(&run);
    }
}

/// The answers since the last progress line, as one JSON line, and a fresh window.
fn print_window(run: &Run) {
    let Some(window) = &run.window else { return };
    let mut taken = std::mem::take(&mut *window.lock().expect("window lock"));
    let seen = taken.seen();
    let elapsed_ms = run.start.elapsed().as_secs_f64() * 1000.0;
    let mut line = taken.finish(seen, run.pool.opened(), run.in_flight.load(Ordering::SeqCst), elapsed_ms);
    line["progress"] = true.into();
    line["pods_in_order"] = serde_json::Value::Null;
    line["cdf_us"] = serde_json::Value::Null;
    println!("{line}");
}
