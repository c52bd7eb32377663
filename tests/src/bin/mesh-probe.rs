//! `mesh-probe`: the client and server processes that run inside simulated pods.
//!
//! The server answers a one-line command per connection: `WHO` (its name and the caller's
//! address), `ECHO` (echo until the client half-closes), `RR <size>` (fixed-size
//! request/response until EOF) and `SINK` (count bytes until EOF, then report the count).
//!
//! The HTTP side (`http-serve`, `http`, `http-concurrent`, `ws`) lives in `probe/`: a server
//! whose answers each request scripts by header, and hyper clients that report which pod answered.
#[path = "probe/conn.rs"]
mod conn;
#[path = "probe/http_client.rs"]
mod http_client;
#[path = "probe/fanout.rs"]
mod fanout;
#[path = "probe/http_server.rs"]
mod http_server;
#[path = "probe/report.rs"]
mod report;
#[path = "probe/ws.rs"]
mod ws;
#[path = "probe/sniff.rs"]
mod sniff;
#[path = "probe/mtls.rs"]
mod mtls;
#[path = "probe/ca_request.rs"]
mod ca_request;
#[path = "probe/hold.rs"]
mod hold;
#[path = "probe/abuse.rs"]
mod abuse;
#[path = "probe/h2c.rs"]
mod h2c;

