//! HTTP to the node daemon's admin API (and its metrics port), with errors that say which
//! address failed and what to try.
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Admin {
    pub addr: String,
}

/// The daemon could not be reached at all (as opposed to answering with an error).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the mesh node proxy's admin API at {addr}: {reason}\n\
     hint: is mesh-node running on this node? Point meshctl at it with --node HOST:PORT \
     (default 127.0.0.1:15000, loopback only), or run meshctl on the node \
     (kubectl exec) or forward the port first (kubectl port-forward POD 15000:15000)"
)]
pub struct Unreachable {
    pub addr: String,
    pub reason: String,
}

impl Admin {
    /// GET a JSON document; an error status becomes an error carrying the daemon's message.
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = request(&self.addr, Method::GET, path, Bytes::new()).await?;
        parse(&self.addr, path, status, &body)
    }

    pub async fn post(&self, path: &str, body: &str) -> anyhow::Result<Value> {
        let (status, reply) = request(&self.addr, Method::POST, path, Bytes::from(body.to_owned())).await?;
        parse(&self.addr, path, status, &reply)
    }

    /// GET a plain-text endpoint (`/ready`).
    pub async fn get_text(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (status, body) = request(&self.addr, Method::GET, path, Bytes::new()).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn parse(addr: &str, path: &str, status: u16, body: &[u8]) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_slice(body)
        .with_context(|| format!("{addr}{path} answered {status} with something that is not JSON: {}", String::from_utf8_lossy(body).trim()))?;
    if status != 200 {
        let msg = value["error"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
        bail!("{path}: {msg}");
    }
    Ok(value)
}

pub async fn request(addr: &str, method: Method, path: &str, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
    let unreachable = |reason: String| anyhow!(Unreachable { addr: addr.to_owned(), reason });
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))),
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder().method(method).uri(path).header(hyper::header::HOST, addr).body(Full::new(body))?;
        let res = sender.send_request(req).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{addr}{path}: no answer within {}s", REQUEST_TIMEOUT.as_secs()))?
        .with_context(|| format!("talking to {addr}{path}"))
}
