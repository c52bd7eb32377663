//! `VirtualService`: the validated model and its checks.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::common::{self, Destination, INT32_MAX, StringMatch};
use super::raw;
use super::unsupported::{self, NOT_SUPPORTED};
use crate::config::error::Reporter;
use crate::config::field_path::FieldPath;

#[derive(Debug, Clone, PartialEq)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// As written; short names are relative to `namespace`.
    pub hosts: Vec<String>,
    /// Empty means the `mesh` gateway only (Istio's default).
    pub gateways: Vec<String>,
    pub export_to: Vec<String>,
    /// Evaluated in order; the first route whose match succeeds wins.
    pub http: Vec<HttpRoute>,
    /// `tls` routes are not supported.
    pub tcp: Vec<TcpRoute>,
    /// `metadata.creationTimestamp` (seconds since the epoch): of two VirtualServices for one
    /// host, the older wins (Istio). `None` (no timestamp, as in hand-written files) is oldest.
    pub created: Option<i64>,
}

impl VirtualService {
    /// Whether the rule applies to mesh traffic (as opposed to ingress gateways only).
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }

    /// Every destination the rule can send traffic to, with its field path
    /// (relative to `spec`), for cross-object checks and debugging.
    pub fn destinations(&self) -> Vec<(FieldPath, &Destination)> {
        let root = FieldPath::root();
        let mut out = Vec::new();
        for (i, h) in self.http.iter().enumerate() {
            let p = root.key("http").index(i);
            for (j, d) in h.route.iter().enumerate() {
                out.push((p.key("route").index(j).key("destination"), &d.destination));
            }
        }
        for (i, t) in self.tcp.iter().enumerate() {
            let p = root.key("tcp").index(i);
            for (j, d) in t.route.iter().enumerate() {
                out.push((p.key("route").index(j).key("destination"), &d.destination));
            }
        }
        out
    }
}

/// Not supported (rejected by validation): `mirror`, `mirrors`,
/// `mirrorPercentage`, `mirrorPercent`, `corsPolicy`, `delegate`, `directResponse`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Empty matches everything. Entries are ORed; fields inside one are ANDed.
    pub matches: Vec<HttpMatch>,
    /// Empty exactly when `redirect` is set.
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub rewrite: Option<HttpRewrite>,
    /// `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    /// `None`: Istio's default policy, see [`HttpRetry::istio_default`].
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// The weights to split traffic by, one per `route` entry: as written when
    /// any is set (missing = 0), otherwise an even split. Sums to 100.
    pub fn effective_weights(&self) -> Vec<u32> {
        effective_weights(self.route.iter().map(|r| r.weight))
    }
}

/// See [`HttpRoute::effective_weights`].
pub fn effective_weights(weights: impl Iterator<Item = Option<u32>>) -> Vec<u32> {
    let weights: Vec<Option<u32>> = weights.collect();
    if weights.iter().any(Option::is_some) {
        return weights.iter().map(|w| w.unwrap_or(0)).collect();
    }
    let n = u32::try_from(weights.len()).unwrap_or(u32::MAX).max(1);
    (0..weights.len())
        .map(|i| 100 / n + u32::from(i == 0) * (100 % n))
        .collect()
}

/// `statPrefix` is not supported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
    pub ignore_uri_case: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// 0..=100 as written; use [`HttpRoute::effective_weights`] to split.
    pub weight: Option<u32>,
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pub request: HeaderOperations,
    pub response: HeaderOperations,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    /// 301 unless set; one of 301, 302, 303, 307, 308.
    pub redirect_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRetry {
    /// 0 disables retries.
    pub attempts: u32,
    /// `None`: the route timeout bounds each try.
    pub per_try_timeout: Option<Duration>,
    /// Empty: Istio's default conditions, see [`HttpRetry::istio_default`].
    pub retry_on: Vec<RetryOn>,
    /// Always `false`: `true` is not supported.
    pub retry_remote_localities: bool,
}

