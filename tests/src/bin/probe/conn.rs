//! How the HTTP clients reach a server: URL parsing, persistent HTTP/1.1 or h2 (prior knowledge)
//! connections reopened when they break, and the error kinds a report counts.
use std::{
    error::Error as _,
    io,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Uri,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex, task::JoinHandle, time::Instant};

pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

pub struct Target {
    pub addr: SocketAddr,
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub async fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported: {url}");
        }
        let authority = uri.authority().with_context(|| format!("no host in {url}"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port)).await?.next().with_context(|| format!("cannot resolve {url}"))?;
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Self { addr, authority: authority.as_str().to_string(), path_and_query })
    }

    pub async fn dial(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// What one request came to.
pub struct Answer {
    pub status: u16,
    pub pod: Option<String>,
    pub body_len: u64,
    pub body: Option<Vec<u8>>,
    /// The `grpc-status` trailer (or header, for a trailers-only answer), if any.
    pub grpc_status: Option<String>,
    /// The server said `connection: close`: this HTTP/1.1 connection must not carry another
    /// request (a draining proxy says it, then closes).
    pub close: bool,
}

impl Answer {
    /// The answer without its body: what a progress tally needs.
    pub fn summary(&self) -> Answer {
        Answer { status: self.status, pod: self.pod.clone(), body_len: self.body_len, body: None, grpc_status: self.grpc_status.clone(), close: self.close }
    }
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Conn {
    sender: Sender,
    /// Aborted when the connection is discarded, so a hung connection does not linger.
    driver: JoinHandle<()>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A fixed set of connection slots, each opened on first use and reopened after it breaks.
pub struct Pool {
    target: Target,
    h2: bool,
    slots: Vec<Mutex<Option<Conn>>>,
    opened: AtomicU64,
}

impl Pool {
    pub fn new(target: Target, h2: bool, conns: usize) -> Self {
        Self { target, h2, slots: (0..conns.max(1)).map(|_| Mutex::new(None)).collect(), opened: AtomicU64::new(0) }
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }

    /// Sends `req` on connection `slot` and reads the whole answer, all before `deadline`.
    /// Returns the error kind on failure: connect, reset, timeout or other.
    pub async fn request(&self, slot: usize, req: Request<Full<Bytes>>, deadline: Instant, keep_body: bool) -> Result<Answer, &'static str> {
        let mut guard = tokio::time::timeout_at(deadline, self.slots[slot].lock()).await.map_err(|_| "timeout")?;
        if guard.as_ref().is_none_or(Conn::is_closed) {
            *guard = None;
            let conn = tokio::time::timeout_at(deadline, self.connect()).await.map_err(|_| "timeout")?.map_err(|_| "connect")?;
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("connection just ensured");
        match &mut conn.sender {
            Sender::H2(sender) => {
                // Streams multiplex: release the slot so other requests share the connection.
                let mut sender = sender.clone();
                drop(guard);
                let exchange = async {
                    let resp = sender.send_request(req).await.map_err(|e| classify(&e))?;
                    read_answer(resp, keep_body).await
                };
                // Dropping the exchange on timeout resets only this stream.
                tokio::time::timeout_at(deadline, exchange).await.unwrap_or(Err("timeout"))
            }
            Sender::H1(sender) => {
                let exchange = async {
                    sender.ready().await.map_err(|e| classify(&e))?;
                    let resp = sender.send_request(req).await.map_err(|e| classify(&e))?;
                    read_answer(resp, keep_body).await
                };
                let result = tokio::time::timeout_at(deadline, exchange).await.unwrap_or(Err("timeout"));
                // An HTTP/1.1 connection with an abandoned exchange cannot be reused, nor one
                // the server announced it will close.
                if result.as_ref().map_or(true, |a| a.close) {
                    *guard = None;
                }
                result
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let io = TokioIo::new(self.target.dial().await?);
        let conn = if self.h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            Conn { sender: Sender::H2(sender), driver: tokio::spawn(async move { let _ = conn.await; }) }
        } else {
            let (sender, conn) = http1::handshake(io).await?;
            Conn { sender: Sender::H1(sender), driver: tokio::spawn(async move { let _ = conn.await; }) }
        };
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(conn)
    }
}

async fn read_answer(resp: hyper::Response<Incoming>, keep_body: bool) -> Result<Answer, &'static str> {
    let status = resp.status().as_u16();
    let pod = resp.headers().get("x-pod").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let close = resp.headers().get(hyper::header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut grpc_status = resp.headers().get("grpc-status").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let mut body = resp.into_body();
    let mut kept = keep_body.then(Vec::new);
    let mut body_len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| classify(&e))?;
        match frame.into_data() {
            Ok(data) => {
                body_len += data.len() as u64;
                if let Some(kept) = kept.as_mut() {
                    kept.extend_from_slice(&data);
                }
            }
            Err(frame) => {
                if let Some(s) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    grpc_status = Some(String::from_utf8_lossy(s.as_bytes()).into_owned());
                }
            }
        }
    }
    Ok(Answer { status, pod, body_len, body: kept, grpc_status, close })
}

/// Sorts a failure into the kinds the mesh tests tell apart: a peer that went away mid-exchange
/// (reset, including h2 RST_STREAM/GOAWAY) vs anything else.
pub fn classify(e: &hyper::Error) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    if e.is_canceled() || e.is_incomplete_message() || e.is_closed() {
        return "reset";
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => return "reset",
                io::ErrorKind::ConnectionRefused => return "connect",
                io::ErrorKind::TimedOut => return "timeout",
                _ => {}
            }
        }
        // h2's error type is not a dependency here; its messages name resets and GOAWAY.
        let text = s.to_string().to_ascii_lowercase();
        if ["reset", "go away", "goaway", "refused_stream", "stream error", "connection error"].iter().any(|w| text.contains(w)) {
            return "reset";
        }
        source = s.source();
    }
    "other"
}
