//! One request through the proxy: route, fault, destination, balance, retry, respond.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::AtomicU64},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::debug;

use super::{
    actions,
    BoxError, ProxyBody, ServiceTarget, grpc, headers, local_reply,
    pool::{self, SendError},
    replay::{self, ReplayBody},
    retry::{self, Attempt, RetryPolicy},
    router::{self, RequestInfo, Selected},
};
use crate::{
    balance::{ClusterBalancer, Outcome, hash_key},
    config::{Cluster, HashKey, HttpRoute, HttpRouteDestination, Service},
    destination::Destination,
    flags::ResponseFlags,
    listener::ProxyContext,
    telemetry::{HttpExchange, RouteOutcome},
    upstream::Source,
};

pub struct Downstream {
    pub peer: SocketAddr,
    pub target: ServiceTarget,
    /// The calling pod and its identity, fixed for the connection.
    pub source: Source,
}

/// What happened to a request, for the access log and counters.
struct RequestLog {
    flags: ResponseFlags,
    upstream: Option<SocketAddr>,
    attempts: u32,
    /// The upstream cluster the request was routed to, for metric labels.
    destination: Option<Arc<Destination>>,
    /// Request body bytes read from the client, live.
    request_bytes: Option<Arc<AtomicU64>>,
}

pub async fn handle(mut req: Request<Incoming>, conn: Arc<Downstream>, ctx: Arc<ProxyContext>) -> Response<ProxyBody> {
    let start = Instant::now();
    // Before routing: tracing rewrites the trace headers every upstream attempt carries.
    let exchange = ctx.telemetry.http_enabled().then(|| HttpExchange::start(&ctx.telemetry, &mut req, conn.peer));
    // The debug access line's request fields, copied only when that line is on.
    let access = tracing::enabled!(target: "access", tracing::Level::DEBUG).then(|| (req.method().clone(), req.uri().path().to_owned()));
    let mut log = RequestLog { flags: ResponseFlags::NONE, upstream: None, attempts: 0, destination: None, request_bytes: None };
    let response = route_request(req, &conn, &ctx, &mut log).await;
    ctx.stats.http_requests.inc();
    ctx.stats.record_flags(log.flags);
    if let Some((method, path)) = access {
        debug!(
            target: "access",
            peer = %conn.peer,
            %method,
            path,
            status = response.status().as_u16(),
            flags = %log.flags,
            upstream = ?log.upstream,
            cluster = log.destination.as_ref().map_or("", |d| d.name.as_str()),
            attempts = log.attempts,
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
        );
    }
    let Some(exchange) = exchange else { return response };
    let target = log.destination.is_none().then(|| conn.target.clone());
    exchange.finish(response, RouteOutcome { flags: log.flags, upstream: log.upstream, destination: log.destination, target, request_bytes: log.request_bytes })
}