impl HttpRetry {
    /// What Istio applies when a route has no `retries` block.
    pub fn istio_default() -> Self {
        HttpRetry {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
                // Istio's `RetriableStatusCodes: [503]`, what `retriable-status-codes` retries.
                RetryOn::Status(503),
            ],
            retry_remote_localities: false,
        }
    }
}

/// One `retryOn` condition (Envoy's HTTP and gRPC sets, or an HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    FiveXx,
    GatewayError,
    Reset,
    ConnectFailure,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    EnvoyRatelimited,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
    Status(u16),
}

/// Known conditions the proxy does not implement; a `retryOn` naming one is rejected.
const RETRY_ON_UNSUPPORTED: &[RetryOn] = &[RetryOn::RetriableHeaders, RetryOn::EnvoyRatelimited];

const RETRY_ON_NAMES: &[(&str, RetryOn)] = &[
    ("5xx", RetryOn::FiveXx),
    ("gateway-error", RetryOn::GatewayError),
    ("reset", RetryOn::Reset),
    ("connect-failure", RetryOn::ConnectFailure),
    ("retriable-4xx", RetryOn::Retriable4xx),
    ("refused-stream", RetryOn::RefusedStream),
    ("retriable-status-codes", RetryOn::RetriableStatusCodes),
    ("retriable-headers", RetryOn::RetriableHeaders),
    ("envoy-ratelimited", RetryOn::EnvoyRatelimited),
    ("cancelled", RetryOn::Cancelled),
    ("deadline-exceeded", RetryOn::DeadlineExceeded),
    ("internal", RetryOn::Internal),
    ("resource-exhausted", RetryOn::ResourceExhausted),
    ("unavailable", RetryOn::Unavailable),
];

impl RetryOn {
    pub fn parse(item: &str) -> Option<RetryOn> {
        if let Some((_, v)) = RETRY_ON_NAMES.iter().find(|(n, _)| *n == item) {
            return Some(*v);
        }
        item.parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
            .map(RetryOn::Status)
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let RetryOn::Status(code) = self {
            return write!(f, "{code}");
        }
        let name = RETRY_ON_NAMES
            .iter()
            .find(|(_, v)| v == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    /// Percent of requests delayed (`percentage`, or the deprecated `percent`); 0 when not set,
    /// as in Istio.
    pub percentage: f64,
    pub fixed_delay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    /// Percent of requests aborted; 0 when not set, as in Istio.
    pub percentage: f64,
    pub status: AbortStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortStatus {
    Http(u16),
    /// gRPC status code (e.g. 14 for UNAVAILABLE).
    Grpc(u8),
}

const GRPC_CODES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Debug, Clone, PartialEq)]
pub struct TcpRoute {
    pub matches: Vec<L4Match>,
    pub route: Vec<RouteDestination>,
}

/// `destinationSubnets`, and `gateways` without `mesh`, are not supported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L4Match {
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

pub(crate) fn convert(
    spec: &raw::VirtualServiceSpec,
    namespace: &str,
    name: &str,
    r: &mut Reporter<'_>,
) -> VirtualService {
    unsupported::virtual_service(r, spec);
    let root = FieldPath::root();
    let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    if !mesh_bound {
        // Istio: a VirtualService bound only to (ingress/egress) gateways does not apply to
        // mesh traffic, and mesh traffic is all this proxy serves.
        r.warn(
            &root.key("gateways"),
            format!(
                "bound only to gateway(s) {} (not \"mesh\"): not applied by mesh, which routes mesh traffic only (add \"mesh\" to apply it to mesh traffic too)",
                spec.gateways.join(", ")
            ),
        );
    }
    if spec.hosts.is_empty() {
        r.at(&root.key("hosts"), "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        if host.trim().is_empty() {
            r.at(&root.key("hosts").index(i), "must not be empty");
        } else if host == "*" && mesh_bound {
            r.at(
                &root.key("hosts").index(i),
                "wildcard host * is not allowed for the mesh gateway",
            );
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        r.at(&root, "at least one of http or tcp is required");
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .map(|(i, h)| http_route(r, &root.key("http").index(i), h))
        .collect();
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let path = root.key("tcp").index(i);
            TcpRoute {
                matches: t
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| l4_match(r, &path.key("match").index(j), m))
                    .collect(),
                route: l4_routes(r, &path.key("route"), &t.route),
            }
        })
        .collect();
    VirtualService {
        namespace: namespace.to_string(),
        name: name.to_string(),
        hosts: spec.hosts.clone(),
        gateways: spec.gateways.clone(),
        export_to: common::export_to(r, &root.key("exportTo"), &spec.export_to),
        http,
        tcp,
        created: None,
    }
}

