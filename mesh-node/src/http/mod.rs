//! The L7 path: a captured connection to an HTTP Service port is served as HTTP/1.1 or HTTP/2,
//! and each request is routed, balanced, retried and timed out on its own.
mod actions;
#[doc(hidden)]
pub mod fuzz_hooks;
pub mod grpc;
pub mod headers;
pub mod pool;
mod proxy;
pub mod replay;
pub mod retry;
pub mod router;
pub mod server;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, service::service_fn};
use hyper_util::{
    rt::TokioIo,
};
use tokio::sync::Notify;
use tracing::debug;

use crate::listener::{ProxyContext, drain::Phase};
pub use replay::BoxError;

pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The Service port a captured connection was headed to.
#[derive(Clone, Debug)]
pub struct ServiceTarget {
    pub namespace: String,
    pub service: String,
    pub port: u16,
}

/// Serves one downstream connection; HTTP/1.1 or HTTP/2 (prior knowledge) is detected from
/// the first bytes.
pub async fn serve<IO>(io: IO, peer: SocketAddr, source: crate::upstream::Source, target: ServiceTarget, ctx: Arc<ProxyContext>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Listed while open; its bytes are counted on the downstream stream itself.
    let live = ctx.telemetry.connections().register(crate::telemetry::connections::ConnectionInfo {
        direction: "outbound",
        protocol: "http",
        peer,
        source_workload: ctx.telemetry.workload_of(peer.ip()),
        source_principal: source.identity.as_ref().map(|id| id.to_string()),
        destination_service: Some(crate::config::fqdn(&target.service, &target.namespace)),
        destination: None,
        upstream: Some(format!("outbound|{}||{}", target.port, crate::config::fqdn(&target.service, &target.namespace))),
    });
    let io = crate::telemetry::connections::Counted::new(io, Some(live.bytes().clone()), Vec::new());
    let conn = Arc::new(proxy::Downstream { peer, target, source });
    let mut drain = ctx.drain.signal();
    // Whether the client speaks HTTP/2 (known from its first request), and a wake-up for a
    // draining connection that turns out to be HTTP/2.
    let is_h2 = Arc::new(AtomicBool::new(false));
    let h2_while_draining = Arc::new(Notify::new());
    let service = service_fn({
        let (drain, is_h2, h2_while_draining) = (drain.clone(), is_h2.clone(), h2_while_draining.clone());
        move |req: hyper::Request<hyper::body::Incoming>| {
            let ctx = ctx.clone();
            let conn = conn.clone();
            let version = req.version();
            if version == hyper::Version::HTTP_2 {
                is_h2.store(true, Ordering::Relaxed);
                if drain.is_draining() {
                    h2_while_draining.notify_one();
                }
            }
            let drain = drain.clone();
            async move {
                let mut res = proxy::handle(req, conn, ctx).await;
                // Draining (Envoy's behaviour): an HTTP/1.1 client learns from this answer to
                // open its next connection anew, which reaches our successor; hyper closes the
                // connection once the answer is written. Closing an idle keep-alive connection
                // instead could race with a request the client is sending on it.
                if drain.is_draining() && version < hyper::Version::HTTP_2 {
                    res.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(res)
            }
        }
    });
    let builder = server::auto();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // When to shut the connection down gracefully: HTTP/2 at once when the drain starts (GOAWAY:
    // the client sends new requests on a new connection; streams in flight finish); HTTP/1.1
    // only at the end of the drain (closes it if idle, else after the answer in flight).
    let shutdown = async {
        drain.reached(Phase::Draining).await;
        if !is_h2.load(Ordering::Relaxed) {
            tokio::select! {
                _ = drain.reached(Phase::Closing) => {}
                _ = h2_while_draining.notified() => {}
            }
        }
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, "downstream connection: {e}");
    }
    drop(live);
}

/// A locally generated response (errors, faults), with Envoy's wording in the body.
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    res
}
