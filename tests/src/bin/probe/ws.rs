//! `mesh-probe ws`: an HTTP/1.1 Upgrade to the server's `/ws`, then raw bytes both ways, checked
//! by hash. Shows that a proxy hands an upgraded connection through as a byte stream.
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Request, StatusCode,
    client::conn::http1,
    header::{CONNECTION, HOST, UPGRADE},
};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::conn::{self, Target};

pub fn run(url: &str, bytes: u64, timeout_ms: u64) -> anyhow::Result<bool> {
    conn::runtime()?.block_on(async {
        match tokio::time::timeout(Duration::from_millis(timeout_ms), exchange(url, bytes)).await {
            Ok(result) => result,
            Err(_) => {
                println!("{}", serde_json::json!({"ok": false, "status": null, "error": "timeout"}));
                Ok(false)
            }
        }
    })
}

async fn exchange(url: &str, bytes: u64) -> anyhow::Result<bool> {
    let target = Target::parse(url).await?;
    let path = if target.path_and_query == "/" { "/ws" } else { target.path_and_query.as_str() };
    let (mut sender, connection) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(target.dial().await?)).await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let req = Request::get(path)
        .header(HOST, &target.authority)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        println!("{}", serde_json::json!({"ok": false, "status": status.as_u16()}));
        return Ok(false);
    }
    let upgraded = hyper::upgrade::on(resp).await.context("upgrade")?;
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));

    let sender = tokio::spawn(async move {
        let mut pattern = crate::Pattern(0x2545_F491_4F6C_DD1D);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        // Half-close: the server echoes until it sees EOF, then closes its side.
        wr.shutdown().await?;
        anyhow::Ok(format!("{:x}", hash.finalize()))
    });
    let mut hash = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n as u64;
    }
    let sent_sha = sender.await.context("sender panicked")??;
    let ok = received == bytes && sent_sha == format!("{:x}", hash.finalize());
    println!("{}", serde_json::json!({"ok": ok, "status": 101, "sent": bytes, "received": received}));
    Ok(ok)
}