fn http_route(r: &mut Reporter<'_>, path: &FieldPath, h: &raw::HttpRoute) -> HttpRoute {
    // `delegate` and `directResponse` stand in for a route; `unsupported` reports them.
    let replaced = h.delegate.is_some() || h.direct_response.is_some();
    match (h.route.is_empty(), &h.redirect) {
        (true, None) if !replaced => {
            r.at(&path.key("route"), "one of route or redirect is required");
        }
        (false, Some(_)) => r.at(&path.key("redirect"), "may not be combined with route"),
        _ => {}
    }
    if h.redirect.is_some() && h.rewrite.is_some() {
        r.at(&path.key("rewrite"), "may not be combined with redirect");
    }
    let matches = h
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| http_match(r, &path.key("match").index(i), m))
        .collect();
    let route_path = path.key("route");
    let route: Vec<HttpRouteDestination> = h
        .route
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = route_path.index(i);
            HttpRouteDestination {
                destination: common::destination(r, &p.key("destination"), &d.destination),
                weight: common::int_in(r, &p.key("weight"), d.weight, 0, 100),
                headers: d
                    .headers
                    .as_ref()
                    .map(|hd| headers(r, &p.key("headers"), hd)),
            }
        })
        .collect();
    check_weight_sum(
        r,
        &route_path,
        &h.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    );
    HttpRoute {
        name: h.name.clone(),
        matches,
        route,
        redirect: h
            .redirect
            .as_ref()
            .map(|rd| redirect(r, &path.key("redirect"), rd)),
        rewrite: h.rewrite.as_ref().map(|rw| HttpRewrite {
            uri: rw.uri.clone(),
            authority: rw.authority.clone(),
        }),
        timeout: common::duration(r, &path.key("timeout"), h.timeout.as_ref()),
        retries: h
            .retries
            .as_ref()
            .map(|rt| retries(r, &path.key("retries"), rt)),
        fault: h
            .fault
            .as_ref()
            .and_then(|f| fault(r, &path.key("fault"), f)),
        headers: h
            .headers
            .as_ref()
            .map(|hd| headers(r, &path.key("headers"), hd)),
    }
}

/// Istio: with more than one destination, explicit weights must add up to 100.
fn check_weight_sum(r: &mut Reporter<'_>, route_path: &FieldPath, weights: &[Option<i64>]) {
    if weights.len() > 1 && weights.iter().any(Option::is_some) {
        let total: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
        if total != 100 {
            r.at(route_path, format!("weights add up to {total}, not 100"));
        }
    }
}

fn http_match(r: &mut Reporter<'_>, path: &FieldPath, m: &raw::HttpMatch) -> HttpMatch {
    let mut single = |field: &str, sm: &Option<raw::StringMatch>| {
        sm.as_ref()
            .and_then(|sm| common::string_match(r, &path.key(field), sm, false))
    };
    let uri = single("uri", &m.uri);
    let scheme = single("scheme", &m.scheme);
    let method = single("method", &m.method);
    let authority = single("authority", &m.authority);
    let mut map = |field: &str, entries: &BTreeMap<String, raw::StringMatch>| {
        let mut out = BTreeMap::new();
        for (name, sm) in entries {
            let p = path.key(field).key(name.clone());
            if name.is_empty() {
                r.at(&p, "name must not be empty");
            }
            if let Some(sm) = common::string_match(r, &p, sm, true) {
                out.insert(name.clone(), sm);
            }
        }
        out
    };
    let headers = map("headers", &m.headers);
    let without_headers = map("withoutHeaders", &m.without_headers);
    let query_params = map("queryParams", &m.query_params);
    HttpMatch {
        name: m.name.clone(),
        uri,
        scheme,
        method,
        authority,
        headers,
        without_headers,
        query_params,
        port: m.port.and_then(|p| common::port(r, &path.key("port"), p)),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        gateways: m.gateways.clone(),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
    }
}

