//! An in-process fake Kubernetes API server for the tests of discovery and of the CA, speaking
//! what a real one sends to kube-runtime's watcher:
//! - lists with `metadata.resourceVersion`, paginated by `limit` with `continue` tokens; a
//!   `continue` token can be made to expire (HTTP 410 Expired, as after etcd compaction);
//! - watches from a resourceVersion that replay the events after it, then stream new ones;
//!   BOOKMARK events (only to watches that asked with `allowWatchBookmarks=true`); a watch from
//!   a resourceVersion older than the compacted history gets an ERROR event carrying a 410
//!   Status; a watch ends after its `timeoutSeconds`;
//! - Status bodies for errors (404 for kinds not served, 401 for a refused token);
//! - POST handlers (TokenReview) given by the test.
//!
//! Every request is recorded (path, query parameters, Authorization header) for the tests to
//! assert on.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::kinds::KINDS;

/// A watch response body: the events sent to the channel, until the senders are dropped
/// (`close_watches`) or `timeoutSeconds` is over, as a real server ends watches.
struct WatchBody {
    events: mpsc::UnboundedReceiver<Bytes>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Poll::Ready(event) = self.events.poll_recv(cx) {
            return Poll::Ready(event.map(|b| Ok(Frame::data(b))));
        }
        self.deadline.as_mut().poll(cx).map(|()| None)
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub params: HashMap<String, String>,
    pub authorization: Option<String>,
    pub at: tokio::time::Instant,
}

impl Seen {
    pub(crate) fn is_watch(&self) -> bool {
        matches!(self.params.get("watch").map(String::as_str), Some("true" | "1"))
    }

    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Answers a POST: the request's JSON in, status and JSON out.
pub(crate) type PostHandler = Arc<dyn Fn(&Value) -> (u16, Value) + Send + Sync>;

#[derive(Default)]
pub(crate) struct FakeState {
    pub rv: u64,
    /// path -> "namespace/name" -> object (as the server stores it, with apiVersion/kind).
    pub objects: HashMap<String, BTreeMap<String, Value>>,
    /// (resourceVersion, path, event line) of every change since `compacted`.
    history: Vec<(u64, String, String)>,
    /// Watches from a resourceVersion older than this get 410 (history compacted away).
    compacted: u64,
    /// path -> open watches (sender, asked for bookmarks).
    watchers: HashMap<String, Vec<(mpsc::UnboundedSender<Bytes>, bool)>>,
    /// Every request, in order.
    pub seen: Vec<Seen>,
    /// Paths whose lists answer 500.
    pub fail_list: Vec<String>,
    /// Paths whose next list page with a `continue` token answers 410 Expired.
    pub expire_continue: Vec<String>,
    /// Paths whose next watch request answers HTTP 410 (instead of the usual ERROR event).
    pub refuse_watch_gone: Vec<String>,
    /// When set, requests without `Authorization: Bearer <one of these>` get 401.
    pub accepted_tokens: Option<Vec<String>>,
    posts: HashMap<String, PostHandler>,
}

#[derive(Clone, Default)]
pub(crate) struct Fake(Arc<Mutex<FakeState>>);

fn object_key(object: &Value) -> String {
    let ns = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = object.pointer("/metadata/name").and_then(Value::as_str).expect("objects have names");
    format!("{ns}/{name}")
}

/// A `Status` as the API server sends it with an error.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> http::Response<BoxBody<Bytes, Infallible>> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

impl Fake {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves every kind discovery reads (no objects yet) at its first version, except where
    /// `served` names another version for a kind.
    pub(crate) fn new(served: &[(&str, &str)]) -> Fake {
        let fake = Fake::default();
        let mut st = fake.state();
        for kind in KINDS {
            let version = served.iter().find(|(k, _)| *k == kind.kind).map_or(kind.versions[0], |(_, v)| *v);
            st.objects.insert(kind.path(version), BTreeMap::new());
        }
        st.rv = 1;
        drop(st);
        fake
    }

    /// Serves only `paths` (the CA's fake: pods), plus the POST handlers added later.
    pub(crate) fn serving(paths: &[&str]) -> Fake {
        let fake = Fake::default();
        let mut st = fake.state();
        for p in paths {
            st.objects.insert((*p).to_string(), BTreeMap::new());
        }
        st.rv = 1;
        drop(st);
        fake
    }

