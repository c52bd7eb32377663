//! Outbound listener: connections captured from this node's pods.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::ProxyContext;
use crate::{
    balance::{Outcome, hash_key},
    config::Endpoint,
    flags::ResponseFlags,
    http::{self, ServiceTarget},
    l4::gather::{Gather, Mode},
    telemetry::TcpRoute,
    protocol::{self, Wire},
    route::{self, TcpTarget},
    upstream::{self, Source, UpstreamIo},
};

pub async fn serve(listener: super::accept::Acceptor, ctx: Arc<ProxyContext>) {
    loop {
        let (stream, peer, permit) = listener.accept().await;
        let ctx = ctx.clone();
        // Counted until the connection ends: a stopping proxy waits for it (or its drain timeout).
        let open = ctx.drain.track();
        tokio::spawn(async move {
            handle(stream, peer, ctx).await;
            drop(open);
            drop(permit);
        });
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>) {
    ctx.stats.outbound_accepted.inc();
    // Held until the connection is done: its queue is bounded while it is in the fast path.
    let _watch = ctx.fast_path.as_ref().and_then(|bp| bp.watch(&client));
    let _ = client.set_nodelay(true);
    let Ok(local) = client.local_addr() else { return upstream::reset(client) };
    let Some(orig) = ctx.orig_dst.lookup(peer, local) else {
        ctx.stats.outbound_no_orig_dst.inc();
        warn!(%peer, "outbound: no original destination recorded (connection not captured?)");
        return upstream::reset(client);
    };
    let cluster = ctx.cluster();
    let caller = Source::of(&cluster, peer.ip(), &ctx.connector.trust_domain);
    if let Some(svc) = cluster.service_by_vip(orig.ip())
        && let Some(port) = svc.port(orig.port())
    {
        let wire = protocol::wire(&client, protocol::for_port(port), protocol::DETECTION_TIMEOUT).await;
        if wire != Wire::Tcp {
            ctx.stats.outbound_http.inc();
            let target = ServiceTarget { namespace: svc.namespace.clone(), service: svc.name.clone(), port: port.port };
            drop(cluster);
            // HTTP/2 answers leave in pieces (headers and data, trailers a moment later): gathered
            // into one write to the client. HTTP/1.1 answers already leave in one.
            let client = Gather::new(client, if wire == Wire::Http2 { Mode::Hold } else { Mode::Off });
            return http::serve(client, peer, caller, target, ctx).await;
        }
    }
    let source = cluster.pod_by_ip(peer.ip());
    let target = match route::route(&cluster, orig, source) {
        Ok(target) => target,
        Err(e) => {
            ctx.stats.outbound_no_route.inc();
            debug!(%peer, "outbound: {e}");
            return upstream::reset(client);
        }
    };
    match target {
        TcpTarget::Pod(endpoint) => {
            let timeout = ctx.connect_timeout;
            drop(cluster);
            let route = TcpRoute { service: None, upstream: endpoint.addr, cluster: None };
            connect_and_pipe(client, peer, &endpoint, &caller, timeout, &ctx, route).await;
        }
        TcpTarget::Cluster(key) => {
            let destination = match ctx.destinations.resolve(&cluster, &key, source.map(|p| p.namespace.as_str()), false) {
                Ok(d) => d,
                Err(e) => {
                    ctx.stats.outbound_no_route.inc();
                    debug!(%peer, "outbound: {e}");
                    return upstream::reset(client);
                }
            };
            drop(cluster);
            // connectionPool.tcp.maxConnections, as Envoy's circuit breaker.
            let Ok(_permit) = destination.limits.try_acquire_connection() else {
                ctx.stats.flag_uo.inc();
                return upstream::reset(client);
            };
            let hash = hash_key(peer.ip().to_string().as_bytes());
            let pick = match destination.balancer.pick(Some(hash), &[]) {
                Ok(p) => p,
                Err(e) => {
                    ctx.stats.flag_uh.inc();
                    debug!(%peer, cluster = %destination.name, "outbound: {e}");
                    return upstream::reset(client);
                }
            };
            debug!(%peer, %orig, endpoint = %pick.endpoint.addr, pod = %pick.endpoint.pod_name, "outbound tcp");
            let route = TcpRoute { service: Some((&key.namespace, &key.service)), upstream: pick.endpoint.addr, cluster: Some(destination.name.clone()) };
            let ok = connect_and_pipe(client, peer, &pick.endpoint, &caller, destination.pool.connect_timeout, &ctx, route).await;
            let outcome = if ok { Outcome::Success } else { Outcome::LocalOriginFailure };
            destination.balancer.report(pick.endpoint.addr, outcome);
        }
    }
}

/// Connects to an endpoint (directly, or through its node's proxy) and copies bytes until both
/// sides are done. Returns whether the upstream connection was established.
async fn connect_and_pipe(client: TcpStream, peer: SocketAddr, endpoint: &Endpoint, caller: &Source, timeout: Duration, ctx: &ProxyContext, route: TcpRoute<'_>) -> bool {
    match ctx.connector.connect(endpoint, caller, timeout).await {
        Ok(mut up) => {
            if matches!(up, UpstreamIo::Direct(_) | UpstreamIo::Pod(_)) {
                ctx.stats.outbound_direct.inc();
            } else {
                ctx.stats.outbound_tunneled.inc();
            }
            let conn = ctx.telemetry.outbound_tcp(&ctx.cluster(), peer, route, ResponseFlags::NONE);
            let mut client = conn.wrap(client);
            let _ = upstream::pipe(&mut client, &mut up).await;
            true
        }
        Err(e) => {
            ctx.stats.outbound_connect_errors.inc();
            ctx.stats.flag_uf.inc();
            debug!(endpoint = %endpoint.addr, "outbound connect: {e}");
            // Opened and closed at once, flagged, as Envoy's TCP proxy reports a failed connect.
            drop(ctx.telemetry.outbound_tcp(&ctx.cluster(), peer, route, ResponseFlags::UPSTREAM_CONNECT_FAILURE));
            upstream::reset(client);
            false
        }
    }
}