fn headers(r: &mut Reporter<'_>, path: &FieldPath, h: &raw::Headers) -> Headers {
    let mut ops = |field: &str, o: &Option<raw::HeaderOperations>| {
        let Some(o) = o else {
            return HeaderOperations::default();
        };
        for (i, name) in o.remove.iter().enumerate() {
            if name.is_empty() {
                r.at(&path.key(field).key("remove").index(i), "must not be empty");
            }
        }
        HeaderOperations {
            set: o.set.clone(),
            add: o.add.clone(),
            remove: o.remove.clone(),
        }
    };
    Headers {
        request: ops("request", &h.request),
        response: ops("response", &h.response),
    }
}

fn redirect(r: &mut Reporter<'_>, path: &FieldPath, rd: &raw::HttpRedirect) -> HttpRedirect {
    let redirect_code = match rd.redirect_code {
        None => 301,
        Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
        Some(code) => {
            r.at(
                &path.key("redirectCode"),
                format!("{code} is not one of 301, 302, 303, 307, 308"),
            );
            301
        }
    };
    HttpRedirect {
        uri: rd.uri.clone(),
        authority: rd.authority.clone(),
        port: rd.port.and_then(|p| common::port(r, &path.key("port"), p)),
        scheme: rd.scheme.clone(),
        redirect_code,
    }
}

fn retries(r: &mut Reporter<'_>, path: &FieldPath, rt: &raw::HttpRetry) -> HttpRetry {
    let mut retry_on = Vec::new();
    if let Some(list) = &rt.retry_on {
        for item in list.split(',').map(str::trim) {
            match RetryOn::parse(item) {
                Some(cond) if RETRY_ON_UNSUPPORTED.contains(&cond) => {
                    r.at(&path.key("retryOn"), format!("{item:?} is {NOT_SUPPORTED}"));
                }
                Some(cond) => retry_on.push(cond),
                None => r.at(
                    &path.key("retryOn"),
                    format!("{item:?} is not a retry condition (an Envoy/gRPC retry policy or an HTTP status)"),
                ),
            }
        }
    }
    HttpRetry {
        attempts: common::int_in(
            r,
            &path.key("attempts"),
            Some(rt.attempts.unwrap_or(0)),
            0,
            INT32_MAX,
        )
        .unwrap_or(0),
        per_try_timeout: common::duration(
            r,
            &path.key("perTryTimeout"),
            rt.per_try_timeout.as_ref(),
        ),
        retry_on,
        // `true` is reported by `unsupported`.
        retry_remote_localities: false,
    }
}

