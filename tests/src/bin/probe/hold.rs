//! `mesh-probe hold`: one long-lived connection used every interval, never reopened, so a test
//! sees what happens to a connection that was already open when something changed (a policy).
//!
//! Each use prints `{"n": i, "at_ms": <unix ms when it started>, "result": ..}` at once:
//! `ok` (HTTP 2xx, or the ECHO line came back), `status` (another HTTP status, in "status"),
//! `closed` (the connection had ended before this use), `eof`, `reset`, `timeout` or `error`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct HoldArgs {
    /// `http` (HTTP/1.1 GET / over one keep-alive connection) or `tcp` (ECHO lines).
    pub mode: String,
    /// HOST:PORT
    pub addr: String,
    #[arg(long, default_value_t = 20)]
    pub count: u64,
    #[arg(long, default_value_t = 250)]
    pub interval_ms: u64,
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

pub fn run(args: HoldArgs) -> anyhow::Result<bool> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut conn: Box<dyn Use> = match args.mode.as_str() {
        "http" => Box::new(Http::open(&args.addr, timeout)?),
        "tcp" => Box::new(Echo::open(&args.addr, timeout)?),
        other => anyhow::bail!("unknown mode {other:?} (http or tcp)"),
    };
    let mut closed = false;
    for n in 0..args.count {
        if n > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let at_ms = now_ms();
        let mut line = if closed { json!({"result": "closed"}) } else { conn.use_once(n) };
        // Once a use fails, the connection is done: later uses say so instead of reopening.
        closed = line["result"] != "ok" && line["result"] != "status";
        line["n"] = n.into();
        line["at_ms"] = (at_ms as u64).into();
        println!("{line}");
    }
    Ok(true)
}

trait Use {
    fn use_once(&mut self, n: u64) -> Value;
}

fn io_result(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        WouldBlock | TimedOut => "timeout",
        UnexpectedEof => "eof",
        _ => "error",
    }
}

/// TCP to an ECHO server: each use writes a line and expects it back.
struct Echo {
    out: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Echo {
    fn open(addr: &str, timeout: Duration) -> anyhow::Result<Self> {
        let out = super::dial(addr, timeout)?;
        let reader = BufReader::new(out.try_clone()?);
        let mut me = Self { out, reader };
        me.out.write_all(b"ECHO\n")?;
        Ok(me)
    }
}

impl Use for Echo {
    fn use_once(&mut self, n: u64) -> Value {
        let sent = format!("ping {n}\n");
        if let Err(e) = self.out.write_all(sent.as_bytes()) {
            return json!({"result": io_result(&e), "error": e.to_string()});
        }
        let mut got = String::new();
        match self.reader.read_line(&mut got) {
            Ok(0) => json!({"result": "eof"}),
            Ok(_) if got == sent => json!({"result": "ok"}),
            Ok(_) => json!({"result": "error", "error": format!("echoed {got:?}")}),
            Err(e) => json!({"result": io_result(&e), "error": e.to_string()}),
        }
    }
}

/// One HTTP/1.1 keep-alive connection (hyper), a GET / per use.
struct Http {
    rt: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: String,
    timeout: Duration,
}

impl Http {
    fn open(addr: &str, timeout: Duration) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let target = super::resolve(addr)?;
        let sender = rt.block_on(async {
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await??;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            anyhow::Ok(sender)
        })?;
        Ok(Self { rt, sender, host: addr.to_string(), timeout })
    }
}

impl Use for Http {
    fn use_once(&mut self, _n: u64) -> Value {
        let req = Request::get("/").header("host", &self.host).body(Empty::<Bytes>::new()).expect("a GET is well formed");
        let (sender, timeout) = (&mut self.sender, self.timeout);
        self.rt.block_on(async move {
            let exchange = async {
                sender.ready().await?;
                let res = sender.send_request(req).await?;
                let status = res.status().as_u16();
                let pod = res.headers().get("x-pod").and_then(|v| v.to_str().ok()).map(str::to_string);
                res.into_body().collect().await?;
                anyhow::Ok((status, pod))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Err(_) => json!({"result": "timeout"}),
                Ok(Ok((status, pod))) if (200..300).contains(&status) => json!({"result": "ok", "status": status, "pod": pod}),
                Ok(Ok((status, pod))) => json!({"result": "status", "status": status, "pod": pod}),
                Ok(Err(e)) => {
                    let closed = e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_closed() || h.is_canceled() || h.is_incomplete_message());
                    json!({"result": if closed { "eof" } else { "error" }, "error": format!("{e:#}")})
                }
            }
        })
    }
}
