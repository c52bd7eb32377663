//! `meshctl`: node-level debug CLI. Talks to the node daemon's admin endpoint (loopback).
use std::{net::SocketAddr, process::ExitCode};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect the mesh node daemon on this node")]
struct Cli {
    /// The daemon's admin address.
    #[arg(long, default_value = "127.0.0.1:15000", env = "MESH_ADMIN")]
    admin: SocketAddr,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture counters (captured, passed, errors...) and proxy connection counters.
    Stats,
    /// Services, their endpoints, and the pods the capture has enrolled on this node.
    Config,
    /// Upstream clusters: endpoints, outlier ejections, active requests.
    Clusters,
    /// Whether the daemon is ready.
    Ready,
}

async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| anyhow::anyhow!("connecting to the admin endpoint {admin}: {e} (is mesh-node running on this node?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path).header(hyper::header::HOST, admin.to_string()).body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match cli.command {
        Command::Stats => "/stats",
        Command::Config => "/config_dump",
        Command::Ready => "/ready",
        Command::Clusters => "/clusters",
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(get(cli.admin, path)) {
        Ok((status, body)) => {
            print!("{body}");
            if status == 200 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
