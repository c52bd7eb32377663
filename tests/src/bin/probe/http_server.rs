//! `mesh-probe http-serve`: an HTTP/1.1 + h2c server whose answers a test scripts per request.
//!
//! Behaviour comes from request headers rather than from flags so a test can change it between
//! requests without restarting pods: `x-fail-pods`/`x-fail-status`, `x-delay-pods`, `x-delay-ms`.
//! `/count` is exempt from counting, delays and failures: it is how a test observes a server.
//! SIGUSR1 makes the server start failing every request (a backend gone bad: `/grpc` answers
//! trailers-only `grpc-status: 14` UNAVAILABLE, anything else 503); SIGUSR2 heals it.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{io::AsyncWriteExt as _, net::TcpListener};

use super::fanout::{Call, Fanout};

pub struct ServerOpts {
    pub name: String,
    pub port: u16,
    pub fail_every: Option<u64>,
    pub delay_ms: u64,
    /// Size of the body of a plain `200` answer (and of the `/grpc` reply message); 0 keeps the
    /// classic `<pod name>\n` body.
    pub body_bytes: usize,
    /// `--capacity N`: at most N requests processed at once, each for `service_ms`; the rest
    /// queue (FIFO).
    pub capacity: Option<usize>,
    pub service_ms: u64,
    /// `--call NAME=URL[,URL...]`: downstream calls made for every `/` and `/grpc` request.
    pub calls: Vec<String>,
    /// `--grpc-status-unique`: `/grpc` fails every call with a `grpc-status` text of its own (a
    /// misbehaving upstream, for the abuse bench's telemetry cardinality phase).
    pub grpc_status_unique: bool,
}

struct State {
    opts: ServerOpts,
    pod: HeaderValue,
    /// Requests received (all but `/count`), across connections: `--fail-every` counts these.
    requests: AtomicU64,
    /// Between SIGUSR1 and SIGUSR2: every request fails.
    failing: AtomicBool,
    /// The `--body-bytes` answer, built once.
    sized: Bytes,
    /// The `/grpc` reply: a 5-byte gRPC length prefix and a `--body-bytes` message.
    grpc_reply: Bytes,
    /// `--capacity`: when each worker is next free. A request takes the worker free first, in
    /// arrival order, and is answered at max(arrival, free) + service time: an exact FIFO queue
    /// in front of N workers whose capacity timer slack cannot erode.
    workers: Option<std::sync::Mutex<Vec<tokio::time::Instant>>>,
    /// `--call`: the server lives as long as the process, so its client pools do too.
    fanout: Option<&'static Fanout>,
}

type Body = BoxBody<Bytes, hyper::Error>;

pub fn run(opts: ServerOpts) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(opts))
}

async fn serve(opts: ServerOpts) -> anyhow::Result<bool> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], opts.port))).await?;
    let sized = Bytes::from(vec![b'x'; opts.body_bytes]);
    let grpc_reply = grpc_frame(opts.body_bytes.max(1));
    let workers = opts.capacity.map(|n| std::sync::Mutex::new(vec![tokio::time::Instant::now(); n.max(1)]));
    let fanout = if opts.calls.is_empty() {
        None
    } else {
        let calls = opts.calls.iter().map(|c| Call::parse(c)).collect::<anyhow::Result<Vec<_>>>()?;
        Some(&*Box::leak(Box::new(Fanout::new(calls, opts.body_bytes))))
    };
    let state = Arc::new(State {
        pod: HeaderValue::from_str(&opts.name)?,
        opts,
        requests: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        sized,
        grpc_reply,
        workers,
        fanout,
    });
    watch_failure_signals(state.clone())?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors or a connection reset before accept: keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            // `auto` tells h2 prior knowledge from HTTP/1.1 by the connection preface; upgrades
            // must be enabled for `/ws`.
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let mut resp = if req.uri().path() == "/count" {
        json(StatusCode::OK, &serde_json::json!({"requests": state.requests.load(Ordering::SeqCst)}))
    } else {
        scripted(state, req).await
    };
    resp.headers_mut().insert("x-pod", state.pod.clone());
    resp
}

/// SIGUSR1: start failing every request; SIGUSR2: answer normally again.
fn watch_failure_signals(state: Arc<State>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut fail = signal(SignalKind::user_defined1())?;
    let mut heal = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let failing = tokio::select! {
                _ = fail.recv() => true,
                _ = heal.recv() => false,
            };
            state.failing.store(failing, Ordering::SeqCst);
        }
    });
    Ok(())
}

