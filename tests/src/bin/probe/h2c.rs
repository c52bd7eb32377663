//! `h2c-connect`: an HBONE stream without TLS (HTTP/2 with prior knowledge, CONNECT to a pod
//! address), as a node proxy running without a CA sends it to another node's port 15008. Lets
//! a test try the inbound port from places that are not node proxies.
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct H2cConnectArgs {
    /// host:port of a node proxy's inbound port (15008).
    #[arg(long)]
    pub addr: String,
    /// The CONNECT authority: the pod address (ip:port) to reach through that proxy.
    #[arg(long)]
    pub connect: String,
    /// With a 200: send this line and report what the pod answers (e.g. `WHO`).
    #[arg(long)]
    pub send: Option<String>,
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// One HBONE stream over `io` (plaintext here, TLS for `tls-connect`): HTTP/2 CONNECT to
/// `authority`, optionally with a `Forwarded` header; its status and, with `send` and a 200,
/// the pod's one-line answer to that line.
pub async fn connect_over<IO>(io: IO, authority: &str, forwarded: Option<&str>, send: Option<&str>) -> anyhow::Result<(u16, Option<String>)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder().method(Method::CONNECT).uri(authority);
    if let Some(forwarded) = forwarded {
        req = req.header("forwarded", forwarded);
    }
    let mut resp = sender.send_request(req.body(Empty::<Bytes>::new())?).await?;
    let status = resp.status().as_u16();
    let Some(line) = send.filter(|_| status == 200) else { return Ok((status, None)) };
    let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await?);
    io.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.ends_with(b"\n") && answer.len() <= 4096 {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    if answer.is_empty() {
        bail!("the tunnel closed without an answer");
    }
    Ok((status, Some(String::from_utf8_lossy(&answer).trim().to_string())))
}

/// Puts a CONNECT's outcome into a report: `connect_status` (and `answer`) or `connect_error`.
pub fn record(report: &mut serde_json::Value, outcome: Result<anyhow::Result<(u16, Option<String>)>, tokio::time::error::Elapsed>) {
    match outcome {
        Ok(Ok((status, answer))) => {
            report["connect_status"] = status.into();
            if let Some(answer) = answer {
                report["answer"] = answer.into();
            }
        }
        Ok(Err(e)) => report["connect_error"] = format!("{e:#}").into(),
        Err(_) => report["connect_error"] = "timed out".into(),
    }
}

async fn tunnel(args: &H2cConnectArgs) -> anyhow::Result<(u16, Option<String>)> {
    let tcp = TcpStream::connect(&args.addr).await?;
    tcp.set_nodelay(true)?;
    connect_over(tcp, &args.connect, None, args.send.as_deref()).await
}

pub fn run(args: H2cConnectArgs) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut report = serde_json::json!({"addr": args.addr, "connect": args.connect});
    record(&mut report, rt.block_on(async { tokio::time::timeout(timeout, tunnel(&args)).await }));
    println!("{report}");
    Ok(true)
}
