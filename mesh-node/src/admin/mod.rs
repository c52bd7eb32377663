//! The admin API (JSON, loopback by default) and the readiness probe.
//!
//! Files: `workloads`, `services` (services, endpoints), `routes`, `certs`, `bpf`, `status`
//! (node summary, config and listener health), `log_level` (runtime filter), `reply` (HTTP
//! plumbing). Every handler reads shared state; none changes the data path except
//! `/log_level`.
mod bpf;
mod certs;
pub(crate) mod config_errors;
mod describe;
pub mod log_level;
mod reply;
mod routes;
mod services;
mod status;
mod workloads;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;
use tracing::debug;

use crate::{
    capture::{BpfView, CaptureState, Counters},
    config::Cluster,
    stats::ProxyStats,
};
use reply::{error, json, query_param};

pub struct AdminState {
    pub node: String,
    pub ready: AtomicBool,
    pub config: watch::Receiver<Arc<Cluster>>,
    /// Where the config is read from: re-validated on demand to report a rejected change.
    pub config_dir: PathBuf,
    pub capture_counters: Arc<Counters>,
    pub capture_state: Arc<Mutex<CaptureState>>,
    pub bpf: Arc<BpfView>,
    pub fast_path: Arc<crate::capture::FastPathView>,
    pub proxy_stats: Arc<ProxyStats>,
    /// Upstream clusters and their balancer state (endpoints, ejections, active requests).
    pub proxy: Arc<crate::listener::ProxyContext>,
    /// `host:port` of the CA, when tunnels use mTLS.
    pub ca_address: Option<String>,
    /// The daemon's listening sockets by role (`outbound`, `inbound`, `admin`, `readiness`).
    pub listeners: Vec<(&'static str, SocketAddr)>,
    pub started: SystemTime,
    /// Other proxies of this node that are starting: while one is, we do not answer "ready"
    /// (see [`crate::capture::announce`]).
    pub successors: crate::capture::announce::Successors,
    /// What Kubernetes discovery holds back (None in file mode).
    pub held_back: Option<crate::discovery::HeldBackView>,
}

impl AdminState {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn stats(&self) -> serde_json::Value {
        json!({
            "node": self.node,
            "capture": self.capture_counters.read(),
            "sockmap": self.fast_path.counters(),
            "proxy": self.proxy_stats.snapshot(),
            "tunnel_connections": self.proxy.connector.tunnels.connections(),
        })
    }

    fn config_dump(&self) -> serde_json::Value {
        let cluster = self.config.borrow().clone();
        let services: Vec<_> = cluster
            .services()
            .map(|svc| {
                let ports: Vec<_> = svc
                    .ports
                    .iter()
                    .map(|p| {
                        let endpoints: Vec<_> = cluster
                            .endpoints(svc, p.port)
                            .into_iter()
                            .map(|e| json!({"pod": format!("{}/{}", e.pod_namespace, e.pod_name), "node": e.node, "addr": e.addr.to_string(), "ready": e.conditions.ready, "serving": e.conditions.serving, "terminating": e.conditions.terminating}))
                            .collect();
                        json!({"port": p.port, "name": p.name, "endpoints": endpoints})
                    })
                    .collect();
                json!({"service": format!("{}/{}", svc.namespace, svc.name), "vips": svc.cluster_ips, "external_name": svc.external_name, "ports": ports})
            })
            .collect();
        let capture = self.capture_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "node": self.node,
            "config_dir": self.config_dir,
            "generation": format!("{:016x}", cluster.fingerprint()),
            "services": services,
            "capture": capture,
        })
    }
}

const ENDPOINTS: &str = "endpoints: /status /config_dump /config_status /config_errors /workloads /services /endpoints?service=NS/NAME \
/routes[?service=NS/NAME] /describe?from=NS/POD&host=HOST[:PORT] /certs /connections /bpf /stats /clusters /log_level (GET; POST ?level=LEVEL) /ready\n";

/// The largest request body the admin API reads.
const MAX_BODY: usize = 1024;