async fn scripted(state: &State, req: Request<Incoming>) -> Response<Body> {
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let name = state.opts.name.as_str();
    if state.failing.load(Ordering::SeqCst) {
        let grpc = req.uri().path() == "/grpc";
        let _ = req.into_body().collect().await;
        return failed_answer(name, grpc);
    }
    let headers = req.headers();

    if let Some(workers) = &state.workers {
        let done = {
            let mut free_at = workers.lock().expect("workers lock");
            let now = tokio::time::Instant::now();
            let worker = free_at.iter_mut().min().expect("at least one worker");
            *worker = (*worker).max(now) + Duration::from_millis(state.opts.service_ms);
            *worker
        };
        tokio::time::sleep_until(done).await;
    }
    let delay = state.opts.delay_ms + header_u64(headers, "x-delay-ms").unwrap_or(0) + pod_delay(headers, name).unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if listed(headers, "x-fail-pods", name) {
        let status = header_u64(headers, "x-fail-status")
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return text(status, format!("{name}\n"));
    }
    if state.opts.fail_every.is_some_and(|every| every > 0 && n.is_multiple_of(every)) {
        return text(StatusCode::SERVICE_UNAVAILABLE, format!("{name}\n"));
    }

    let path = req.uri().path().to_string();
    if let Some(fanout) = state.fanout
        && (path == "/" || path == "/grpc")
        && let Err(e) = fanout.call_all(headers).await
    {
        let _ = req.into_body().collect().await;
        return text(StatusCode::BAD_GATEWAY, format!("{name}: {e}\n"));
    }
    match path.as_str() {
        "/headers" => json(StatusCode::OK, &headers_json(&req, name)),
        "/echo" => {
            // Streamed straight back: a several-MiB body is never held in memory, and the size
            // hint (content-length when the request had one) carries over to the response.
            Response::new(req.into_body().boxed())
        }
        "/ws" => upgrade(req),
        "/grpc" => grpc(state, req).await,
        _ if state.opts.body_bytes > 0 && path == "/" => {
            // Read the request body (a load test sends one) before answering with a fixed size.
            let _ = req.into_body().collect().await;
            let mut resp = Response::new(Full::new(state.sized.clone()).map_err(|never| match never {}).boxed());
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            resp
        }
        _ => match path.strip_prefix("/status/") {
            Some(code) => match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(status) => text(status, format!("{name}\n")),
                None => text(StatusCode::BAD_REQUEST, format!("bad status {code:?}\n")),
            },
            None => text(StatusCode::OK, format!("{name}\n")),
        },
    }
}

/// A 5-byte gRPC length prefix (uncompressed) and a message of `len` bytes.
pub fn grpc_frame(len: usize) -> Bytes {
    let mut b = Vec::with_capacity(5 + len);
    b.push(0);
    b.extend_from_slice(&(len as u32).to_be_bytes());
    b.resize(5 + len, b'x');
    Bytes::from(b)
}

/// gRPC-shaped unary answer, for load tests (a real gRPC stack is tested elsewhere): reads the
/// request, replies `content-type: application/grpc`, one length-prefixed message and the
/// trailers `grpc-status: 0`. Over HTTP/1.1 the trailers cannot be sent; the status still is.
async fn grpc(state: &State, req: Request<Incoming>) -> Response<Body> {
    let _ = req.into_body().collect().await;
    if state.opts.grpc_status_unique {
        // Trailers-only, so HTTP/1.1 callers see it too: a status no gRPC library would send,
        // different on every call.
        let n = state.requests.load(Ordering::Relaxed);
        let mut resp = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_str(&format!("E{n}-{}", state.opts.name)).expect("ascii"));
        headers.insert("grpc-message", HeaderValue::from_str(&format!("failure number {n}")).expect("ascii"));
        return resp;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = WithTrailers { data: Some(state.grpc_reply.clone()), trailers: Some(trailers) };
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// What a server gone bad answers: for gRPC a trailers-only UNAVAILABLE (HTTP 200, the status in
/// the one HEADERS frame, as a gRPC server whose backend is down sends it), else a 503.
fn failed_answer(name: &str, grpc: bool) -> Response<Body> {
    if !grpc {
        return text(StatusCode::SERVICE_UNAVAILABLE, format!("{name} is failing\n"));
    }
    let mut resp = Response::new(empty());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static("14"));
    headers.insert("grpc-message", HeaderValue::from_str(&format!("{name} is failing")).unwrap_or(HeaderValue::from_static("failing")));
    resp
}

/// A body of one data frame followed by trailers.
struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl hyper::body::Body for WithTrailers {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(data) = this.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        std::task::Poll::Ready(this.trailers.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// Answers 101 and echoes raw bytes on the upgraded connection until the client half-closes.
fn upgrade(mut req: Request<Incoming>) -> Response<Body> {
    let Some(protocol) = req.headers().get(UPGRADE).cloned() else {
        return text(StatusCode::UPGRADE_REQUIRED, "/ws needs an HTTP/1.1 Upgrade\n".into());
    };
    let connection = req.headers().get(CONNECTION).cloned().unwrap_or(HeaderValue::from_static("upgrade"));
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
            let _ = wr.shutdown().await;
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut().insert(UPGRADE, protocol);
    resp.headers_mut().insert(CONNECTION, connection);
    resp
}

/// The request headers as this server received them: what a test checks header rules against.
fn headers_json(req: &Request<Incoming>, name: &str) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for key in req.headers().keys() {
        let joined: Vec<String> = req.headers().get_all(key).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
        map.insert(key.as_str().to_string(), joined.join(",").into());
    }
    map.insert("x-pod".into(), name.into());
    map.insert(":method".into(), req.method().as_str().into());
    map.insert(":path".into(), req.uri().path_and_query().map_or("/", |p| p.as_str()).into());
    // h2 carries the authority in the URI, not in a Host header.
    if let Some(authority) = req.uri().authority() {
        map.insert(":authority".into(), authority.as_str().into());
    }
    map.insert(":version".into(), format!("{:?}", req.version()).into());
    serde_json::Value::Object(map)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name).and_then(|v| v.trim().parse().ok())
}

fn listed(headers: &HeaderMap, header: &str, name: &str) -> bool {
    header_str(headers, header).is_some_and(|v| v.split(',').any(|p| p.trim() == name))
}

/// `x-delay-pods: a=200,b=50` -> this pod's delay in ms.
fn pod_delay(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, "x-delay-pods")?.split(',').find_map(|entry| {
        let (pod, ms) = entry.split_once('=')?;
        (pod.trim() == name).then(|| ms.trim().parse().ok()).flatten()
    })
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = text(status, format!("{value}\n"));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