    pub(crate) fn on_post(&self, path: &str, handler: PostHandler) {
        self.state().posts.insert(path.to_string(), handler);
    }

    /// Where `object` is served (its kind's served version).
    pub(crate) fn path_of(&self, object: &Value) -> String {
        let kind = object["kind"].as_str().expect("kind");
        let st = self.state();
        let k = KINDS.iter().chain(super::kinds::REPORTED).find(|k| k.kind == kind && k.versions.iter().any(|v| st.objects.contains_key(&k.path(v)))).expect("a discovered kind");
        k.versions.iter().map(|v| k.path(v)).find(|p| st.objects.contains_key(p)).expect("served")
    }

    /// Stores `object` at a new resourceVersion and tells the watchers (`ADDED`, `MODIFIED`
    /// or `DELETED`).
    pub(crate) fn apply(&self, event: &str, object: Value) {
        let path = self.path_of(&object);
        self.apply_at(&path, event, object);
    }

    pub(crate) fn apply_at(&self, path: &str, event: &str, mut object: Value) {
        let mut st = self.state();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = object_key(&object);
        let store = st.objects.get_mut(path).expect("a served path");
        if event == "DELETED" {
            store.remove(&key);
        } else {
            store.insert(key, object.clone());
        }
        let line = format!("{}\n", json!({"type": event, "object": object}));
        st.history.push((rv, path.to_string(), line.clone()));
        if let Some(ws) = st.watchers.get_mut(path) {
            ws.retain(|(w, _)| w.send(Bytes::from(line.clone())).is_ok());
        }
    }

    /// Changes the store without an event reaching anyone, and compacts the history up to
    /// now: what a client misses while disconnected past the server's watch window.
    pub(crate) fn change_unseen(&self, path: &str, f: impl FnOnce(&mut BTreeMap<String, Value>)) {
        let mut st = self.state();
        st.rv += 1;
        f(st.objects.get_mut(path).expect("a served path"));
        st.compact();
    }

    /// Drops the history up to now: a watch from an older resourceVersion gets 410.
    pub(crate) fn compact(&self) {
        self.state().compact();
    }

    /// A BOOKMARK at the current resourceVersion to the watches of `path` that asked for
    /// bookmarks; returns that resourceVersion.
    pub(crate) fn bookmark(&self, path: &str, kind: &str, api_version: &str) -> u64 {
        let mut st = self.state();
        let rv = st.rv;
        let line = format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}})
        );
        for (w, bookmarks) in st.watchers.get_mut(path).into_iter().flatten() {
            if *bookmarks {
                let _ = w.send(Bytes::from(line.clone()));
            }
        }
        rv
    }

    /// Ends every open watch on `path` (as an API server restart or a load balancer does).
    pub(crate) fn close_watches(&self, path: &str) {
        self.state().watchers.remove(path);
    }

    pub(crate) fn watcher_count(&self, path: &str) -> usize {
        self.state().watchers.get(path).map_or(0, |w| w.iter().filter(|(s, _)| !s.is_closed()).count())
    }

    /// The list requests (pages) of `path` seen so far.
    pub(crate) fn lists(&self, path: &str) -> Vec<Seen> {
        self.state().seen.iter().filter(|s| s.method == "GET" && s.path == path && !s.is_watch()).cloned().collect()
    }

    /// The watch requests of `path` seen so far.
    pub(crate) fn watches(&self, path: &str) -> Vec<Seen> {
        self.state().seen.iter().filter(|s| s.method == "GET" && s.path == path && s.is_watch()).cloned().collect()
    }

    /// Every Authorization header seen, in order.
    pub(crate) fn authorizations(&self) -> Vec<Option<String>> {
        self.state().seen.iter().map(|s| s.authorization.clone()).collect()
    }

    async fn handle(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<BoxBody<Bytes, Infallible>> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let params: HashMap<String, String> = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let at = tokio::time::Instant::now();
        let seen = Seen { method: parts.method.to_string(), path: path.clone(), params, authorization, at };
        let post = {
            let mut st = self.state();
            st.seen.push(seen.clone());
            if let Some(tokens) = &st.accepted_tokens
                && !tokens.iter().any(|t| seen.authorization.as_deref() == Some(format!("Bearer {t}").as_str()))
            {
                return respond(401, &status(401, "Unauthorized", "Unauthorized"));
            }
            st.posts.get(&path).cloned()
        };
        if seen.method == "POST" {
            let Some(handler) = post else { return respond(404, &status(404, "NotFound", "no such POST")) };
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let request: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, answer) = handler(&request);
            return respond(code, &answer);
        }
        let mut st = self.state();
        if !st.objects.contains_key(&path) {
            return respond(404, &status(404, "NotFound", "the server could not find the requested resource"));
        }
        if seen.is_watch() {
            return st.watch(&path, &seen);
        }
        st.list(&path, &seen)
    }

    /// Serves on loopback, over TLS when `tls` is given (a certificate for 127.0.0.1).
    pub(crate) async fn serve(self, tls: Option<Arc<rustls::ServerConfig>>) -> std::net::SocketAddr {
        crate::test_http::serve(tls, move |req| {
            let fake = self.clone();
            async move { fake.handle(req).await }
        })
        .await
    }
}