/// The uid owning the peer's socket, from the kernel's socket table of this network namespace
/// (`/proc/net/tcp{,6}`: a loopback peer is a local socket there).
fn peer_uid(peer: SocketAddr) -> Option<u32> {
    let (file, want) = match peer {
        SocketAddr::V4(a) => ("/proc/net/tcp", format!("{:08X}:{:04X}", u32::from_ne_bytes(a.ip().octets()), a.port())),
        SocketAddr::V6(a) => {
            let words: Vec<String> = a.ip().octets().chunks(4).map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))).collect();
            ("/proc/net/tcp6", format!("{}:{:04X}", words.concat(), a.port()))
        }
    };
    let table = std::fs::read_to_string(file).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&want.as_str())).then(|| f.get(7)?.parse().ok()).flatten()
    })
}

/// What an admin request asks for, read from its method, path, query and body alone (no
/// state): the parsing half of [`admin`], fuzzed on its own (`fuzz/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// `POST`/`PUT /log_level`: the directives from `?level=` or the body.
    SetLogLevel(String),
    /// A read-only endpoint, with its `?service=` when it takes one.
    Get { path: String, service: Option<String> },
    /// Any other method.
    MethodNotAllowed { method: String, path: String },
}

impl AdminRequest {
    pub fn parse(method: &Method, path: &str, query: &str, body: &[u8]) -> AdminRequest {
        if path == "/log_level" && (method == Method::POST || method == Method::PUT) {
            // The level comes from `?level=` or, failing that, the body (`curl -d debug`).
            let level = query_param(query, "level").unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
            return AdminRequest::SetLogLevel(level);
        }
        if method != Method::GET && method != Method::HEAD {
            return AdminRequest::MethodNotAllowed { method: method.to_string(), path: path.to_owned() };
        }
        AdminRequest::Get { path: path.to_owned(), service: query_param(query, "service") }
    }
}

/// Checks log filter directives as `POST /log_level` would, without applying them.
pub fn check_log_level(directives: &str) -> Result<(), String> {
    let directives = directives.trim();
    if directives.is_empty() {
        return Err("empty".into());
    }
    tracing_subscriber::EnvFilter::try_new(directives).map(|_| ()).map_err(|e| e.to_string())
}

async fn admin(req: Request<Incoming>, state: Arc<AdminState>, peer: SocketAddr) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let mutation = path == "/log_level" && (method == Method::POST || method == Method::PUT);
    let body = if mutation {
        // A mutation: only root's processes may (a hostNetwork pod shares the node's loopback).
        match peer_uid(peer) {
            Some(0) => {}
            uid => {
                let who = uid.map_or("unknown".to_string(), |u| u.to_string());
                return Ok(error(StatusCode::FORBIDDEN, format!("POST /log_level: only root may change the daemon (the caller's socket belongs to uid {who})")));
            }
        }
        match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, format!("POST /log_level: the body is over {MAX_BODY} bytes"))),
        }
    } else {
        Bytes::new()
    };
    let service = match AdminRequest::parse(&method, &path, &query, &body) {
        AdminRequest::SetLogLevel(level) => {
            return Ok(match log_level::set(&level) {
                Ok(level) => json(json!({"level": level})),
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
            });
        }
        AdminRequest::MethodNotAllowed { method, path } => {
            return Ok(error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} {path}: only GET (and POST on /log_level)")));
        }
        AdminRequest::Get { service, .. } => service,
    };
    Ok(match path.as_str() {
        "/status" => json(status::status(&state).await),
        "/stats" => json(state.stats()),
        "/config_dump" => json(state.config_dump()),
        "/config_status" => json(status::config_status(&state).await),
        "/config_errors" => {
            let mut errors = config_errors::config_errors(state.held_back.as_ref(), SystemTime::now());
            errors["warnings"] = config_errors::warnings(&state.proxy.cluster());
            errors["not_applied"] = config_errors::not_applied(&state.proxy.cluster());
            json(errors)
        }
        "/clusters" => json(state.proxy.destinations.snapshot()),
        "/workloads" => json(workloads::workloads(&state)),
        "/services" => json(services::services(&state)),
        "/endpoints" => match service {
            Some(svc) => services::endpoints(&state, &svc).map(json).unwrap_or_else(|e| error(StatusCode::NOT_FOUND, e)),
            None => error(StatusCode::BAD_REQUEST, "/endpoints needs ?service=NAMESPACE/NAME"),
        },
        "/routes" => routes::routes(&state, service.as_deref()).map(json).unwrap_or_else(|e| error(StatusCode::NOT_FOUND, e)),
        "/describe" => describe::describe(&state, query_param(&query, "from").as_deref(), query_param(&query, "host").as_deref())
            .map(json)
            .unwrap_or_else(|e| error(StatusCode::BAD_REQUEST, e)),
        "/certs" => json(certs::certs(&state).await),
        "/bpf" => json(bpf::bpf(&state)),
        "/connections" => json(json!({"node": state.node, "connections": state.proxy.telemetry.live_connections()})),
        "/log_level" => match log_level::current() {
            Some(level) => json(json!({"level": level})),
            None => error(StatusCode::NOT_IMPLEMENTED, "this process has no reloadable log filter"),
        },
        "/ready" | "/healthz/ready" => ready(&state),
        _ => reply::respond(StatusCode::NOT_FOUND, ENDPOINTS),
    })
}

