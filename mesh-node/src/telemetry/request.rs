//! One HTTP request's telemetry: started when the request arrives (trace context), finished
//! when its response body ends, which is when Istio's proxies count it (duration, sizes and
//! gRPC status from trailers are only known then).
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};

use super::{
    Telemetry,
    access_log::{AccessEntry, rfc3339},
    metrics::{CachedPeering, Reporter, RequestOutcome, Security},
    propagation::hex,
    trace::{ActiveSpan, AttrValue, FinishedSpan},
    workload::{ServiceLabels, Workload},
};
use crate::{
    destination::Destination,
    flags::ResponseFlags,
    http::{ProxyBody, ServiceTarget},
};

/// What the access log and span need from the request, copied only when they are on.
struct RequestDetails {
    /// Wall clock start, for the access log (a clock read spared when it is off).
    start_wall: SystemTime,
    method: http::Method,
    path: String,
    authority: Option<String>,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
}

/// A request in flight.
pub struct HttpExchange {
    telemetry: Arc<Telemetry>,
    start: Instant,
    peer: SocketAddr,
    version: Version,
    grpc: bool,
    details: Option<RequestDetails>,
    span: Option<ActiveSpan>,
}

/// Where the proxy sent the request, as the router decided.
pub struct RouteOutcome {
    pub flags: ResponseFlags,
    pub upstream: Option<SocketAddr>,
    /// The upstream cluster the request was routed to; `None` when routing failed.
    pub destination: Option<Arc<Destination>>,
    /// The Service the client addressed, labelled when there is no `destination`.
    pub target: Option<ServiceTarget>,
    pub request_bytes: Option<Arc<AtomicU64>>,
}

impl RouteOutcome {
    /// The upstream cluster's (Envoy) name; empty when routing failed. Read from the
    /// destination rather than copied into each request.
    fn cluster(&self) -> &str {
        self.destination.as_ref().map_or("", |d| d.name.as_str())
    }

    /// (namespace, name, port) of the Service the request is labelled with.
    fn service(&self) -> (&str, &str, u16) {
        match (&self.destination, &self.target) {
            (Some(d), _) => (&d.key.namespace, &d.key.service, d.key.port),
            (None, Some(t)) => (&t.namespace, &t.service, t.port),
            (None, None) => (super::workload::UNKNOWN, super::workload::UNKNOWN, 0),
        }
    }
}

fn header_str(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl HttpExchange {
    /// Starts a request's telemetry; rewrites its trace headers when tracing is on.
    pub fn start<B>(telemetry: &Arc<Telemetry>, req: &mut Request<B>, peer: SocketAddr) -> Self {
        let span = telemetry.tracer.as_ref().and_then(|t| t.start(req.headers_mut()));
        let details = (telemetry.access_log.enabled() || span.is_some()).then(|| RequestDetails {
            start_wall: SystemTime::now(),
            method: req.method().clone(),
            path: req.uri().path_and_query().map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
            authority: req.uri().authority().map(|a| a.to_string()).or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            request_id: req.headers().get("x-request-id").cloned(),
        });
        let grpc = req.headers().get(http::header::CONTENT_TYPE).is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
        Self { telemetry: telemetry.clone(), start: Instant::now(), peer, version: req.version(), grpc, details, span }
    }

    /// Wraps the response so the request is recorded when its body ends (or is dropped).
    pub fn finish(self, response: Response<ProxyBody>, route: RouteOutcome) -> Response<ProxyBody> {
        let cluster = self.telemetry.cluster();
        let peers = self.telemetry.workloads.get(&cluster);
        let source = peers.workload(self.peer.ip()).clone();
        let destination = route.upstream.and_then(|a| peers.find(a.ip())).unwrap_or_else(|| peers.unknown()).clone();
        let (namespace, name, _) = route.service();
        let service = peers.service(namespace, name).clone();
        drop(cluster);
        let grpc_status = grpc_status(response.headers());
        let pending = Pending { exchange: self, status: response.status().as_u16(), source, destination, service, route, grpc_status };
        response.map(|inner| Recorded { inner, pending: Some(pending), response_bytes: 0 }.boxed())
    }
}

/// `grpc-status` as a metric label: gRPC's codes are 0-16, written as decimal digits; any
/// other value (an upstream writing text, or a unique string per response) becomes
/// "unknown", so the label cannot grow the series count without bound. Kept as the header value
/// (a shared buffer, no copy) when it is a code.
fn grpc_status(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get("grpc-status")?;
    let code = v.to_str().ok().filter(|s| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit())).and_then(|s| s.parse::<u8>().ok());
    match code {
        Some(c) if c <= 16 => Some(v.clone()),
        _ => Some(HeaderValue::from_static("unknown")),
    }
}

/// Everything known when the response headers go out; completed by the body's end.
struct Pending {
    exchange: HttpExchange,
    status: u16,
    source: Arc<Workload>,
    destination: Arc<Workload>,
    service: Arc<ServiceLabels>,
    route: RouteOutcome,
    grpc_status: Option<HeaderValue>,
}

