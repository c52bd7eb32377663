//! One kind's list + watch loop: list (paginated) into the store, then watch
//! from the list's resourceVersion; bookmarks advance it, a closed or failed
//! stream re-watches from it (with backoff on failures), 410 Gone relists.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::Value;

use super::client::{ApiError, ApiServer, read_body, snippet};
use super::store::Shared;
use super::Options;

/// A kind the mesh reads and the API versions it is served at, preferred first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resource {
    pub kind: &'static str,
    pub plural: &'static str,
    /// `v1` for the core group, `group/version` otherwise.
    pub versions: &'static [&'static str],
}

pub(crate) const RESOURCES: &[Resource] = &[
    Resource { kind: "Namespace", plural: "namespaces", versions: &["v1"] },
    Resource { kind: "Node", plural: "nodes", versions: &["v1"] },
    Resource { kind: "Pod", plural: "pods", versions: &["v1"] },
    Resource { kind: "Service", plural: "services", versions: &["v1"] },
    Resource { kind: "EndpointSlice", plural: "endpointslices", versions: &["discovery.k8s.io/v1"] },
    Resource {
        kind: "DestinationRule",
        plural: "destinationrules",
        versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
    },
    Resource {
        kind: "VirtualService",
        plural: "virtualservices",
        versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
    },
    Resource {
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
    },
    Resource {
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
    },
];

impl Resource {
    pub(crate) fn path(&self, api_version: &str) -> String {
        if api_version.contains('/') {
            format!("/apis/{api_version}/{}", self.plural)
        } else {
            format!("/api/{api_version}/{}", self.plural)
        }
    }
}

const LIST_TIMEOUT: Duration = Duration::from_secs(60);
const PAGE: u32 = 500;

enum ListError {
    /// No version of the kind is served (the CRD is not installed).
    NotServed,
    /// 410 Gone while paginating: the continue token expired.
    Gone,
    Other(ApiError),
}

enum WatchEnd {
    /// The server ended the stream: re-watch from the last resourceVersion.
    Closed,
    /// 410 Gone: the resourceVersion is too old, relist.
    Gone,
    Failed(ApiError),
}

pub(crate) async fn run(api: Arc<ApiServer>, res: Resource, shared: Arc<Shared>, opts: Options) {
    let mut failures = 0u32;
    'relist: loop {
        let (version, items, mut rv) = match list(&api, &res).await {
            Ok(listed) => listed,
            Err(ListError::NotServed) => {
                // Treat as empty so the node can become ready without the CRDs;
                // look again later in case they get installed.
                tracing::warn!(kind = res.kind, "not served by the API server (CRD not installed?); treating as empty");
                shared.replace(res.kind, res.plural, res.versions[0], Vec::new());
                tokio::time::sleep(opts.backoff_max).await;
                continue;
            }
            Err(ListError::Gone) => continue,
            Err(ListError::Other(e)) => {
                failures += 1;
                tracing::warn!(kind = res.kind, "list failed: {e:#}");
                tokio::time::sleep(backoff(&opts, failures)).await;
                continue;
            }
        };
        failures = 0;
        tracing::debug!(kind = res.kind, version, count = items.len(), rv, "listed");
        shared.replace(res.kind, res.plural, version, items);
        let path = res.path(version);
        loop {
            match watch(&api, &res, version, &path, &mut rv, &shared, &opts).await {
                WatchEnd::Closed => {
                    failures = 0;
                    tracing::debug!(kind = res.kind, rv, "watch closed; re-watching");
                }
                WatchEnd::Gone => {
                    tracing::info!(kind = res.kind, rv, "resourceVersion expired (410 Gone); relisting");
                    continue 'relist;
                }
                WatchEnd::Failed(e) => {
                    failures += 1;
                    tracing::warn!(kind = res.kind, rv, "watch failed: {e:#}");
                    tokio::time::sleep(backoff(&opts, failures)).await;
                }
            }
        }
    }
}

fn backoff(opts: &Options, failures: u32) -> Duration {
    let exp = opts.backoff_initial.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let capped = exp.min(opts.backoff_max);
    // Up to 25% jitter so many nodes do not hammer the API server in step.
    capped + capped.mul_f64(fastrand::f64() * 0.25)
}

