//! The L7 path: a captured connection to an HTTP Service port is served as HTTP/1.1 or HTTP/2,
//! and each request is routed, balanced, retried and timed out on its own.
mod actions;
pub mod headers;
pub mod pool;
mod proxy;
pub mod replay;
pub mod retry;
pub mod router;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tracing::debug;

use crate::listener::ProxyContext;
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
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy::handle(req, conn, ctx).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
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
