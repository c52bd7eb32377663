//! Loopback HTTP/1.1 servers for unit tests that fake a peer (the Kubernetes API server): one
//! accept loop instead of a copy per fake.
use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc};

use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;

/// Serves `handle` on 127.0.0.1 (an ephemeral port), over TLS when `tls` is given; a client
/// that refuses the certificate just ends its connection.
pub async fn serve<S, F, B>(tls: Option<Arc<rustls::ServerConfig>>, handle: S) -> SocketAddr
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let handle = handle.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let resp = handle(req);
                    async move { Ok::<_, Infallible>(resp.await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    addr
}