/// Lists every served page; returns the version used, the items and the
/// list's resourceVersion.
async fn list(api: &ApiServer, res: &Resource) -> Result<(&'static str, Vec<Value>, String), ListError> {
    'versions: for &version in res.versions {
        let path = res.path(version);
        let mut items = Vec::new();
        let mut cont: Option<String> = None;
        loop {
            let mut query = format!("{path}?limit={PAGE}");
            if let Some(token) = &cont {
                query.push_str("&continue=");
                query.push_str(&encode(token));
            }
            let resp = api.get(&query).await.map_err(ListError::Other)?;
            let status = resp.status();
            let body = read_body(resp.into_body(), LIST_TIMEOUT)
                .await
                .map_err(|message| ListError::Other(ApiError::Http { method: "GET", path: query.clone(), message }))?;
            if status == http::StatusCode::NOT_FOUND {
                continue 'versions;
            }
            if status == http::StatusCode::GONE {
                return Err(ListError::Gone);
            }
            if !status.is_success() {
                return Err(ListError::Other(ApiError::Status { method: "GET", path: query, status, body: snippet(&body) }));
            }
            let mut list: Value = serde_json::from_slice(&body).map_err(|e| {
                ListError::Other(ApiError::Json { method: "GET", path: query.clone(), message: e.to_string() })
            })?;
            let meta = list.get("metadata");
            let rv = meta.and_then(|m| m.get("resourceVersion")).and_then(Value::as_str).unwrap_or("").to_string();
            let next = meta.and_then(|m| m.get("continue")).and_then(Value::as_str).filter(|c| !c.is_empty()).map(str::to_string);
            if let Some(Value::Array(page)) = list.get_mut("items").map(Value::take) {
                items.extend(page);
            }
            match next {
                Some(token) => cont = Some(token),
                None => return Ok((version, items, rv)),
            }
        }
    }
    Err(ListError::NotServed)
}

async fn watch(
    api: &ApiServer,
    res: &Resource,
    version: &'static str,
    path: &str,
    rv: &mut String,
    shared: &Shared,
    opts: &Options,
) -> WatchEnd {
    let query = format!(
        "{path}?watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
        encode(rv),
        opts.watch_timeout.as_secs().max(1)
    );
    let resp = match api.get(&query).await {
        Ok(resp) => resp,
        Err(e) => return WatchEnd::Failed(e),
    };
    let status = resp.status();
    if status == http::StatusCode::GONE {
        return WatchEnd::Gone;
    }
    if !status.is_success() {
        let body = read_body(resp.into_body(), LIST_TIMEOUT).await.unwrap_or_default();
        return WatchEnd::Failed(ApiError::Status { method: "GET", path: query, status, body: snippet(&body) });
    }
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    // The server closes after timeoutSeconds; a silent connection past that is dead.
    let idle = opts.watch_timeout + Duration::from_secs(30);
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return WatchEnd::Failed(watch_error(path, format!("idle for {idle:?}"))),
            Ok(None) => return WatchEnd::Closed,
            Ok(Some(Err(e))) => return WatchEnd::Failed(watch_error(path, format!("stream: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            match handle_event(res, version, path, line, rv, shared) {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) => return WatchEnd::Failed(e),
            }
        }
    }
}

fn watch_error(path: &str, message: String) -> ApiError {
    ApiError::Watch { path: path.to_string(), message }
}

fn handle_event(
    res: &Resource,
    version: &'static str,
    path: &str,
    line: &[u8],
    rv: &mut String,
    shared: &Shared,
) -> Result<Option<WatchEnd>, ApiError> {
    let mut event: Value =
        serde_json::from_slice(line).map_err(|e| watch_error(path, format!("invalid event: {e}")))?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("").to_string();
    let object = event.get_mut("object").map(Value::take).unwrap_or(Value::Null);
    let object_rv = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    match kind.as_str() {
        "ADDED" | "MODIFIED" => shared.upsert(res.kind, res.plural, version, object),
        "DELETED" => shared.delete(res.kind, res.plural, &object),
        "BOOKMARK" => {}
        "ERROR" => {
            let code = object.get("code").and_then(Value::as_u64);
            if code == Some(410) {
                return Ok(Some(WatchEnd::Gone));
            }
            let message = object.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(watch_error(path, format!("error event (code {code:?}): {message}")));
        }
        other => return Err(watch_error(path, format!("unknown event type {other:?}"))),
    }
    if let Some(new_rv) = object_rv {
        *rv = new_rv;
    }
    Ok(None)
}

/// Percent-encodes a query value (resourceVersions and continue tokens are opaque).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