async fn route_request(mut req: Request<Incoming>, conn: &Downstream, ctx: &ProxyContext, log: &mut RequestLog) -> Response<ProxyBody> {
    let cluster = ctx.cluster();
    let Some(svc) = cluster.service(&conn.target.namespace, &conn.target.service) else {
        log.flags.insert(ResponseFlags::NO_ROUTE);
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no cluster\n");
    };
    let upgrade = headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let source = cluster.pod_by_ip(conn.peer.ip());
    // Istio's lookups start from the client's namespace (VirtualService and DestinationRule
    // `exportTo`, a DestinationRule of the client's own namespace first).
    let client_ns = source.map(|p| p.namespace.as_str());
    let virtual_services = cluster.virtual_services_for(svc, client_ns);
    let (route, vs_namespace) = match router::select(&virtual_services, &RequestInfo { parts: &parts, port: conn.target.port, source }) {
        Selected::Route { vs, route } => (Some(route), vs.namespace.as_str()),
        Selected::Default => (None, svc.namespace.as_str()),
        Selected::NoMatch => {
            log.flags.insert(ResponseFlags::NO_ROUTE);
            return local_reply(StatusCode::NOT_FOUND, "no route\n");
        }
    };

    if let Some(redirect) = route.and_then(|r| r.redirect.as_ref()) {
        return actions::redirect_reply(redirect, &parts);
    }
    if let Some(fault) = route.and_then(|r| r.fault.as_ref())
        && let Some(reply) = actions::inject_fault(fault, &mut log.flags).await
    {
        return reply;
    }

    let (dest_svc, port, subset, route_dest) = match pick_route_destination(&cluster, svc, route, vs_namespace, conn.target.port) {
        Some(d) => d,
        None => {
            log.flags.insert(ResponseFlags::NO_ROUTE);
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        }
    };
    let version = if parts.version == Version::HTTP_2 { pool::Version::Http2 } else { pool::Version::Http1 };
    let destination = match ctx.destinations.resolve_parts(&cluster, &dest_svc.namespace, &dest_svc.name, port, subset, client_ns, version == pool::Version::Http2) {
        Ok(d) => d,
        Err(e) => {
            debug!("route: {e}");
            log.flags.insert(ResponseFlags::NO_ROUTE);
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n");
        }
    };
    log.destination = Some(destination.clone());
    if let Some(bucket) = &destination.rate_limit
        && !bucket.try_acquire()
    {
        log.flags.insert(ResponseFlags::RATE_LIMITED);
        return rate_limited_reply(&parts);
    }
    let concurrency_permit = match &destination.concurrency {
        Some(limiter) => match limiter.try_acquire() {
            Some(p) => Some(p),
            None => {
                log.flags.insert(ResponseFlags::CONCURRENCY_LIMITED);
                return local_reply(StatusCode::SERVICE_UNAVAILABLE, "reached concurrency limit");
            }
        },
        None => None,
    };

    if let Some(r) = route {
        if let Some(rewrite) = &r.rewrite {
            actions::apply_rewrite(rewrite, r, &mut parts);
        }
        if let Some(h) = &r.headers {
            headers::apply(&h.request, &mut parts.headers);
        }
    }
    if let Some(h) = route_dest.and_then(|d| d.headers.as_ref()) {
        headers::apply(&h.request, &mut parts.headers);
    }
    headers::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());

    let (hash, set_cookie) = request_hash(&destination, &parts, conn.peer);
    let policy = RetryPolicy::from_route(route.and_then(|r| r.retries.as_ref()));
    let forward = forward(ctx, &destination, &conn.source, &parts, body, version, &policy, hash, upgrade.is_some(), concurrency_permit, log);
    let result = match route.and_then(|r| r.timeout) {
        Some(timeout) => match tokio::time::timeout(timeout, forward).await {
            Ok(r) => r,
            Err(_) => {
                log.flags.insert(ResponseFlags::UPSTREAM_TIMEOUT);
                return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n");
            }
        },
        None => forward.await,
    };
    let mut response = match result {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if let Some(upgrade) = upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        splice_upgrade(upgrade, &mut response);
    } else {
        headers::strip_hop_by_hop(response.headers_mut(), false);
    }
    if let Some(h) = route.and_then(|r| r.headers.as_ref()) {
        headers::apply(&h.response, response.headers_mut());
    }
    if let Some(h) = route_dest.and_then(|d| d.headers.as_ref()) {
        headers::apply(&h.response, response.headers_mut());
    }
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Chooses among a route's weighted destinations. Without a route, the Service itself.
fn pick_route_destination<'a>(
    cluster: &'a Cluster,
    svc: &'a Service,
    route: Option<&'a HttpRoute>,
    vs_namespace: &str,
    port: u16,
) -> Option<(&'a Service, u16, Option<&'a str>, Option<&'a HttpRouteDestination>)> {
    let Some(route) = route else { return Some((svc, port, None, None)) };
    if route.route.is_empty() {
        return None;
    }
    let weights = route.effective_weights();
    let total: u32 = weights.iter().sum();
    let chosen = if total == 0 {
        &route.route[0]
    } else {
        let mut roll = fastrand::u32(0..total);
        let mut chosen = &route.route[0];
        for (d, w) in route.route.iter().zip(&weights) {
            if roll < *w {
                chosen = d;
                break;
            }
            roll -= w;
        }
        chosen
    };
    // The usual route names the Service itself by its short name, from its own namespace:
    // that resolves to `svc` without `service_by_host`'s parsing and allocations. Only a plain
    // lowercase label qualifies, exactly the case where `service_by_host` looks up
    // (vs_namespace, host) and so finds `svc`.
    let host = chosen.destination.host.as_str();
    let is_svc = host == svc.name && vs_namespace == svc.namespace && !host.is_empty() && host.bytes().all(|b| b != b'.' && b != b'*' && !b.is_ascii_uppercase());
    let dest_svc = if is_svc { svc } else { cluster.service_by_host(host, vs_namespace)? };
    // Same Service: keep the port the client used unless the route names one.
    let dest_port = chosen.destination.port.unwrap_or(if std::ptr::eq(dest_svc, svc) {
        port
    } else {
        dest_svc.ports.first().map(|p| p.port)?
    });
    Some((dest_svc, dest_port, chosen.destination.subset.as_deref(), Some(chosen)))
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &ProxyContext,
    destination: &Arc<Destination>,
    source: &Source,
    parts: &http::request::Parts,
    body: Incoming,
    version: pool::Version,
    policy: &RetryPolicy<'_>,
    hash: Option<u64>,
    upgrade: bool,
    concurrency_permit: Option<crate::concurrency::ConcurrencyPermit>,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
    let first = ReplayBody::new(body, replay::DEFAULT_LIMIT);
    log.request_bytes = Some(first.pulled());
    let mut tried: Vec<SocketAddr> = Vec::new();
    let max_attempts = if upgrade { 1 } else { 1 + policy.attempts };
    let mut retry_permit = None;
    let mut last_failure: Option<(Attempt, Response<ProxyBody>)> = None;
    let grpc_request = grpc::is_grpc_request(&parts.headers);
    for attempt in 1..=max_attempts {
        // A fresh body is always replayable; later attempts stop once it outgrew the buffer.
        let Some(body) = first.replay() else { break };
        log.attempts = attempt;
        let pick = match destination.balancer.pick(hash, &tried) {
            Ok(p) => p,
            Err(_) => {
                log.flags.insert(ResponseFlags::NO_HEALTHY_UPSTREAM);
                return Err(local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"));
            }
        };
        let addr = pick.endpoint.addr;
        log.upstream = Some(addr);
        let permit = match destination.limits.acquire_request().await {
            Ok(p) => p,
            Err(_) => {
                log.flags.insert(ResponseFlags::UPSTREAM_OVERFLOW);
                return Err(overflow_reply());
            }
        };
        let request = upstream_request(parts, body, version);
        let sent_at = Instant::now();
        let send = ctx.pool.send(&pick.endpoint, version, source, request, &destination.pool);
        let outcome = match policy.per_try_timeout {
            Some(t) => tokio::time::timeout(t, send).await.unwrap_or(Err(SendError::Timeout)),
            None => send.await,
        };
        let (attempt_kind, failure) = match outcome {
            Ok(response) => {
                let status = response.status().as_u16();
                let rtt = sent_at.elapsed();
                destination.balancer.report_latency(addr, rtt);
                if let Some(limiter) = &destination.concurrency {
                    limiter.sample(rtt);
                }
                let grpc = grpc::status(response.headers());
                let kind = Attempt::Response { status, grpc };
                let retry_left = attempt < max_attempts && first.is_replayable();
                let retry = retry_left && policy.should_retry(kind);
                // Outlier detection sees a gRPC response's grpc-status as the HTTP status Envoy
                // maps it to; a response retried away is judged now, by its headers.
                let judged = grpc::outlier_status_at_headers(grpc_request, status, response.headers(), response.body().is_end_stream());
                let deferred = match judged {
                    Some(s) => {
                        destination.balancer.report(addr, Outcome::HttpStatus(s));
                        None
                    }
                    None if retry => {
                        destination.balancer.report(addr, Outcome::HttpStatus(status));
                        None
                    }
                    None => Some(Box::new(DeferredOutcome { balancer: destination.balancer.clone(), addr, status })),
                };
                if !retry {
                    if attempt > 1 && policy.should_retry(kind) {
                        log.flags.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
                    }
                    let guards = Guards { _active: pick.guard, _request: permit, _retry: retry_permit, _concurrency: concurrency_permit };
                    return Ok(response.map(|b| Guarded { inner: b, outcome: deferred, _guards: guards }.boxed()));
                }
                // Drain nothing: dropping the response resets the stream / closes the h1 conn.
                (kind, None)
            }
            Err(e) if e.is_denied() => {
                debug!(upstream = %addr, "upstream: {e}");
                return Err(local_reply(StatusCode::FORBIDDEN, "RBAC: access denied\n"));
            }
            Err(e) => {
                destination.balancer.report(addr, Outcome::LocalOriginFailure);
                let (kind, flag, reply) = match &e {
                    SendError::Connect(_) | SendError::Handshake(_) => (
                        Attempt::ConnectFailure,
                        ResponseFlags::UPSTREAM_CONNECT_FAILURE,
                        local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n"),
                    ),
                    SendError::Refused(_) => (
                        Attempt::RefusedStream,
                        ResponseFlags::UPSTREAM_RESET,
                        local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: refused stream\n"),
                    ),
                    SendError::Reset(_) => (
                        Attempt::Reset,
                        ResponseFlags::UPSTREAM_RESET,
                        local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: connection termination\n"),
                    ),
                    SendError::Timeout => (Attempt::PerTryTimeout, ResponseFlags::UPSTREAM_TIMEOUT, local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n")),
                };
                debug!(upstream = %addr, attempt, "upstream: {e}");
                log.flags.insert(flag);
                (kind, Some(reply))
            }
        };
        tried.push(addr);
        drop(pick);
        drop(permit);
        let can_retry = attempt < max_attempts && policy.should_retry(attempt_kind) && first.is_replayable();
        if !can_retry {
            if attempt > 1 && policy.should_retry(attempt_kind) {
                log.flags.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
            }
            return Err(failure.unwrap_or_else(|| local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream failure\n")));
        }
        match destination.limits.try_acquire_retry() {
            Ok(p) => retry_permit = Some(p),
            Err(_) => {
                log.flags.insert(ResponseFlags::UPSTREAM_OVERFLOW);
                return Err(failure.unwrap_or_else(overflow_reply));
            }
        }
        ctx.stats.http_retries.inc();
        last_failure = failure.map(|f| (attempt_kind, f));
        tokio::time::sleep(retry::backoff(attempt, fastrand::f64())).await;
    }
    log.flags.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
    Err(last_failure.map(|(_, r)| r).unwrap_or_else(|| local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream failure\n")))
}

/// Envoy's local rate limit answer: 429 `local_rate_limited`, or for gRPC a trailers-only
/// RESOURCE_EXHAUSTED (gRPC clients read grpc-status, not the HTTP status).
fn rate_limited_reply(parts: &http::request::Parts) -> Response<ProxyBody> {
    let grpc = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"));
    if !grpc {
        return local_reply(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
    }
    let mut r = Response::new(http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static("8"));
    h.insert("grpc-message", HeaderValue::from_static("local_rate_limited"));
    r
}

fn overflow_reply() -> Response<ProxyBody> {
    let mut r = local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow\n");
    r.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

fn upstream_request(parts: &http::request::Parts, body: ReplayBody, version: pool::Version) -> Request<ReplayBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = match version {
        pool::Version::Http2 => Version::HTTP_2,
        pool::Version::Http1 => Version::HTTP_11,
    };
    req
}

/// The consistent-hash key of a request, and a cookie to set when the policy generates one.
fn request_hash(destination: &Destination, parts: &http::request::Parts, peer: SocketAddr) -> (Option<u64>, Option<HeaderValue>) {
    let Some(key) = &destination.hash_key else { return (None, None) };
    match key {
        HashKey::HttpHeaderName(name) => (parts.headers.get(name.as_str()).map(|v| hash_key(v.as_bytes())), None),
        HashKey::UseSourceIp => (Some(hash_key(peer.ip().to_string().as_bytes())), None),
        HashKey::HttpQueryParameterName(name) => {
            let value = parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v)));
            (value.map(|v| hash_key(v.as_bytes())), None)
        }
        HashKey::HttpCookie { name, ttl, path } => {
            let existing = parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| c.trim().split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v.to_owned()));
            match (existing, ttl) {
                (Some(v), _) => (Some(hash_key(v.as_bytes())), None),
                // Envoy generates the cookie when a TTL is configured and the client has none.
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    let mut cookie = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs());
                    if let Some(p) = path {
                        cookie.push_str(&format!("; Path={p}"));
                    }
                    cookie.push_str("; HttpOnly");
                    (Some(hash_key(format!("\"{value}\"").as_bytes())), HeaderValue::try_from(cookie).ok())
                }
                (None, None) => (None, None),
            }
        }
    }
}