use std::{
    io::{self, BufRead as _, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
#[command(name = "mesh-probe")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve WHO/ECHO/RR/SINK on a port.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    /// Wait until ADDR accepts connections.
    Wait {
        addr: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// Ask ADDR who it is, COUNT times on fresh connections; one line per answer.
    Who {
        addr: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Set this SO_MARK on the socket before connecting (needs CAP_NET_RAW or
        /// CAP_NET_ADMIN), e.g. 0x539, the node proxy's own mark.
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
    },
    /// One connection attempt; prints {"result": ok|refused|reset|eof|timeout|error, "ms": ..}.
    Connect {
        addr: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// As for `who`.
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
    },
    /// Plaintext HTTP/2 CONNECT (an HBONE stream without TLS) to a node proxy's inbound port,
    /// as a node proxy without a CA sends it; prints {"connect_status": .., "answer": ..} or
    /// {"connect_error": ..}.
    H2cConnect(h2c::H2cConnectArgs),
    /// Send BYTES pseudo-random bytes to an ECHO server, half-close, check what comes back.
    Echo {
        addr: String,
        #[arg(long)]
        bytes: u64,
    },
    /// Request/response latency at a fixed rate.
    Rr {
        addr: String,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        conns: u64,
    },
    /// Bulk throughput to a SINK server.
    Bulk {
        addr: String,
        #[arg(long)]
        bytes: u64,
    },
    /// HTTP/1.1 and h2c server; every answer carries `x-pod: NAME`, request headers script it.
    /// SIGUSR1 makes it fail every request (gRPC: trailers-only UNAVAILABLE), SIGUSR2 heals it.
    HttpServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// Answer 503 to every Nth request (counted across connections).
        #[arg(long)]
        fail_every: Option<u64>,
        /// Added latency on every request.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Answer `/` with a body of this many bytes (and `/grpc` with a message this size)
        /// instead of the pod name; for load tests.
        #[arg(long, default_value_t = 0)]
        body_bytes: usize,
        /// Bounded capacity: at most N requests processed at once (each taking --service-ms);
        /// the rest wait in a FIFO queue. Capacity is N * 1000 / service-ms requests a second.
        #[arg(long)]
        capacity: Option<usize>,
        /// Processing time of each request in --capacity mode.
        #[arg(long, default_value_t = 5)]
        service_ms: u64,
        /// Before answering `/` or `/grpc`, call this downstream (NAME=grpc://HOST:PORT or
        /// NAME=http://HOST:PORT; several comma-separated URLs are taken in turn); repeat for
        /// more, all called at once. A failed call makes the answer a 502.
        #[arg(long = "call")]
        calls: Vec<String>,
        /// Fail every `/grpc` call with a `grpc-status` text of its own (a misbehaving upstream).
        #[arg(long)]
        grpc_status_unique: bool,
    },
    /// HTTP requests over persistent connections; one JSON report line.
    Http(http_client::HttpArgs),
    /// Like `http`, with `--concurrency K` requests in flight at once (required).
    HttpConcurrent(http_client::HttpArgs),
    /// HTTP/1.1 Upgrade to /ws, then check BYTES echo back intact.
    Ws {
        url: String,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
    },
    /// Capture frames on an interface (AF_PACKET) for a while; report bytes seen and whether
    /// the marker bytes appeared.
    Sniff(sniff::SniffArgs),
    /// Make a client certificate (rcgen) with a SPIFFE ID: signed by a given CA key, or by a new
    /// self-signed root; optionally already expired.
    Mkcert(mtls::MkcertArgs),
    /// Dial a node proxy's inbound port like a peer proxy (TLS 1.3, ALPN h2, client certificate,
    /// SNI); prints {"handshake": ok|error, "error": ..}, optionally the status of a CONNECT.
    TlsConnect(mtls::TlsConnectArgs),
    /// Ask the mesh CA to sign a CSR for an identity, as a node would; prints the gRPC outcome.
    CaRequest(ca_request::CaRequestArgs),
    /// Keep one connection (HTTP/1.1 keep-alive, or TCP to an ECHO server) and use it every
    /// interval, never reconnecting; one JSON line per use, printed as it happens.
    Hold(hold::HoldArgs),
    /// A misbehaving caller for the abuse bench: idle connections, slowloris headers, uploads
    /// that never finish, or a flood of failing TLS handshakes.
    Abuse(abuse::AbuseArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Serve { name, port } => serve(&name, port),
        Cmd::Wait { addr, timeout_ms } => wait(&addr, Duration::from_millis(timeout_ms)),
        Cmd::Who { addr, count, interval_ms, timeout_ms, mark } => who(&addr, count, interval_ms, timeout_ms, mark),
        Cmd::Connect { addr, timeout_ms, mark } => connect_once(&addr, timeout_ms, mark),
        Cmd::H2cConnect(args) => h2c::run(args).map_err(anyhow_to_io),
        Cmd::Echo { addr, bytes } => echo(&addr, bytes),
        Cmd::Rr { addr, size, rate, seconds, conns } => rr(&addr, size, rate, seconds, conns),
        Cmd::Bulk { addr, bytes } => bulk(&addr, bytes),
        Cmd::HttpServe { name, port, fail_every, delay_ms, body_bytes, capacity, service_ms, calls, grpc_status_unique } => {
            http_serve(http_server::ServerOpts { name, port, fail_every, delay_ms, body_bytes, capacity, service_ms, calls, grpc_status_unique })
        }
        Cmd::Http(args) => http(args),
        Cmd::HttpConcurrent(args) if args.concurrency.is_none() => Err(io::Error::other("http-concurrent needs --concurrency")),
        Cmd::HttpConcurrent(args) => http(args),
        Cmd::Ws { url, bytes, timeout_ms } => ws::run(&url, bytes, timeout_ms).map_err(anyhow_to_io),
        Cmd::Sniff(args) => sniff::run(args).map_err(anyhow_to_io),
        Cmd::Mkcert(args) => mtls::mkcert(args).map_err(anyhow_to_io),
        Cmd::TlsConnect(args) => mtls::tls_connect(args).map_err(anyhow_to_io),
        Cmd::CaRequest(args) => ca_request::run(args).map_err(anyhow_to_io),
        Cmd::Hold(args) => hold::run(args).map_err(anyhow_to_io),
        Cmd::Abuse(args) => abuse::run(args).map_err(anyhow_to_io),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `HOST:PORT` to an address. The simulated cluster has no CoreDNS: a test that needs names
/// (an ExternalName Service's alias) hands the answers over in a hosts file named by
/// `MESH_PROBE_HOSTS` (`IP NAME...` per line), consulted before the system resolver.
fn resolve(addr: &str) -> io::Result<SocketAddr> {
    if let (Ok(path), Some((host, port))) = (std::env::var("MESH_PROBE_HOSTS"), addr.rsplit_once(':'))
        && let Ok(port) = port.parse::<u16>()
    {
        let hosts = std::fs::read_to_string(&path)?;
        let found = hosts.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let ip: std::net::IpAddr = fields.next()?.parse().ok()?;
            fields.any(|name| name.eq_ignore_ascii_case(host)).then_some(ip)
        });
        if let Some(ip) = found {
            return Ok(SocketAddr::new(ip, port));
        }
    }
    addr.to_socket_addrs()?.next().ok_or_else(|| io::Error::other(format!("cannot resolve {addr}")))
}

fn dial(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    dial_marked(addr, timeout, None)
}

/// `0x539` or `1337`.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a mark (decimal or 0x hex): {e}"))
}

/// Connects, with `SO_MARK` set on the socket first when `mark` is given (the setsockopt
/// fails without CAP_NET_RAW/CAP_NET_ADMIN, and that failure is reported, not skipped).
fn dial_marked(addr: &str, timeout: Duration, mark: Option<u32>) -> io::Result<TcpStream> {
    let target = resolve(addr)?;
    let s = match mark {
        None => TcpStream::connect_timeout(&target, timeout)?,
        Some(mark) => {
            let sock = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            sock.set_mark(mark).map_err(|e| io::Error::new(e.kind(), format!("setting SO_MARK {mark:#x}: {e}")))?;
            sock.connect_timeout(&target.into(), timeout)?;
            sock.into()
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// Reads the probe's blocking sockets wait on and get back `EAGAIN` from before their read
/// timeout: the kernel's reader of a socket in a sockmap (`tcp_bpf_recvmsg`, the fast path of
/// `mesh-node run --sockmap`) waits for data once and returns `EAGAIN` to a blocking caller
/// when woken without any, as by the ACK of its own FIN after a half-close. Such a read is
/// retried (as CPython and the JDK do for their sockets) and counted in [`SPURIOUS_EAGAIN`],
/// which the commands report; past the timeout it is the error it says.
struct Patient<'a> {
    s: &'a TcpStream,
    timeout: Duration,
}

static SPURIOUS_EAGAIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn spurious_eagain() -> u64 {
    SPURIOUS_EAGAIN.load(std::sync::atomic::Ordering::Relaxed)
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            match (&mut &*self.s).read(buf) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) && start.elapsed() < self.timeout.mul_f64(0.9) => {
                    SPURIOUS_EAGAIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                r => return r,
            }
        }
    }
}