impl FakeState {
    fn compact(&mut self) {
        self.compacted = self.rv;
        let rv = self.rv;
        self.history.retain(|(r, _, _)| *r > rv);
    }

    fn list(&mut self, path: &str, seen: &Seen) -> http::Response<BoxBody<Bytes, Infallible>> {
        if self.fail_list.iter().any(|p| p == path) {
            return respond(500, &status(500, "InternalError", "etcd is sad"));
        }
        // A continue token is "<resourceVersion of the first page>-<offset>".
        let (rv, offset) = match seen.param("continue") {
            None => (self.rv, 0),
            Some(token) => {
                if let Some(i) = self.expire_continue.iter().position(|p| p == path) {
                    self.expire_continue.remove(i);
                    let message = "The provided continue parameter is too old to display a consistent list result.";
                    return respond(410, &status(410, "Expired", message));
                }
                let (rv, offset) = token.split_once('-').expect("a token of ours");
                (rv.parse().expect("rv"), offset.parse().expect("offset"))
            }
        };
        let all = &self.objects[path];
        let limit = seen.param("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let items: Vec<Value> = all
            .values()
            .skip(offset)
            .take(limit)
            .map(|o| {
                // Real list items carry no apiVersion/kind.
                let mut o = o.clone();
                let m = o.as_object_mut().expect("object");
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        let next = offset + items.len();
        if next < all.len() {
            metadata["continue"] = json!(format!("{rv}-{next}"));
            metadata["remainingItemCount"] = json!(all.len() - next);
        }
        respond(200, &json!({"kind": "List", "apiVersion": "v1", "metadata": metadata, "items": items}))
    }

    fn watch(&mut self, path: &str, seen: &Seen) -> http::Response<BoxBody<Bytes, Infallible>> {
        if let Some(i) = self.refuse_watch_gone.iter().position(|p| p == path) {
            self.refuse_watch_gone.remove(i);
            return respond(410, &status(410, "Expired", "too old resource version"));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let timeout = seen.param("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(290);
        let from: u64 = seen.param("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(self.rv);
        if from < self.compacted {
            // A real server answers 200 and the error as an event.
            let message = format!("too old resource version: {from} ({})", self.compacted);
            let line = json!({"type": "ERROR", "object": status(410, "Expired", &message)});
            let _ = tx.send(Bytes::from(format!("{line}\n")));
            // Kept open (not registered for events): the client must act on the event alone.
            self.watchers.entry(format!("{path}#expired")).or_default().push((tx, false));
        } else {
            for (_, _, line) in self.history.iter().filter(|(rv, p, _)| *rv > from && p == path) {
                let _ = tx.send(Bytes::from(line.clone()));
            }
            let bookmarks = seen.param("allowWatchBookmarks") == Some("true");
            self.watchers.entry(path.to_string()).or_default().push((tx, bookmarks));
        }
        let body = WatchBody { events: rx, deadline: Box::pin(tokio::time::sleep(Duration::from_secs(timeout))) };
        http::Response::builder().header("content-type", "application/json").body(body.boxed()).expect("response")
    }
}