/// Joins the client's upgraded connection to the upstream's (WebSocket and other HTTP/1.1
/// upgrades pass through as bytes).
fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, response: &mut Response<ProxyBody>) {
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((d, u)) => {
                let mut d = hyper_util::rt::TokioIo::new(d);
                let mut u = hyper_util::rt::TokioIo::new(u);
                let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
            }
            Err(e) => debug!("upgrade: {e}"),
        }
    });
}

/// A response body that keeps its request's bookkeeping (active-request count, pool permits)
/// alive until the body ends or is dropped.
struct Guarded {
    inner: Incoming,
    /// A gRPC response that started without a `grpc-status`: judged by its trailers.
    outcome: Option<Box<DeferredOutcome>>,
    _guards: Guards,
}

/// Outlier detection's verdict on a streamed gRPC response, given once: the status its trailers'
/// `grpc-status` maps to, or (no status in trailers, an error, the client gone) the HTTP status
/// of its headers, what Envoy reports for such a response.
struct DeferredOutcome {
    balancer: Arc<ClusterBalancer>,
    addr: SocketAddr,
    status: u16,
}

impl Drop for DeferredOutcome {
    fn drop(&mut self) {
        self.balancer.report(self.addr, Outcome::HttpStatus(self.status));
    }
}

/// The bookkeeping a response body keeps, released (in this order) when it ends. Plain
/// fields rather than a list of boxed values: no allocation per request.
struct Guards {
    _active: crate::balance::ActiveRequest,
    _request: crate::limits::RequestPermit,
    _retry: Option<crate::limits::RetryPermit>,
    _concurrency: Option<crate::concurrency::ConcurrencyPermit>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.outcome.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(trailers) = frame.trailers_ref()
                        && let Some(mut outcome) = self.outcome.take()
                    {
                        outcome.status = grpc::after_trailers(outcome.status, trailers);
                    }
                }
                // The end, or an error: report now rather than when the body is dropped.
                Poll::Ready(_) => self.outcome = None,
                Poll::Pending => {}
            }
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    fn ret_size<F: FnOnce() -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request's future is moved and copied whole by the runtime (HTTP/2 streams are
    /// tasks of their own), so rare paths that need big futures (connecting: tunnel and TLS
    /// handshakes, ~6.5 KiB) are boxed instead of inlined. It was 10.5 KiB, ~4.3 KiB after.
    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn the_request_future_stays_small() {
        let size = ret_size(|| super::handle(todo!(), todo!(), todo!()));
        assert!(size < 6 * 1024, "the request future takes {size} bytes");
    }
}
