//! Inbound listener: tunnels from other node proxies, HTTP/2 connections whose CONNECT streams
//! each name a pod on this node.
//!
//! With mutual TLS a peer proves it is a node proxy acting for a workload by its certificate.
//! Without a CA (`--insecure-plaintext-tunnels`) the source address is all there is, so only
//! the other nodes' InternalIPs are served: a pod (on this node or another) that dials port
//! 15008 itself is reset before a byte is read, instead of getting a relay to every pod here.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::{
    ProxyContext,
    accept::LogLimiter,
    drain::Phase,
    penalty::{COOL_DOWN, Penalty, THRESHOLD, WINDOW},
};
use crate::{
    authz::{self, Decision, SourceIp},
    config::Cluster,
    identity::Identity,
    l4::{admitted::{Admission, Admitted}, forwarded},
    tunnel, upstream,
};

/// A peer that opens the tunnel port and never finishes the handshake does not hold a task.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS handshakes in progress at once on the tunnel port; more are refused at once.
const MAX_HANDSHAKES: usize = 128;

pub async fn serve(listener: super::accept::Acceptor, ctx: Arc<ProxyContext>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let failures = Arc::new(LogLimiter::default());
    let penalty = Arc::new(Penalty::default());
    loop {
        let (stream, peer, permit) = listener.accept().await;
        if penalty.refuses(peer.ip(), Instant::now()) {
            // Before a task or a TLS session exists: the cheapest no there is.
            ctx.stats.inbound_handshake_penalty.inc();
            upstream::reset(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let open = ctx.drain.track();
        let (handshakes, failures, penalty) = (handshakes.clone(), failures.clone(), penalty.clone());
        tokio::spawn(async move {
            let _open = open;
            let _permit = permit;
            match ctx.connector.tunnels.tls().cloned() {
                Some(tls) => {
                    let Ok(handshake) = handshakes.try_acquire() else {
                        ctx.stats.inbound_handshakes_over_cap.inc();
                        if failures.should_log_kind(peer.ip(), "handshakes over cap") {
                            warn!(%peer, "inbound: {MAX_HANDSHAKES} TLS handshakes in progress: refused (logged once per source per interval)");
                        }
                        return upstream::reset(stream);
                    };
                    let accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream, peer)).await;
                    drop(handshake);
                    match accepted {
                    Err(_) => {
                        ctx.stats.inbound_tls_refused.inc();
                        penalise(&ctx, &penalty, &failures, peer);
                        if failures.should_log_kind(peer.ip(), "handshake timeout") {
                            warn!(%peer, "inbound: TLS handshake not completed within {TLS_HANDSHAKE_TIMEOUT:?} (logged once per source per interval)");
                        }
                    }
                    Ok(Ok((stream, client, requested))) => {
                        let peer = Peer { addr: peer, identity: Some(client), requested: Some(requested) };
                        serve_h2(stream, peer, ctx).await
                    }
                    Ok(Err(e)) => {
                        ctx.stats.inbound_tls_refused.inc();
                        penalise(&ctx, &penalty, &failures, peer);
                        if failures.should_log_kind(peer.ip(), &e.to_string()) {
                            warn!(%peer, "inbound: TLS refused: {e} (logged once per source per interval)");
                        }
                    }
                    }
                }
                None if !is_other_node(&ctx.cluster(), &ctx.node, peer.ip()) => {
                    ctx.stats.inbound_not_a_node.inc();
                    warn!(%peer, "inbound: plaintext tunnel from an address that is no other node's InternalIP: refused");
                    upstream::reset(stream);
                }
                None => serve_h2(stream, Peer { addr: peer, identity: None, requested: None }, ctx).await,
            }
        });
    }
}

/// Counts a failed handshake against its source, unless the source is one of the cluster's
/// nodes (see listener/penalty.rs); says so when that starts a cool-down.
fn penalise(ctx: &ProxyContext, penalty: &Penalty, log: &LogLimiter, peer: SocketAddr) {
    if !is_other_node(&ctx.cluster(), &ctx.node, peer.ip()) && penalty.failed(peer.ip(), Instant::now()) && log.should_log_kind(peer.ip(), "penalty") {
        warn!(%peer, "inbound: over {THRESHOLD} failed TLS handshakes within {WINDOW:?}: connections from this source refused for {COOL_DOWN:?}");
    }
}

/// Whether `ip` is the InternalIP of a node other than `this_node`: the only peers a plaintext
/// tunnel port serves (this node's own proxy never tunnels to itself; its pods are no peers).
pub(crate) fn is_other_node(cluster: &Cluster, this_node: &str, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    cluster.nodes().any(|n| n.name != this_node && n.ip == ip)
}

/// The far end of a tunnel connection: the node proxy's address and, with mutual TLS, the
/// source workload's verified identity and the destination identity it asked for.
#[derive(Clone, Debug)]
struct Peer {
    addr: SocketAddr,
    identity: Option<Identity>,
    requested: Option<Identity>,
}

async fn serve_h2<IO>(io: IO, peer: Peer, ctx: Arc<ProxyContext>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let addr = peer.addr;
    let peer = Arc::new(peer);
    let mut drain = ctx.drain.signal();
    let service = service_fn(move |req| handle(req, peer.clone(), ctx.clone()));
    let conn = crate::http::server::http2()
        .initial_stream_window_size(tunnel::stream_window())
        .initial_connection_window_size(tunnel::connection_window())
        .max_frame_size(tunnel::MAX_FRAME)
        .max_concurrent_streams(tunnel::max_streams())
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.reached(Phase::Draining) => {
            // GOAWAY: the peer opens new tunnel connections (to our successor, which shares the
            // port) for new streams, while the streams already open here keep flowing until
            // they end; the connection completes when the last one does.
            debug!(peer = %addr, "draining: GOAWAY to the peer node proxy");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(peer = %addr, "inbound connection: {e}");
    }
}

