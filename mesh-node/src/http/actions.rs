//! Route actions other than forwarding: fault injection, redirects and rewrites.
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt as _;

use super::{ProxyBody, local_reply};
use crate::{
    config::{AbortStatus, HttpFault, HttpRoute},
    flags::ResponseFlags,
};

/// Istio's `fault`: an optional delay, then an optional abort (HTTP status, or a gRPC status as
/// a trailers-only response).
pub(super) async fn inject_fault(fault: &HttpFault, flags: &mut ResponseFlags) -> Option<Response<ProxyBody>> {
    if let Some(delay) = &fault.delay
        && fastrand::f64() * 100.0 < delay.percentage
    {
        flags.insert(ResponseFlags::DELAY_INJECTED);
        tokio::time::sleep(delay.fixed_delay).await;
    }
    let abort = fault.abort.as_ref()?;
    if fastrand::f64() * 100.0 >= abort.percentage {
        return None;
    }
    flags.insert(ResponseFlags::FAULT_INJECTED);
    Some(match abort.status {
        AbortStatus::Http(code) => {
            let mut r = local_reply(StatusCode::OK, "fault filter abort\n");
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            r
        }
        AbortStatus::Grpc(code) => {
            // gRPC errors travel as a trailers-only response: HTTP 200 with grpc-status.
            let mut r = Response::new(http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(i32::from(code)));
            h.insert("grpc-message", HeaderValue::from_static("fault filter abort"));
            r
        }
    })
}

/// Istio's `redirect`: answered by the proxy, the upstream is never called.
pub(super) fn redirect_reply(redirect: &crate::config::HttpRedirect, parts: &http::request::Parts) -> Response<ProxyBody> {
    let host = parts
        .uri
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| h.split(':').next().unwrap_or(h).to_owned()))
        .unwrap_or_default();
    let authority = redirect.authority.clone().unwrap_or(host);
    let authority = match redirect.port {
        Some(p) => format!("{authority}:{p}"),
        None => authority,
    };
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let path = redirect.uri.clone().unwrap_or_else(|| parts.uri.path_and_query().map_or("/".into(), |p| p.as_str().to_owned()));
    let mut r = local_reply(StatusCode::MOVED_PERMANENTLY, "");
    *r.status_mut() = StatusCode::from_u16(redirect.redirect_code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::try_from(format!("{scheme}://{authority}{path}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// `rewrite.uri` replaces the matched prefix (or the whole path for other matches);
/// `rewrite.authority` replaces Host / :authority.
pub(super) fn apply_rewrite(rewrite: &crate::config::HttpRewrite, route: &HttpRoute, parts: &mut http::request::Parts) {
    if let Some(new_prefix) = &rewrite.uri {
        let path = parts.uri.path();
        let matched_prefix = route.matches.iter().find_map(|m| match &m.uri {
            Some(crate::config::StringMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(p.len()),
            _ => None,
        });
        let rest = matched_prefix.map_or("", |n| &path[n..]);
        let mut new_path = format!("{new_prefix}{rest}");
        if let Some(q) = parts.uri.query() {
            new_path.push('?');
            new_path.push_str(q);
        }
        let mut uri = http::uri::Builder::new();
        if let Some(s) = parts.uri.scheme() {
            uri = uri.scheme(s.clone());
        }
        if let Some(a) = parts.uri.authority() {
            uri = uri.authority(a.clone());
        }
        if let Ok(u) = uri.path_and_query(new_path).build() {
            parts.uri = u;
        }
    }
    if let Some(authority) = &rewrite.authority {
        if let Ok(v) = HeaderValue::try_from(authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
        if parts.uri.authority().is_some() {
            let mut uri = http::uri::Builder::new().authority(authority.as_str());
            if let Some(s) = parts.uri.scheme() {
                uri = uri.scheme(s.clone());
            }
            if let Some(pq) = parts.uri.path_and_query() {
                uri = uri.path_and_query(pq.clone());
            }
            if let Ok(u) = uri.build() {
                parts.uri = u;
            }
        }
    }
}

