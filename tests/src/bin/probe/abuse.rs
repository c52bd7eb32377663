//! `mesh-probe abuse MODE ADDR`: a misbehaving caller, for the abuse bench. Opens `--count`
//! connections to ADDR (raising its own descriptor limit first) and misbehaves on each until
//! `--seconds` have passed:
//! - `idle`: connects and sends nothing;
//! - `slowloris`: starts an HTTP/1.1 request and sends one more header byte per second;
//! - `upload`: announces a 1 MiB body, sends half of it and stalls;
//! - `tls-garbage`: in a loop, connects, sends bytes that are no TLS ClientHello, and closes
//!   (a flood of failing handshakes; `--count` is the number of concurrent loops).
//! - `grpc-calls`: ADDR is a URL; `--count` loops each make 100 gRPC calls a second over one
//!   HTTP/2 connection (an upstream answering each with a status of its own makes this the
//!   telemetry-cardinality attack); also reports how many distinct `grpc-status` values came back.
//! - `active`: not abuse but its mirror, for the scale bench: each connection sends an HTTP/1.1
//!   `GET /` at once and then every `--interval-ms` (start offsets spread over the interval) and
//!   reads the answer, keeping the connection; `requests_ok` counts the answers.
//!
//! Prints `{"mode", "attempted", "connected", "failed", "alive_at_end"}`: how many connects it
//! made, how many succeeded, how many failed or were reset, and how many were still open
//! (not closed by the far side) when the time was up.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

#[derive(clap::Args)]
pub struct AbuseArgs {
    /// idle, slowloris, upload, tls-garbage, grpc-calls or active.
    pub mode: String,
    /// HOST:PORT
    pub addr: String,
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// `active`: time between two requests on one connection.
    #[arg(long, default_value_t = 5000)]
    pub interval_ms: u64,
}

#[derive(Default)]
struct Tally {
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    alive: AtomicU64,
    requests_ok: AtomicU64,
}

pub fn run(args: AbuseArgs) -> anyhow::Result<bool> {
    raise_nofile();
    if !["idle", "slowloris", "upload", "tls-garbage", "grpc-calls", "active"].contains(&args.mode.as_str()) {
        anyhow::bail!("unknown mode {:?} (idle, slowloris, upload, tls-garbage, grpc-calls)", args.mode);
    }
    if args.mode == "grpc-calls" {
        return grpc_calls(&args);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..args.count {
            let (tally, addr, mode) = (tally.clone(), args.addr.clone(), args.mode.clone());
            // `active`: the connections' requests spread evenly over the interval.
            let offset = Duration::from_millis(args.interval_ms.max(1) * i / args.count.max(1));
            let interval = Duration::from_millis(args.interval_ms.max(1));
            tasks.push(tokio::spawn(async move {
                if mode == "active" {
                    active(&addr, deadline, offset, interval, &tally).await
                } else {
                    misbehave(&mode, &addr, deadline, &tally).await
                }
            }));
            // Connects paced a little, so the flood is a flood and not a SYN burst the
            // backlog drops.
            if tasks.len() % 200 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({"mode": args.mode, "attempted": n(&tally.attempted), "connected": n(&tally.connected), "failed": n(&tally.failed), "alive_at_end": n(&tally.alive), "requests_ok": n(&tally.requests_ok)})
    );
    Ok(true)
}

/// `grpc-calls`: paced unary calls on `--count` HTTP/2 connections until `--seconds` are up.
fn grpc_calls(args: &AbuseArgs) -> anyhow::Result<bool> {
    let rt = super::conn::runtime()?;
    let (tally, statuses) = rt.block_on(async {
        let target = super::conn::Target::parse(&args.addr).await?;
        let uri = format!("http://{}{}", target.authority, target.path_and_query);
        let pool = Arc::new(super::conn::Pool::new(target, true, args.count as usize));
        let tally = Arc::new(Tally::default());
        let statuses = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let mut loops = Vec::new();
        for slot in 0..pool.slots() {
            let (pool, tally, statuses, uri) = (pool.clone(), tally.clone(), statuses.clone(), uri.clone());
            loops.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while Instant::now() < deadline {
                    tick.tick().await;
                    tally.attempted.fetch_add(1, Ordering::Relaxed);
                    let req = hyper::Request::post(&uri)
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(http_body_util::Full::new(super::http_server::grpc_frame(8)))
                        .expect("a valid request");
                    let until = tokio::time::Instant::now() + Duration::from_secs(2);
                    match pool.request(slot, req, until, false).await {
                        Ok(answer) => {
                            tally.connected.fetch_add(1, Ordering::Relaxed);
                            if let Some(status) = answer.grpc_status {
                                statuses.lock().expect("not poisoned").insert(status);
                            }
                        }
                        Err(_) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for l in loops {
            let _ = l.await;
        }
        let distinct = statuses.lock().expect("not poisoned").len();
        anyhow::Ok((tally, distinct))
    })?;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({"mode": args.mode, "attempted": n(&tally.attempted), "connected": n(&tally.connected), "failed": n(&tally.failed), "alive_at_end": 0, "distinct_statuses": statuses})
    );
    Ok(true)
}

async fn misbehave(mode: &str, addr: &str, deadline: Instant, tally: &Tally) {
    if mode == "tls-garbage" {
        while Instant::now() < deadline {
            tally.attempted.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
                Ok(Ok(mut s)) => {
                    tally.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(b"\x16\x03\x01\x00\x05hello, this is no ClientHello\r\n").await;
                    let mut buf = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                }
                _ => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        return;
    }
    tally.attempted.fetch_add(1, Ordering::Relaxed);
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    tally.connected.fetch_add(1, Ordering::Relaxed);
    let sent = match mode {
        "slowloris" => s.write_all(b"GET / HTTP/1.1\r\nHost: abuse\r\nX-Slow: ").await,
        "upload" => {
            let head = s.write_all(b"POST / HTTP/1.1\r\nHost: abuse\r\nContent-Length: 1048576\r\n\r\n").await;
            match head {
                Ok(()) => s.write_all(&vec![b'x'; 512 * 1024]).await,
                e => e,
            }
        }
        _ => Ok(()),
    };
    if sent.is_err() {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Hold it (a byte per second for slowloris) and notice when the far side closes it.
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if mode == "slowloris" && s.write_all(b"x").await.is_err() {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            _ => {}
        }
    }
    tally.alive.fetch_add(1, Ordering::Relaxed);
}

/// `active`: one kept connection, a `GET /` at once and then every `interval` (after `offset`),
/// each answer read whole (headers, then `content-length` bytes).
async fn active(addr: &str, deadline: Instant, offset: Duration, interval: Duration, tally: &Tally) {
    tally.attempted.fetch_add(1, Ordering::Relaxed);
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    tally.connected.fetch_add(1, Ordering::Relaxed);
    // The first request at once, then the next after `offset`, then every `interval`.
    let mut pause = if offset.is_zero() { interval } else { offset };
    while Instant::now() < deadline {
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(b"GET / HTTP/1.1\r\nHost: scale\r\n\r\n").await?;
            read_answer(&mut s).await
        })
        .await;
        if !matches!(answered, Ok(Ok(()))) {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.requests_ok.fetch_add(1, Ordering::Relaxed);
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        pause = interval;
    }
    tally.alive.fetch_add(1, Ordering::Relaxed);
}

/// Reads one HTTP/1.1 answer with a `content-length` body.
async fn read_answer(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return if head.starts_with("http/1.1 2") { Ok(()) } else { Err(std::io::ErrorKind::InvalidData.into()) };
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

fn raise_nofile() {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
