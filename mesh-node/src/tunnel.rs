//! Carrying a connection to an endpoint on another node: an HTTP CONNECT to that node proxy's
//! inbound port, naming the target pod address. (Plaintext HTTP/1.1 for now; the HBONE shape,
//! HTTP/2 CONNECT over mutual TLS, replaces it when identities land.)
use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, upgrade::Upgraded};
use hyper_util::rt::TokioIo;

use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to node proxy {proxy}: {source}")]
    Connect { proxy: SocketAddr, source: io::Error },
    #[error("tunnel handshake with {proxy}: {source}")]
    Http { proxy: SocketAddr, source: hyper::Error },
    #[error("node proxy {proxy} refused the tunnel to {target}: {status}")]
    Refused { proxy: SocketAddr, target: SocketAddr, status: StatusCode },
}

/// Opens a tunnel through the node proxy at `proxy` to `target`, a pod on that node.
pub async fn open(proxy: SocketAddr, target: SocketAddr, connect_timeout: Duration) -> Result<TokioIo<Upgraded>, TunnelError> {
    let stream = upstream::connect(proxy, connect_timeout)
        .await
        .map_err(|source| TunnelError::Connect { proxy, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| TunnelError::Http { proxy, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%proxy, "tunnel connection: {e}");
        }
    });
    let authority = target.to_string();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(&authority)
        .header(hyper::header::HOST, &authority)
        .body(Empty::<Bytes>::new())
        .expect("CONNECT request from a socket address is well formed");
    let res = sender.send_request(req).await.map_err(|source| TunnelError::Http { proxy, source })?;
    if res.status() != StatusCode::OK {
        return Err(TunnelError::Refused { proxy, target, status: res.status() });
    }
    let upgraded = hyper::upgrade::on(res).await.map_err(|source| TunnelError::Http { proxy, source })?;
    Ok(TokioIo::new(upgraded))
}