fn anyhow_to_io(e: anyhow::Error) -> io::Error {
    io::Error::other(format!("{e:#}"))
}

fn http_serve(opts: http_server::ServerOpts) -> io::Result<bool> {
    http_server::run(opts).map_err(anyhow_to_io)
}

fn http(args: http_client::HttpArgs) -> io::Result<bool> {
    http_client::run(args).map_err(anyhow_to_io)
}

// ---------- server ----------

fn serve(name: &str, port: u16) -> io::Result<bool> {
    // Dual-stack: IPv4 callers arrive as ::ffff:a.b.c.d (answered as a.b.c.d), IPv6 ones too.
    let listener = TcpListener::bind(("::", port))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.to_string();
        std::thread::spawn(move || {
            let _ = handle(conn, &name);
        });
    }
    Ok(true)
}

fn handle(conn: TcpStream, name: &str) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let peer = conn.peer_addr()?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(128).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let mut out = conn;
    match words.next() {
        Some("WHO") => {
            writeln!(out, "{name} {}", peer.ip().to_canonical())?;
            out.shutdown(Shutdown::Write)?;
        }
        Some("ECHO") => {
            io::copy(&mut reader, &mut out)?;
            out.shutdown(Shutdown::Write)?;
        }
        Some("RR") => {
            let size: usize = words.next().and_then(|s| s.parse().ok()).unwrap_or(1024);
            let mut buf = vec![0u8; size];
            while reader.read_exact(&mut buf).is_ok() {
                out.write_all(&buf)?;
            }
        }
        Some("SINK") => {
            let n = io::copy(&mut reader, &mut io::sink())?;
            writeln!(out, "{n}")?;
            out.shutdown(Shutdown::Write)?;
        }
        _ => {
            writeln!(out, "unknown command {line:?}")?;
        }
    }
    Ok(())
}

// ---------- clients ----------

fn wait(addr: &str, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&resolve(addr)?, Duration::from_millis(200)).is_ok() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            eprintln!("{addr} not accepting after {timeout:?}");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask_who(addr: &str, timeout: Duration, mark: Option<u32>) -> io::Result<String> {
    let mut s = dial_marked(addr, timeout, mark)?;
    s.write_all(b"WHO\n")?;
    let mut answer = String::new();
    Patient { s: &s, timeout }.read_to_string(&mut answer)?;
    if answer.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed without an answer"));
    }
    Ok(answer.trim().to_string())
}

fn who(addr: &str, count: u64, interval_ms: u64, timeout_ms: u64, mark: Option<u32>) -> io::Result<bool> {
    let mut ok = true;
    let stdout = io::stdout();
    for i in 0..count {
        let line = match ask_who(addr, Duration::from_millis(timeout_ms), mark) {
            Ok(answer) => answer,
            Err(e) => {
                ok = false;
                format!("error {}", classify(&e))
            }
        };
        let mut out = stdout.lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        if interval_ms > 0 && i + 1 < count {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
    }
    Ok(ok)
}

fn classify(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => "reset",
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        _ if e.raw_os_error() == Some(libc_ehostunreach()) => "unreachable",
        _ if e.raw_os_error() == Some(libc_enetunreach()) => "unreachable",
        _ => "error",
    }
}

