//! Inbound listener: tunnels from other node proxies, HTTP/2 connections whose CONNECT streams
//! each name a pod on this node.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::ProxyContext;
use crate::{tunnel, upstream};

pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!("inbound accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, peer, ctx.clone()));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(tunnel::STREAM_WINDOW)
                .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
                .max_frame_size(tunnel::MAX_FRAME)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, "inbound connection: {e}");
            }
        });
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut res = Response::new(Empty::new());
    *res.status_mut() = code;
    res
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, ctx: Arc<ProxyContext>) -> Result<Response<Empty<Bytes>>, Infallible> {
    ctx.stats.inbound_requests.inc();
    if req.method() != Method::CONNECT {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Some(target) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    // Only pods on this node may be reached through it: the tunnel is not an open relay.
    let local_pod = ctx.cluster().pod_by_ip(target.ip()).is_some_and(|p| p.node == ctx.node);
    if !local_pod {
        ctx.stats.inbound_refused.inc();
        warn!(%peer, %target, "inbound: tunnel target is not a pod on this node");
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let mut upstream = match upstream::connect(target, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            ctx.stats.inbound_connect_errors.inc();
            debug!(%target, "inbound connect: {e}");
            return Ok(status(StatusCode::BAD_GATEWAY));
        }
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut io = TokioIo::new(upgraded);
                let _ = upstream::pipe(&mut io, &mut upstream).await;
            }
            Err(e) => debug!(%target, "inbound upgrade: {e}"),
        }
    });
    Ok(status(StatusCode::OK))
}
