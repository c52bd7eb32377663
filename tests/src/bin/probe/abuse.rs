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
    /// idle, slowloris, upload or tls-garbage.
    pub mode: String,
    /// HOST:PORT
    pub addr: String,
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

#[derive(Default)]
struct Tally {
    attempted: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    alive: AtomicU64,
}

pub fn run(args: AbuseArgs) -> anyhow::Result<bool> {
    raise_nofile();
    if !["idle", "slowloris", "upload", "tls-garbage", "grpc-calls"].contains(&args.mode.as_str()) {
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
        for _ in 0..args.count {
            let (tally, addr, mode) = (tally.clone(), args.addr.clone(), args.mode.clone());
            tasks.push(tokio::spawn(async move { misbehave(&mode, &addr, deadline, &tally).await }));
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
        json!({"mode": args.mode, "attempted": n(&tally.attempted), "connected": n(&tally.connected), "failed": n(&tally.failed), "alive_at_end": n(&tally.alive)})
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

fn raise_nofile() {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