/// The caller's address for authorization: the pod the tunnel names when that checks out
/// ([`forwarded::verify`]), else only the peer proxy's address, judged fail-closed. A claim
/// that does not check out is logged and counted: a node proxy speaking for a pod it does not
/// run is either lagging behind the config or lying.
fn source_ip(cluster: &Cluster, peer: &Peer, forwarded: Option<std::net::IpAddr>, ctx: &ProxyContext) -> SourceIp {
    match forwarded::verify(cluster, peer.addr.ip(), peer.identity.as_ref(), forwarded) {
        Ok(ip) => SourceIp::Known(ip),
        // Plaintext tunnels (no CA): nobody can be verified, which is that mode's known
        // weakness, not a peer misbehaving.
        Err(e @ forwarded::Unverified::NoIdentity) => {
            debug!(peer = %peer.addr, "inbound: {e}; source address judged as unknown");
            SourceIp::Unverified { proxy: peer.addr.ip() }
        }
        Err(e) => {
            ctx.stats.inbound_forwarded_unverified.inc();
            warn!(peer = %peer.addr, principal = ?peer.identity.as_ref().map(|i| i.to_string()), claimed = ?forwarded, "inbound: source address not verified, judged as unknown: {e}");
            SourceIp::Unverified { proxy: peer.addr.ip() }
        }
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut res = Response::new(Empty::new());
    *res.status_mut() = code;
    res
}

async fn handle(req: Request<Incoming>, peer: Arc<Peer>, ctx: Arc<ProxyContext>) -> Result<Response<Empty<Bytes>>, Infallible> {
    ctx.stats.inbound_requests.inc();
    if req.method() != Method::CONNECT {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let Some(target) = tunnel::connect_target(req.uri().authority()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let cluster = ctx.cluster();
    // Only pods on this node may be reached through it: the tunnel is not an open relay.
    let Some(pod) = cluster.pod_by_ip(target.ip()).filter(|p| p.node == ctx.node) else {
        ctx.stats.inbound_refused.inc();
        warn!(peer = %peer.addr, %target, "inbound: tunnel target is not a pod on this node");
        return Ok(status(StatusCode::FORBIDDEN));
    };
    // With mutual TLS the client chose the certificate we presented: it must be the target's.
    if let (Some(requested), Some(tls)) = (&peer.requested, ctx.connector.tunnels.tls()) {
        let actual = tls.identity_of(pod);
        if *requested != actual {
            ctx.stats.inbound_refused.inc();
            warn!(peer = %peer.addr, %target, "inbound: tunnel asked for identity {requested} but the target pod is {actual}");
            return Ok(status(StatusCode::FORBIDDEN));
        }
    }
    let forwarded = req.headers().get(tunnel::FORWARDED).and_then(|v| v.to_str().ok()).and_then(tunnel::forwarded_source);
    let source_ip = source_ip(&cluster, &peer, forwarded, &ctx);
    if let Decision::Deny { reason, .. } = authz::check(&cluster, pod, peer.identity.as_ref(), source_ip, target.port()) {
        ctx.stats.inbound_denied.inc();
        warn!(peer = %peer.addr, source = %source_ip, principal = ?peer.identity.as_ref().map(|i| i.to_string()), %target, "authorization: {reason}");
        return Ok(status(StatusCode::FORBIDDEN));
    }
    let upstream = match upstream::connect(target, ctx.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            ctx.stats.inbound_connect_errors.inc();
            debug!(%target, peer = %peer.addr, "inbound connect: {e}");
            return Ok(status(StatusCode::BAD_GATEWAY));
        }
    };
    let admission = Admission { source_id: peer.identity.clone(), source_ip, target };
    let mut upstream = ctx.connector.admitted.register(upstream, admission.clone());
    if let Err(reason) = Admitted::recheck(&cluster, &ctx.cluster(), &admission) {
        ctx.stats.inbound_denied.inc();
        warn!(peer = %peer.addr, source = %source_ip, %target, "authorization (policy changed while connecting): {reason}");
        return Ok(status(StatusCode::FORBIDDEN));
    }
    drop(cluster);
    // Telemetry names the same source authorization judged: the claimed one only if verified.
    let forwarded = match source_ip {
        SourceIp::Known(ip) => Some(ip),
        SourceIp::Unverified { .. } => None,
    };
    let conn = ctx.telemetry.inbound_tcp(&ctx.cluster(), peer.addr, forwarded, peer.identity.as_ref(), target);
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut io = conn.wrap(TokioIo::new(upgraded));
                let _ = upstream::pipe(&mut io, &mut upstream).await;
            }
            Err(e) => debug!(%target, "inbound upgrade: {e}"),
        }
        drop(upstream);
        drop(conn);
    });
    Ok(status(StatusCode::OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 172.30.0.1\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node-b\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 172.30.0.2\n";

    #[test]
    fn only_other_nodes_internal_ips_are_plaintext_peers() {
        let cluster = Cluster::from_yaml_files([("nodes.yaml", NODES)]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_other_node(&cluster, "node-a", ip("172.30.0.2")));
        assert!(is_other_node(&cluster, "node-a", ip("::ffff:172.30.0.2")), "IPv4-mapped from a dual-stack listener");
        assert!(!is_other_node(&cluster, "node-a", ip("172.30.0.1")), "this node's own address");
        assert!(!is_other_node(&cluster, "node-a", ip("10.244.0.10")), "a pod");
        assert!(!is_other_node(&cluster, "node-a", ip("172.30.0.254")), "an address on the node network that is no node");
    }
}
