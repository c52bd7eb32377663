//! `http-serve --call NAME=URL[,URL...]`: a server that, like the users' BFF, answers a request
//! only after calling each of its downstream services once, all at the same time.
//!
//! The calls are what a real application makes: plain HTTP/1.1 POSTs or gRPC-shaped h2c POSTs
//! (5-byte prefix, 1 KiB message, `grpc-status` trailer) through pooled keep-alive connections
//! (hyper's client pool opens more HTTP/1.1 connections under concurrency, h2 multiplexes).
//! Several URLs for one call are taken in turn: client-side round robin, which is how the
//! benchmarks' "no mesh" mode reaches a Service's pods without a proxy.
//! A call that fails (transport error, non-2xx, non-zero `grpc-status`) makes the answer a 502
//! naming it: the caller sees the whole request fail, as a user would.
use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Method, Request, Uri, header::CONTENT_TYPE};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// Request headers passed on to every call, so a test can script a downstream pod's answers
/// (fail or slow one pod) through the BFF.
const FORWARDED: [&str; 3] = ["x-fail-pods", "x-fail-status", "x-delay-pods"];
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Call {
    name: String,
    grpc: bool,
    uris: Vec<Uri>,
    next: AtomicUsize,
}

impl Call {
    /// `recall=grpc://10.96.7.2:8081` or `rerank=http://10.244.0.5:8080,http://10.244.1.5:8080`.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let (name, urls) = spec.split_once('=').with_context(|| format!("--call {spec:?}: expected NAME=URL[,URL...]"))?;
        let mut grpc = None;
        let mut uris = Vec::new();
        for url in urls.split(',') {
            let (is_grpc, rest) = match url.split_once("://") {
                Some(("grpc", rest)) => (true, rest),
                Some(("http", rest)) => (false, rest),
                _ => bail!("--call {spec:?}: {url:?} is neither grpc://HOST:PORT nor http://HOST:PORT"),
            };
            if grpc.is_some_and(|g| g != is_grpc) {
                bail!("--call {spec:?}: mixes grpc:// and http:// URLs");
            }
            grpc = Some(is_grpc);
            let path = if is_grpc { "/grpc" } else { "/" };
            let uri: Uri = format!("http://{}{path}", rest.trim_end_matches('/')).parse().with_context(|| format!("--call {spec:?}: bad address {rest:?}"))?;
            uris.push(uri);
        }
        Ok(Self { name: name.to_string(), grpc: grpc.unwrap_or(false), uris, next: AtomicUsize::new(0) })
    }
}

pub struct Fanout {
    calls: Vec<Call>,
    h1: Client<HttpConnector, Full<Bytes>>,
    h2: Client<HttpConnector, Full<Bytes>>,
    body: Bytes,
    grpc_body: Bytes,
}

impl Fanout {
    pub fn new(calls: Vec<Call>, body_bytes: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let h1 = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new()).http2_only(true).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        let size = body_bytes.max(1);
        Self { calls, h1, h2, body: Bytes::from(vec![b'x'; size]), grpc_body: super::http_server::grpc_frame(size) }
    }

    /// Calls every downstream once, concurrently; Err names the first call that failed.
    pub async fn call_all(&'static self, headers: &HeaderMap) -> Result<(), String> {
        let mut forwarded = HeaderMap::new();
        for name in FORWARDED {
            if let Some(v) = headers.get(name) {
                forwarded.insert(name, v.clone());
            }
        }
        let tasks: Vec<_> = self
            .calls
            .iter()
            .map(|call| {
                let forwarded = forwarded.clone();
                tokio::spawn(async move { tokio::time::timeout(CALL_TIMEOUT, self.call(call, forwarded)).await.unwrap_or_else(|_| Err("timeout".into())) })
            })
            .collect();
        let mut first_error = None;
        for (task, call) in tasks.into_iter().zip(&self.calls) {
            let outcome = task.await.unwrap_or_else(|e| Err(e.to_string()));
            if let Err(e) = outcome {
                first_error.get_or_insert(format!("call to {} failed: {e}", call.name));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn call(&self, call: &Call, forwarded: HeaderMap) -> Result<(), String> {
        let uri = call.uris[call.next.fetch_add(1, Ordering::Relaxed) % call.uris.len()].clone();
        let mut req = Request::builder().method(Method::POST).uri(uri);
        let (client, body) = if call.grpc {
            req = req.header(CONTENT_TYPE, "application/grpc").header("te", "trailers");
            (&self.h2, self.grpc_body.clone())
        } else {
            req = req.header(CONTENT_TYPE, "application/octet-stream");
            (&self.h1, self.body.clone())
        };
        let mut req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        req.headers_mut().extend(forwarded);
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let header_status = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        if call.grpc {
            let grpc_status = collected.trailers().and_then(|t| t.get("grpc-status").cloned()).or(header_status);
            match grpc_status.as_ref().map(|v| v.as_bytes()) {
                Some(b"0") => {}
                Some(other) => return Err(format!("grpc-status {}", String::from_utf8_lossy(other))),
                None => return Err("no grpc-status".into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Call;

    #[test]
    fn parses_calls() {
        let c = Call::parse("recall=grpc://10.96.7.2:8081").unwrap();
        assert!(c.grpc);
        assert_eq!(c.uris[0].to_string(), "http://10.96.7.2:8081/grpc");
        let c = Call::parse("rerank=http://10.244.0.5:8080,http://10.244.1.5:8080").unwrap();
        assert!(!c.grpc);
        assert_eq!(c.uris.len(), 2);
        assert!(Call::parse("nope").is_err());
        assert!(Call::parse("x=ftp://a:1").is_err());
        assert!(Call::parse("x=grpc://a:1,http://b:2").is_err());
    }
}
