//! Outbound listener: connections captured from this node's pods.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::ProxyContext;
use crate::{
    http::{self, ServiceTarget},
    protocol::{self, Protocol},
    route, tunnel, upstream,
};

pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!("outbound accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move { handle(stream, peer, ctx).await });
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<ProxyContext>) {
    ctx.stats.outbound_accepted.inc();
    let _ = client.set_nodelay(true);
    let Ok(local) = client.local_addr() else { return upstream::reset(client) };
    let Some(orig) = ctx.orig_dst.lookup(peer, local) else {
        ctx.stats.outbound_no_orig_dst.inc();
        warn!(%peer, "outbound: no original destination recorded (connection not captured?)");
        return upstream::reset(client);
    };
    let cluster = ctx.cluster();
    if let Some(svc) = cluster.service_by_vip(orig.ip())
        && let Some(port) = svc.port(orig.port())
    {
        let protocol = match protocol::for_port(port) {
            Protocol::Detect => protocol::sniff(&client, protocol::DETECTION_TIMEOUT).await,
            p => p,
        };
        if protocol == Protocol::Http {
            ctx.stats.outbound_http.inc();
            let target = ServiceTarget { namespace: svc.namespace.clone(), service: svc.name.clone(), port: port.port };
            drop(cluster);
            return http::serve(client, peer, target, ctx).await;
        }
    }
    let route = match route::route(&cluster, orig) {
        Ok(route) => route,
        Err(e) => {
            ctx.stats.outbound_no_route.inc();
            debug!(%peer, "outbound: {e}");
            return upstream::reset(client);
        }
    };
    let Some(endpoint) = ctx.balancer.pick(&route).cloned() else {
        return upstream::reset(client);
    };
    debug!(%peer, %orig, endpoint = %endpoint.addr, pod = %endpoint.pod_name, "outbound");
    let mut client = client;
    if endpoint.node == ctx.node {
        match upstream::connect(endpoint.addr, ctx.connect_timeout).await {
            Ok(mut up) => {
                ctx.stats.outbound_direct.inc();
                let _ = upstream::pipe(&mut client, &mut up).await;
            }
            Err(e) => {
                ctx.stats.outbound_connect_errors.inc();
                debug!(endpoint = %endpoint.addr, "outbound connect: {e}");
                upstream::reset(client);
            }
        }
        return;
    }
    let Some(node) = cluster.node(&endpoint.node) else {
        warn!(node = %endpoint.node, "outbound: endpoint on an unknown node");
        return upstream::reset(client);
    };
    let proxy = SocketAddr::new(node.ip, ctx.inbound_port);
    match tunnel::open(proxy, endpoint.addr, ctx.connect_timeout).await {
        Ok(mut up) => {
            ctx.stats.outbound_tunneled.inc();
            let _ = upstream::pipe(&mut client, &mut up).await;
        }
        Err(e) => {
            ctx.stats.outbound_connect_errors.inc();
            debug!("outbound: {e}");
            upstream::reset(client);
        }
    }
}
