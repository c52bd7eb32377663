//! The Prometheus scrape endpoint (`/metrics`, and `/stats/prometheus` as Istio's proxies
//! name it) on the metrics port, 15020.
use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Telemetry;

pub async fn serve(listener: crate::listener::accept::Acceptor, telemetry: Arc<Telemetry>) {
    loop {
        let (stream, peer, permit) = listener.accept().await;
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let telemetry = telemetry.clone();
                async move { Ok::<_, Infallible>(handle(&req, &telemetry)) }
            });
            if let Err(e) = crate::http::server::http1().serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, "metrics connection: {e}");
            }
        });
    }
}

fn handle(req: &Request<Incoming>, telemetry: &Telemetry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" | "/stats/prometheus" => match telemetry.gather() {
            Ok(text) => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(text)),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", Bytes::from(format!("{e}\n"))),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"endpoints: /metrics /stats/prometheus\n")),
    };
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        res.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    res
}