impl Pending {
    fn record(mut self, response_bytes: u64, completed: bool) {
        if !completed {
            self.route.flags.insert(ResponseFlags::DOWNSTREAM_DISCONNECT);
        }
        let x = &self.exchange;
        let t = &x.telemetry;
        let duration = x.start.elapsed();
        let request_bytes = self.route.request_bytes.as_ref().map_or(0, |b| b.load(Ordering::Relaxed));
        // Allocation-free for the common case: no flags, a standard status code.
        let flags: std::borrow::Cow<str> = if self.route.flags.is_empty() { "-".into() } else { self.route.flags.to_string().into() };
        let status = http::StatusCode::from_u16(self.status).ok();
        let code: std::borrow::Cow<str> = status.as_ref().map_or_else(|| self.status.to_string().into(), |s| s.as_str().into());
        let security = Security::toward(&self.destination, &t.node, t.mtls);
        if let Some(metrics) = &t.metrics {
            let outcome = RequestOutcome {
                protocol: if x.grpc { "grpc" } else { "http" },
                code: &code,
                grpc_status: header_str(&self.grpc_status).unwrap_or(""),
                flags: &flags,
                duration_ms: duration.as_secs_f64() * 1e3,
                request_bytes,
                response_bytes,
            };
            let mut peering = CachedPeering { reporter: Reporter::Source, source: &self.source, destination: &self.destination, service: &self.service, security };
            metrics.record_request_cached(&peering, &outcome);
            // Same node: no other proxy sees this request, so this one reports both sides.
            if self.destination.in_mesh && self.destination.node == t.node {
                peering.reporter = Reporter::Destination;
                metrics.record_request_cached(&peering, &outcome);
            }
        }
        let trace_id = x.span.as_ref().map(|s| hex(&s.context.trace_id));
        if t.access_log.enabled()
            && let Some(d) = &x.details
        {
            t.access_log.write(&AccessEntry {
                start_time: rfc3339(d.start_wall),
                method: Some(d.method.as_str()),
                path: Some(&d.path),
                protocol: protocol_name(x.version),
                response_code: self.status,
                response_flags: &flags,
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
                duration: duration.as_millis() as u64,
                user_agent: header_str(&d.user_agent),
                request_id: header_str(&d.request_id),
                authority: d.authority.as_deref(),
                upstream_host: self.route.upstream.map(|u| u.to_string()),
                upstream_cluster: Some(self.route.cluster()).filter(|c| !c.is_empty()),
                downstream_remote_address: x.peer.to_string(),
                source_workload: format!("{}/{}", self.source.namespace, self.source.name),
                source_principal: &self.source.principal,
                destination_workload: format!("{}/{}", self.destination.namespace, self.destination.name),
                destination_principal: &self.destination.principal,
                reporter: "source",
                trace_id: trace_id.clone(),
            });
        }
        if let (Some(tracer), Some(span), Some(d)) = (&t.tracer, &x.span, &x.details) {
            let mut attributes = vec![
                ("http.method", AttrValue::Str(d.method.to_string())),
                ("http.url", AttrValue::Str(format!("http://{}{}", d.authority.as_deref().unwrap_or(&self.service.fqdn), d.path))),
                ("http.protocol", AttrValue::Str(protocol_name(x.version).into())),
                ("http.status_code", AttrValue::Int(self.status.into())),
                ("response_flags", AttrValue::Str(flags.to_string())),
                ("upstream_cluster", AttrValue::Str(self.route.cluster().to_owned())),
                ("upstream_cluster.name", AttrValue::Str(self.route.cluster().to_owned())),
                ("peer.address", AttrValue::Str(x.peer.ip().to_string())),
                ("request_size", AttrValue::Int(request_bytes as i64)),
                ("response_size", AttrValue::Int(response_bytes as i64)),
                ("istio.canonical_service", AttrValue::Str(self.source.app.clone())),
                ("istio.namespace", AttrValue::Str(self.source.namespace.clone())),
                ("node_id", AttrValue::Str(t.node.clone())),
                ("component", AttrValue::Str("proxy".into())),
            ];
            if let Some(u) = self.route.upstream {
                attributes.push(("upstream_address", AttrValue::Str(u.to_string())));
            }
            if let Some(id) = header_str(&d.request_id) {
                attributes.push(("guid:x-request-id", AttrValue::Str(id.to_string())));
            }
            if let Some(ua) = header_str(&d.user_agent) {
                attributes.push(("user_agent", AttrValue::Str(ua.to_string())));
            }
            tracer.finish(FinishedSpan {
                trace_id: span.context.trace_id,
                span_id: span.context.span_id,
                parent_span_id: span.parent,
                name: format!("{}:{}/*", self.service.fqdn, self.route.service().2),
                service: format!("{}.{}", self.source.app, self.source.namespace),
                start: span.start,
                end: SystemTime::now(),
                attributes,
                error: self.status >= 500,
            });
        }
    }
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The response body, counting its bytes and catching `grpc-status` trailers; records the
/// request once, at its end or when dropped early.
struct Recorded {
    inner: ProxyBody,
    pending: Option<Pending>,
    response_bytes: u64,
}

impl Recorded {
    fn done(&mut self, completed: bool) {
        if let Some(p) = self.pending.take() {
            p.record(self.response_bytes, completed);
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.response_bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(p) = this.pending.as_mut()
                    && let Some(status) = grpc_status(trailers)
                {
                    p.grpc_status = Some(status);
                }
            }
            Poll::Ready(None) => this.done(true),
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.as_mut() {
                    p.route.flags.insert(ResponseFlags::UPSTREAM_RESET);
                }
                this.done(true);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let completed = self.inner.is_end_stream();
        self.done(completed);
    }
}

#[cfg(test)]
mod grpc_status_label {
    use super::*;

    #[test]
    fn only_grpc_codes_become_label_values() {
        let label = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static(v));
            grpc_status(&h).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(label("0").as_deref(), Some("0"));
        assert_eq!(label("16").as_deref(), Some("16"));
        assert_eq!(label("17").as_deref(), Some("unknown"));
        assert_eq!(label("007").as_deref(), Some("unknown"));
        assert_eq!(label("internal error #4711").as_deref(), Some("unknown"));
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }
}
