//! Admin endpoint (loopback only: stats and config dump) and the readiness probe.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use crate::{
    capture::{CaptureState, Counters},
    config::Cluster,
    stats::ProxyStats,
};

pub struct AdminState {
    pub node: String,
    pub ready: AtomicBool,
    pub config: watch::Receiver<Arc<Cluster>>,
    pub capture_counters: Arc<Counters>,
    pub capture_state: Arc<Mutex<CaptureState>>,
    pub proxy_stats: Arc<ProxyStats>,
    /// Upstream clusters and their balancer state (endpoints, ejections, active requests).
    pub proxy: Arc<crate::listener::ProxyContext>,
}

impl AdminState {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    fn stats(&self) -> serde_json::Value {
        json!({
            "node": self.node,
            "capture": self.capture_counters.read(),
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
                            .map(|e| json!({"pod": format!("{}/{}", e.pod_namespace, e.pod_name), "node": e.node, "addr": e.addr.to_string()}))
                            .collect();
                        json!({"port": p.port, "name": p.name, "endpoints": endpoints})
                    })
                    .collect();
                json!({"service": format!("{}/{}", svc.namespace, svc.name), "vips": svc.cluster_ips, "ports": ports})
            })
            .collect();
        let capture = self.capture_state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({"node": self.node, "services": services, "capture": capture})
    }
}

fn respond(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = code;
    res
}

async fn admin(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    let json = |v: serde_json::Value| respond(StatusCode::OK, serde_json::to_vec_pretty(&v).unwrap_or_default());
    Ok(match req.uri().path() {
        "/stats" => json(state.stats()),
        "/config_dump" => json(state.config_dump()),
        "/clusters" => json(state.proxy.destinations.snapshot()),
        "/ready" | "/healthz/ready" => ready(&state),
        _ => respond(StatusCode::NOT_FOUND, "endpoints: /stats /config_dump /clusters /ready\n"),
    })
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if state.ready.load(Ordering::Acquire) {
        respond(StatusCode::OK, "ready\n")
    } else {
        respond(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn readiness(req: Request<Incoming>, state: Arc<AdminState>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz/ready" => ready(&state),
        _ => respond(StatusCode::NOT_FOUND, ""),
    })
}

/// Serves the admin API on `listener` (meant to be loopback).
pub async fn serve_admin(listener: TcpListener, state: Arc<AdminState>) {
    serve(listener, state, |req, st| Box::pin(admin(req, st))).await
}

/// Serves `/healthz/ready` only, for kubelet probes.
pub async fn serve_readiness(listener: TcpListener, state: Arc<AdminState>) {
    serve(listener, state, |req, st| Box::pin(readiness(req, st))).await
}

type Handler = fn(Request<Incoming>, Arc<AdminState>) -> std::pin::Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

async fn serve(listener: TcpListener, state: Arc<AdminState>, handler: Handler) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handler(req, state.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                debug!(peer = %SocketAddr::from(peer), "admin connection: {e}");
            }
        });
    }
}