const fn libc_ehostunreach() -> i32 {
    113
}
const fn libc_enetunreach() -> i32 {
    101
}

fn connect_once(addr: &str, timeout_ms: u64, mark: Option<u32>) -> io::Result<bool> {
    let start = Instant::now();
    let (result, answer) = match ask_who(addr, Duration::from_millis(timeout_ms), mark) {
        Ok(a) => ("ok", a),
        Err(e) => (classify(&e), e.to_string()),
    };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    println!("{}", serde_json::json!({"result": result, "ms": ms, "answer": answer}));
    Ok(true)
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can be checked by hash.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

fn echo(addr: &str, bytes: u64) -> io::Result<bool> {
    let mut s = dial(addr, Duration::from_secs(10))?;
    s.write_all(b"ECHO\n")?;
    let mut writer = s.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<String> {
        let mut pattern = Pattern(0x9E37_79B9_7F4A_7C15);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(format!("{:x}", hash.finalize()))
    });
    let mut hash = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = Patient { s: &s, timeout: Duration::from_secs(10) };
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n as u64;
    }
    let sent_sha = sender.join().map_err(|_| io::Error::other("sender panicked"))??;
    let received_sha = format!("{:x}", hash.finalize());
    let ok = received == bytes && sent_sha == received_sha;
    println!(
        "{}",
        serde_json::json!({"sent": bytes, "received": received, "sent_sha256": sent_sha, "received_sha256": received_sha, "ok": ok, "spurious_eagain": spurious_eagain()})
    );
    Ok(ok)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn rr(addr: &str, size: usize, rate: u64, seconds: u64, conns: u64) -> io::Result<bool> {
    let per_conn_interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let total_per_conn = rate * seconds / conns;
    let mut threads = Vec::new();
    for c in 0..conns {
        let addr = addr.to_string();
        threads.push(std::thread::spawn(move || -> io::Result<(Vec<f64>, u64, u64, u64)> {
            let mut s = dial(&addr, Duration::from_secs(5))?;
            s.write_all(format!("RR {size}\n").as_bytes())?;
            let req = vec![0x5au8; size];
            let mut resp = vec![0u8; size];
            let mut lat = Vec::with_capacity(total_per_conn as usize);
            let (mut errors, mut late, mut max_lag_us) = (0, 0, 0);
            // Stagger connections so the aggregate rate is smooth.
            let start = Instant::now() + per_conn_interval.mul_f64(c as f64 / conns as f64);
            for i in 0..total_per_conn {
                let due = start + per_conn_interval * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // A start held back by a slow answer is late; its latency still counts from
                // the scheduled start (no coordinated omission).
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                if lag > 1000 {
                    late += 1;
                }
                max_lag_us = max_lag_us.max(lag);
                if s.write_all(&req).and_then(|_| Patient { s: &s, timeout: Duration::from_secs(5) }.read_exact(&mut resp)).is_err() {
                    errors += 1;
                    break;
                }
                lat.push(due.elapsed().as_secs_f64() * 1e6);
            }
            Ok((lat, errors, late, max_lag_us))
        }));
    }
    let mut all = Vec::new();
    let (mut errors, mut late, mut max_lag_us) = (0, 0, 0);
    for t in threads {
        let (lat, e, l, m) = t.join().map_err(|_| io::Error::other("worker panicked"))??;
        all.extend(lat);
        errors += e;
        late += l;
        max_lag_us = max_lag_us.max(m);
    }
    all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(), "errors": errors,
            "p50_us": percentile(&all, 0.50), "p90_us": percentile(&all, 0.90), "p99_us": percentile(&all, 0.99),
            "late_starts": late, "max_start_lag_us": max_lag_us, "latency_from": "scheduled start",
            "spurious_eagain": spurious_eagain(),
        })
    );
    Ok(errors == 0)
}

fn bulk(addr: &str, bytes: u64) -> io::Result<bool> {
    let mut s = dial(addr, Duration::from_secs(30))?;
    s.write_all(b"SINK\n")?;
    let buf = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    Patient { s: &s, timeout: Duration::from_secs(30) }.read_to_string(&mut answer)?;
    let secs = start.elapsed().as_secs_f64();
    let counted: u64 = answer.trim().parse().unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"bytes": bytes, "counted": counted, "seconds": secs, "mbit_per_s": bytes as f64 * 8.0 / secs / 1e6, "spurious_eagain": spurious_eagain()})
    );
    Ok(counted == bytes)
}