/// Which process answered a probe: during a restart two proxies share the port. The pid for
/// humans (in pods both proxies are pid 1), the instance id to tell them apart.
const PID_HEADER: &str = "x-mesh-pid";
const INSTANCE_HEADER: &str = "x-mesh-instance";

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let mut res = if !state.is_ready() {
        reply::respond(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    } else {
        // The probe may be meant for a starting successor (same port, SO_REUSEPORT): saying
        // "ready" for it before it has taken over would let the rollout stop us too early.
        match state.successors.starting().as_slice() {
            [] => reply::respond(StatusCode::OK, "ready\n"),
            starting => {
                let starting: Vec<String> = starting.iter().map(ToString::to_string).collect();
                debug!(?starting, "readiness withheld: a successor is starting");
                reply::respond(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: a new proxy is starting ({})\n", starting.join(", ")))
            }
        }
    };
    res.headers_mut().insert(PID_HEADER, hyper::header::HeaderValue::from(std::process::id()));
    res.headers_mut().insert(INSTANCE_HEADER, hyper::header::HeaderValue::from_static(crate::capture::announce::instance_id()));
    res
}

async fn readiness(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz/ready" => ready(&state),
        // For a liveness probe: this process serves. Unlike readiness it does not turn 503
        // while a successor starts, so the running proxy is not restarted for that.
        "/healthz/live" => reply::respond(StatusCode::OK, "live\n"),
        _ => reply::respond(StatusCode::NOT_FOUND, ""),
    })
}

/// Serves the admin API on `listener` (meant to be loopback).
pub async fn serve_admin(listener: crate::listener::accept::Acceptor, state: Arc<AdminState>) {
    serve(listener, state, |req, st, peer| Box::pin(admin(req, st, peer))).await
}

/// Serves `/healthz/ready` and `/healthz/live` only, for kubelet probes.
pub async fn serve_readiness(listener: crate::listener::accept::Acceptor, state: Arc<AdminState>) {
    serve(listener, state, |req, st, _| Box::pin(readiness(req, st))).await
}

type Handler = fn(Request<Incoming>, Arc<AdminState>, SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

async fn serve(listener: crate::listener::accept::Acceptor, state: Arc<AdminState>, handler: Handler) {
    loop {
        let (stream, peer, permit) = listener.accept().await;
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| handler(req, state.clone(), peer));
            if let Err(e) = crate::http::server::http1().serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, "admin connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    #[test]
    fn the_peer_socket_owner_is_found_for_ipv4_and_ipv6() {
        let uid = unsafe { libc::geteuid() };
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(addr).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (_server, peer) = listener.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(peer_uid(peer), Some(uid), "{addr}");
        }
    }
}