fn fault(r: &mut Reporter<'_>, path: &FieldPath, f: &raw::HttpFault) -> Option<HttpFault> {
    if f.delay.is_none() && f.abort.is_none() {
        r.at(path, "one of delay or abort is required");
        return None;
    }
    let delay = f.delay.as_ref().and_then(|d| {
        let p = path.key("delay");
        // Istio: `percentage` wins; the deprecated integer `percent` applies without it.
        let percentage = match (d.percentage, d.percent) {
            (Some(_), _) => common::percent(r, &p.key("percentage"), d.percentage),
            (None, Some(n)) => common::int_in(r, &p.key("percent"), Some(n), 0, 100).map(f64::from),
            (None, None) => None,
        }
        .unwrap_or_else(|| unset_percentage(r, &p, "delayed", d.percentage.is_some() || d.percent.is_some()));
        let Some(text) = &d.fixed_delay else {
            // `exponentialDelay` stands in for it; `unsupported` reports that.
            if d.exponential_delay.is_none() {
                r.at(&p.key("fixedDelay"), "is required");
            }
            return None;
        };
        let fixed_delay = common::duration(r, &p.key("fixedDelay"), Some(text))?;
        Some(FaultDelay {
            percentage,
            fixed_delay,
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let p = path.key("abort");
        let percentage = common::percent(r, &p.key("percentage"), a.percentage)
            .unwrap_or_else(|| unset_percentage(r, &p, "aborted", a.percentage.is_some()));
        let status = match (a.http_status, &a.grpc_status) {
            (Some(_), Some(_)) => {
                r.at(&p, "only one of httpStatus or grpcStatus may be set");
                return None;
            }
            (None, None) => {
                // `http2Error` stands in for them; `unsupported` reports that.
                if a.http2_error.is_none() {
                    r.at(&p, "one of httpStatus or grpcStatus is required");
                }
                return None;
            }
            (Some(code), None) => AbortStatus::Http(
                common::int_in(r, &p.key("httpStatus"), Some(code), 200, 599)
                    .and_then(|c| u16::try_from(c).ok())?,
            ),
            (None, Some(name)) => match GRPC_CODES.iter().position(|c| c == name) {
                Some(code) => AbortStatus::Grpc(u8::try_from(code).ok()?),
                None => {
                    r.at(
                        &p.key("grpcStatus"),
                        format!("{name:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    );
                    return None;
                }
            },
        };
        Some(FaultAbort { percentage, status })
    });
    Some(HttpFault { delay, abort })
}

/// Istio's (and Envoy's) reading of a fault without `percentage`: no request is faulted. Said
/// as a warning, since the block reads as if it applied to every request. `invalid`: the value
/// was set but refused (reported already), nothing more to say.
fn unset_percentage(r: &mut Reporter<'_>, path: &FieldPath, what: &str, invalid: bool) -> f64 {
    if !invalid {
        r.warn(
            &path.key("percentage"),
            format!("not set: no request is {what}, as in Istio (set percentage.value: 100 for every request)"),
        );
    }
    0.0
}

fn l4_match(r: &mut Reporter<'_>, path: &FieldPath, m: &raw::L4Match) -> L4Match {
    L4Match {
        port: m.port.and_then(|p| common::port(r, &path.key("port"), p)),
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        gateways: m.gateways.clone(),
    }
}

fn l4_routes(
    r: &mut Reporter<'_>,
    path: &FieldPath,
    routes: &[raw::RouteDestination],
) -> Vec<RouteDestination> {
    if routes.is_empty() {
        r.at(path, "at least one route is required");
    }
    let out = routes
        .iter()
        .enumerate()
        .map(|(i, d)| RouteDestination {
            destination: common::destination(r, &path.index(i).key("destination"), &d.destination),
            weight: common::int_in(r, &path.index(i).key("weight"), d.weight, 0, 100),
        })
        .collect();
    check_weight_sum(
        r,
        path,
        &routes.iter().map(|d| d.weight).collect::<Vec<_>>(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_split_evenly_when_unset() {
        assert_eq!(
            effective_weights([None, None, None].into_iter()),
            vec![34, 33, 33]
        );
        assert_eq!(effective_weights([Some(90), None].into_iter()), vec![90, 0]);
        assert_eq!(effective_weights([None].into_iter()), vec![100]);
    }

    #[test]
    fn retry_conditions_round_trip() {
        for (name, _) in RETRY_ON_NAMES {
            assert_eq!(
                RetryOn::parse(name).map(|c| c.to_string()).as_deref(),
                Some(*name)
            );
        }
        assert_eq!(RetryOn::parse("503"), Some(RetryOn::Status(503)));
        assert_eq!(RetryOn::parse("5xxx"), None);
        assert_eq!(RetryOn::parse("99"), None);
    }
}
