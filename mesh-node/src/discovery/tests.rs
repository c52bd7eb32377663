//! Discovery against an in-process fake API server speaking list/watch.

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

use super::*;
use crate::config::labels_match;

pub(super) const WAIT: Duration = Duration::from_secs(10);

const SAMPLE: &[(&str, &str)] = &[
    ("authorization-policy.yaml", include_str!("../../../deploy/examples/lemo-dev/authorization-policy.yaml")),
    ("cluster.yaml", include_str!("../../../deploy/examples/lemo-dev/cluster.yaml")),
    ("destination-rules.yaml", include_str!("../../../deploy/examples/lemo-dev/destination-rules.yaml")),
    ("peer-authentication.yaml", include_str!("../../../deploy/examples/lemo-dev/peer-authentication.yaml")),
    ("virtual-services.yaml", include_str!("../../../deploy/examples/lemo-dev/virtual-services.yaml")),
];

// ------------------------------------------------------------ fake server

struct ChanBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Default)]
pub(super) struct FakeState {
    rv: u64,
    /// path -> key -> object (as the server stores it, with apiVersion/kind).
    pub(super) objects: HashMap<String, BTreeMap<String, Value>>,
    watchers: HashMap<String, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// Every request's path and query, in order.
    pub(super) requests: Vec<String>,
    /// Paths whose next watch answers an ERROR 410 event (or HTTP 410).
    gone_event: Vec<String>,
    gone_http: Vec<String>,
    /// Paths whose lists answer 500.
    fail_list: Vec<String>,
    /// When set, requests without `Authorization: Bearer <this>` get 401.
    pub(super) required_token: Option<String>,
    /// The Authorization header of every request, in order.
    pub(super) authorization: Vec<Option<String>>,
}

#[derive(Clone, Default)]
pub(super) struct Fake(Arc<Mutex<FakeState>>);

fn object_key(object: &Value) -> String {
    let ns = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("");
    let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap();
    format!("{ns}/{name}")
}

impl Fake {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    /// Serves every kind (no objects yet) at `versions`' first entry, except
    /// where `served` overrides the version for a kind.
    pub(super) fn new(served: &[(&str, &str)]) -> Fake {
        let fake = Fake::default();
        let mut st = fake.state();
        for res in reflector::RESOURCES {
            let version = served.iter().find(|(k, _)| *k == res.kind).map_or(res.versions[0], |(_, v)| *v);
            st.objects.insert(res.path(version), BTreeMap::new());
        }
        drop(st);
        fake
    }

    fn path_of(&self, object: &Value) -> String {
        let kind = object["kind"].as_str().unwrap();
        let st = self.state();
        let res = reflector::RESOURCES.iter().find(|r| r.kind == kind).unwrap();
        res.versions.iter().map(|v| res.path(v)).find(|p| st.objects.contains_key(p)).unwrap()
    }

    /// Stores `object` (new rv) and tells the watchers.
    pub(super) fn apply(&self, event: &str, mut object: Value) {
        let path = self.path_of(&object);
        let mut st = self.state();
        st.rv += 1;
        let rv = st.rv.to_string();
        object["metadata"]["resourceVersion"] = json!(rv);
        let key = object_key(&object);
        let store = st.objects.get_mut(&path).unwrap();
        if event == "DELETED" {
            store.remove(&key);
        } else {
            store.insert(key, object.clone());
        }
        let line = format!("{}\n", json!({"type": event, "object": object}));
        if let Some(ws) = st.watchers.get_mut(&path) {
            ws.retain(|w| w.send(Bytes::from(line.clone())).is_ok());
        }
    }

    fn bookmark(&self, kind: &str, rv: u64) {
        let res = reflector::RESOURCES.iter().find(|r| r.kind == kind).unwrap();
        let path = res.path(res.versions[0]);
        let mut st = self.state();
        st.rv = st.rv.max(rv);
        let line = format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": res.versions[0], "metadata": {"resourceVersion": rv.to_string()}}})
        );
        for w in st.watchers.get_mut(&path).into_iter().flatten() {
            let _ = w.send(Bytes::from(line.clone()));
        }
    }

    /// Ends every open watch stream on `path`.
    pub(super) fn close_watches(&self, path: &str) {
        self.state().watchers.remove(path);
    }

    pub(super) fn watcher_count(&self, path: &str) -> usize {
        self.state().watchers.get(path).map_or(0, |w| w.iter().filter(|s| !s.is_closed()).count())
    }

    pub(super) fn requests(&self, prefix: &str) -> Vec<String> {
        self.state().requests.iter().filter(|r| r.starts_with(prefix)).cloned().collect()
    }

    fn handle(&self, req: &http::Request<hyper::body::Incoming>) -> http::Response<BoxBody<Bytes, Infallible>> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let params: HashMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        let mut st = self.state();
        st.requests.push(format!("{path}?{query}"));
        let full = |status: u16, body: Value| {
            http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())).boxed())
                .unwrap()
        };
        let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        st.authorization.push(authorization.clone());
        if let Some(token) = &st.required_token
            && authorization.as_deref() != Some(format!("Bearer {token}").as_str())
        {
            return full(401, json!({"kind": "Status", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"}));
        }
        if !st.objects.contains_key(&path) {
            return full(404, json!({"kind": "Status", "code": 404, "reason": "NotFound"}));
        }
        if params.get("watch") == Some(&"1") {
            if let Some(i) = st.gone_http.iter().position(|p| *p == path) {
                st.gone_http.remove(i);
                return full(410, json!({"kind": "Status", "code": 410, "reason": "Expired"}));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            if let Some(i) = st.gone_event.iter().position(|p| *p == path) {
                st.gone_event.remove(i);
                let line = json!({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}});
                let _ = tx.send(Bytes::from(format!("{line}\n")));
                // Keep the stream open: the client must act on the event alone.
                st.watchers.entry(format!("{path}#gone")).or_default().push(tx);
            } else {
                st.watchers.entry(path).or_default().push(tx);
            }
            return http::Response::builder()
                .header("content-type", "application/json")
                .body(ChanBody(rx).boxed())
                .unwrap();
        }
        if st.fail_list.contains(&path) {
            return full(500, json!({"kind": "Status", "code": 500, "message": "boom"}));
        }
        let objects = st.objects.get(&path).unwrap();
        let items: Vec<Value> = objects
            .values()
            .map(|o| {
                // Real list items carry no apiVersion/kind.
                let mut o = o.clone();
                let m = o.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        full(200, json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}))
    }

    /// Serves HTTPS with `tls` (a certificate for 127.0.0.1) on loopback.
    pub(super) async fn serve_tls(self, tls: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
        crate::test_http::serve(Some(tls), move |req| std::future::ready(self.handle(&req))).await
    }

    async fn serve(self) -> std::net::SocketAddr {
        crate::test_http::serve(None, move |req| std::future::ready(self.handle(&req))).await
    }
}

// ------------------------------------------------------------ helpers

pub(super) fn sample_objects() -> Vec<Value> {
    let mut out = Vec::new();
    for (_, text) in SAMPLE {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

pub(super) fn file_mode() -> Cluster {
    Cluster::from_yaml_files(SAMPLE.iter().copied()).unwrap()
}

/// Everything the proxy looks up, as text, to compare models.
pub(super) fn summary(c: &Cluster) -> String {
    let mut s = String::new();
    for n in c.nodes() {
        s += &format!("node {} {}\n", n.name, n.ip);
    }
    for p in c.pods() {
        s += &format!("pod {}/{} {} {} {:?} enrolled={}\n", p.namespace, p.name, p.ip, p.node, p.labels, c.is_enrolled(p));
        s += &format!("  authz {:?} mtls80 {:?}\n",
            c.authorization_policies_for(p).iter().map(|a| format!("{a:?}")).collect::<Vec<_>>(),
            c.mtls_mode_for(p, 80));
    }
    for svc in c.services() {
        s += &format!("svc {}/{} {:?}\n", svc.namespace, svc.name, svc);
        for port in &svc.ports {
            s += &format!("  ep {} {:?}\n", port.port, c.endpoints(svc, port.port));
        }
        s += &format!("  dr {:?}\n  vs {:?}\n", c.destination_rule_for(svc), c.virtual_services_for(svc));
    }
    for pa in c.peer_authentications() {
        s += &format!("pa {pa:?}\n");
    }
    s
}

async fn start(fake: &Fake) -> Discovery {
    let addr = fake.clone().serve().await;
    let api = ApiServer::new(&format!("http://{addr}"), None, None).unwrap();
    let opts = Options {
        debounce: Duration::from_millis(20),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        watch_timeout: Duration::from_secs(60),
    };
    let mut d = spawn(api, opts);
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready in time");
    d
}

/// Waits (bounded) until the published model satisfies `pred`.
pub(super) async fn until(d: &mut Discovery, what: &str, pred: impl Fn(&Cluster) -> bool) {
    let ok = tokio::time::timeout(WAIT, d.config.wait_for(|c| pred(c))).await;
    assert!(matches!(ok, Ok(Ok(_))), "timed out waiting for: {what}");
}

pub(super) async fn until_true(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn loaded_fake(served: &[(&str, &str)]) -> Fake {
    let fake = Fake::new(served);
    for o in sample_objects() {
        fake.apply("ADDED", o);
    }
    fake
}

pub(super) fn pod(c: &Cluster, name: &str) -> Option<crate::config::Pod> {
    c.pods().find(|p| p.name == name).cloned()
}

fn a_pod(c: &Cluster) -> crate::config::Pod {
    // A pod selected by some Service, to move around.
    c.pods().find(|p| c.services().any(|s| s.selects(p))).cloned().expect("a selected pod")
}

fn pod_json(fake: &Fake, ns: &str, name: &str) -> Value {
    fake.state().objects.get("/api/v1/pods").unwrap().get(&format!("{ns}/{name}")).cloned().unwrap()
}

// ------------------------------------------------------------ tests

#[tokio::test]
async fn initial_list_builds_the_file_mode_model() {
    // Istio kinds at older versions: VirtualService only at v1beta1,
    // DestinationRule only at v1alpha3, PeerAuthentication at v1beta1.
    let fake = loaded_fake(&[
        ("VirtualService", "networking.istio.io/v1beta1"),
        ("DestinationRule", "networking.istio.io/v1alpha3"),
        ("PeerAuthentication", "security.istio.io/v1beta1"),
    ]);
    let d = start(&fake).await;
    assert!(d.is_ready());
    let got = d.config.borrow().clone();
    let want = file_mode();
    assert!(want.pods().count() > 0 && want.services().count() > 0);
    assert_eq!(summary(&got), summary(&want));
    assert_eq!(got.destination_rules().count(), want.destination_rules().count());
    assert_eq!(got.virtual_services().count(), want.virtual_services().count());
    assert_eq!(got.authorization_policies().count(), want.authorization_policies().count());
    // The fallback really happened.
    assert!(!fake.requests("/apis/networking.istio.io/v1/virtualservices").is_empty());
    assert!(!fake.requests("/apis/networking.istio.io/v1beta1/virtualservices?watch=1").is_empty());
}

#[tokio::test]
async fn not_ready_until_every_kind_is_listed() {
    // Services' list fails (500): nothing is published and the node is not ready.
    let fake = loaded_fake(&[]);
    fake.state().fail_list.push("/api/v1/services".into());
    let addr = fake.clone().serve().await;
    let api = ApiServer::new(&format!("http://{addr}"), None, None).unwrap();
    let opts = Options { debounce: Duration::from_millis(10), backoff_initial: Duration::from_millis(10), backoff_max: Duration::from_millis(50), ..Options::default() };
    let mut d = spawn(api, opts);
    until_true("the other kinds are watched", || fake.watcher_count("/api/v1/pods") > 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!d.is_ready());
    assert_eq!(d.config.borrow().pods().count(), 0);
    // The retried list succeeds: ready, with the full model.
    fake.state().fail_list.clear();
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready in time");
    assert_eq!(summary(&d.config.borrow()), summary(&file_mode()));
}

#[tokio::test]
async fn kinds_not_served_count_as_empty() {
    // No Istio CRDs installed: every version 404s; the model builds without them.
    let fake = Fake::new(&[]);
    for o in sample_objects() {
        if !o["apiVersion"].as_str().unwrap().contains("istio") {
            fake.apply("ADDED", o);
        }
    }
    for res in reflector::RESOURCES.iter().filter(|r| r.versions[0].contains('/')) {
        fake.state().objects.remove(&res.path(res.versions[0]));
    }
    let d = start(&fake).await;
    assert!(d.config.borrow().pods().count() > 0);
    assert_eq!(d.config.borrow().destination_rules().count(), 0);
    assert!(!fake.requests("/apis/networking.istio.io/v1alpha3/destinationrules").is_empty());
}

#[tokio::test]
async fn dead_api_server_is_never_ready() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let api = ApiServer::new(&format!("http://{dead}"), None, None).unwrap();
    let mut d = spawn(api, Options { backoff_initial: Duration::from_millis(10), ..Options::default() });
    assert!(tokio::time::timeout(Duration::from_millis(300), d.wait_ready()).await.is_err());
    assert!(!d.is_ready());
}

#[tokio::test]
async fn events_add_update_delete_are_reflected() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    until_true("service watch", || fake.watcher_count("/api/v1/services") > 0).await;
    let c = d.config.borrow().clone();
    let moving = a_pod(&c);
    let svc = c.services().find(|s| s.selects(&moving)).cloned().unwrap();
    let port = svc.ports[0].port;

    // Add: a copy of the pod with a new name and IP becomes an endpoint.
    let mut new = pod_json(&fake, &moving.namespace, &moving.name);
    new["metadata"]["name"] = json!("added-pod");
    new["metadata"]["uid"] = json!("uid-added");
    new["status"]["podIP"] = json!("10.244.9.9");
    new["status"]["podIPs"] = json!([{"ip": "10.244.9.9"}]);
    fake.apply("ADDED", new.clone());
    until(&mut d, "new pod is an endpoint", |c| {
        c.service(&svc.namespace, &svc.name)
            .is_some_and(|s| c.endpoints(s, port).iter().any(|e| e.pod_name == "added-pod"))
    })
    .await;

    // A pending pod (no IP yet) is not in the model and does not break it.
    let mut pending = new.clone();
    pending["metadata"]["name"] = json!("pending-pod");
    pending["status"] = json!({"phase": "Pending"});
    fake.apply("ADDED", pending);

    // Update: a label change moves the pod out of the Service's selection
    // (and so out of any subset of it).
    let mut relabelled = new.clone();
    relabelled["metadata"]["labels"] = json!({"moved": "away"});
    fake.apply("MODIFIED", relabelled);
    until(&mut d, "relabelled pod leaves the endpoints", |c| {
        pod(c, "added-pod").is_some_and(|p| p.labels.contains_key("moved"))
            && c.service(&svc.namespace, &svc.name)
                .is_some_and(|s| !c.endpoints(s, port).iter().any(|e| e.pod_name == "added-pod"))
    })
    .await;
    let c = d.config.borrow().clone();
    assert!(pod(&c, "pending-pod").is_none());
    let p = pod(&c, "added-pod").unwrap();
    for dr in c.destination_rules() {
        for subset in &dr.subsets {
            assert!(subset.labels.is_empty() || !labels_match(&subset.labels, &p.labels));
        }
    }

    // Delete: the Service disappears.
    let svc_json = fake.state().objects.get("/api/v1/services").unwrap()
        .get(&format!("{}/{}", svc.namespace, svc.name)).cloned().unwrap();
    fake.apply("DELETED", svc_json);
    until(&mut d, "service gone", |c| c.service(&svc.namespace, &svc.name).is_none()).await;
}

#[tokio::test]
async fn subset_membership_follows_labels() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    let c = d.config.borrow().clone();
    // A DestinationRule subset and a pod of its Service inside it.
    let (dr, subset) = c.destination_rules()
        .flat_map(|dr| dr.subsets.iter().map(move |s| (dr.clone(), s.clone())))
        .find(|(_, s)| !s.labels.is_empty())
        .expect("the sample has a subset with labels");
    let svc = c.destination_rules().position(|x| x.name == dr.name).map(|_| ()).and_then(|_| {
        c.services().find(|s| c.destination_rule_for(s).is_some_and(|x| x.name == dr.name)).cloned()
    }).unwrap();
    let member = c.pods().find(|p| svc.selects(p) && labels_match(&subset.labels, &p.labels)).cloned().unwrap();
    let mut j = pod_json(&fake, &member.namespace, &member.name);
    let key = subset.labels.keys().next().unwrap().clone();
    j["metadata"]["labels"][&key] = json!("something-else");
    fake.apply("MODIFIED", j);
    let subset_labels = subset.labels.clone();
    let name = member.name.clone();
    until(&mut d, "pod leaves the subset", move |c| {
        pod(c, &name).is_some_and(|p| !labels_match(&subset_labels, &p.labels))
    })
    .await;
}

#[tokio::test]
async fn closed_watch_rewatches_from_last_resource_version_and_bookmarks_advance_it() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("node watch", || fake.watcher_count("/api/v1/nodes") > 0).await;
    let lists_before = fake.requests("/api/v1/nodes?limit").len();

    // An event advances the rv to the object's.
    let c = d.config.borrow().clone();
    let node = c.nodes().next().unwrap().name.clone();
    let mut nj = fake.state().objects["/api/v1/nodes"][&format!("/{node}")].clone();
    nj["metadata"]["labels"] = json!({"changed": "yes"});
    fake.apply("MODIFIED", nj);
    let event_rv = fake.state().rv;
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.close_watches("/api/v1/nodes");
    until_true("re-watch from the event's rv", || {
        fake.requests("/api/v1/nodes?watch=1").iter().any(|r| r.contains(&format!("resourceVersion={event_rv}&")))
    })
    .await;
    until_true("node watch again", || fake.watcher_count("/api/v1/nodes") > 0).await;

    // A bookmark advances it without an object change.
    fake.bookmark("Node", 9999);
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.close_watches("/api/v1/nodes");
    until_true("re-watch from the bookmark", || {
        fake.requests("/api/v1/nodes?watch=1").iter().any(|r| r.contains("resourceVersion=9999&"))
    })
    .await;
    // No relist for a plain close or a bookmark.
    assert_eq!(fake.requests("/api/v1/nodes?limit").len(), lists_before);
    let _ = &mut d;
}

#[tokio::test]
async fn gone_relists_both_as_event_and_as_http_status() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    let lists = || fake.requests("/api/v1/pods?limit").len();
    let before = lists();

    // A pod removed server-side without an event reaching the client (the
    // watch history was compacted away): the next watch answers ERROR 410.
    let c = d.config.borrow().clone();
    let gone = a_pod(&c);
    let j = pod_json(&fake, &gone.namespace, &gone.name);
    {
        let mut st = fake.state();
        st.gone_event.push("/api/v1/pods".into());
        st.objects.get_mut("/api/v1/pods").unwrap().remove(&format!("{}/{}", gone.namespace, gone.name));
        st.rv += 1;
        st.watchers.remove("/api/v1/pods");
    }
    // ERROR 410 event -> relist -> the pod is gone from the model.
    until_true("relist after 410 event", || lists() > before).await;
    let name = gone.name.clone();
    until(&mut d, "deleted pod gone after relist", move |c| pod(c, &name).is_none()).await;

    // HTTP 410 on the watch request -> relist again; the pod comes back.
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    let before = lists();
    fake.state().gone_http.push("/api/v1/pods".into());
    {
        let mut st = fake.state();
        st.rv += 1;
        st.objects.get_mut("/api/v1/pods").unwrap().insert(format!("{}/{}", gone.namespace, gone.name), j);
    }
    fake.close_watches("/api/v1/pods");
    until_true("relist after HTTP 410", || lists() > before).await;
    let name = gone.name.clone();
    until(&mut d, "pod back after relist", move |c| pod(c, &name).is_some()).await;
}

#[tokio::test]
async fn an_invalid_object_is_held_back_and_the_rest_applied() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("service watch", || fake.watcher_count("/api/v1/services") > 0).await;
    until_true("rule watch", || fake.watcher_count("/apis/networking.istio.io/v1/destinationrules") > 0).await;
    let good = d.config.borrow().clone();
    assert!(d.rejected.borrow().is_empty());
    let svc = good.services().find(|s| !s.is_headless()).cloned().unwrap();
    let interval = |c: &Cluster| {
        let dr = c.destination_rules().next().expect("a rule");
        format!("{:?}", dr.traffic_policy.as_ref().and_then(|t| t.outlier_detection.as_ref()).and_then(|o| o.interval))
    };
    let before = interval(&good);
    let metric_before = crate::telemetry::mesh_metrics::CONFIG_ERRORS.load(std::sync::atomic::Ordering::Relaxed);

    // In one burst: a Service taking another's cluster IP (new, invalid), an invalid edit
    // of the DestinationRule (existing), and a valid Namespace change.
    let mut j = fake.state().objects["/api/v1/services"][&format!("{}/{}", svc.namespace, svc.name)].clone();
    j["metadata"]["name"] = json!("dup-ip");
    fake.apply("ADDED", j);
    let mut dr = fake.state().objects["/apis/networking.istio.io/v1/destinationrules"].values().next().cloned().unwrap();
    let dr_name = format!("{}/{}", dr["metadata"]["namespace"].as_str().unwrap(), dr["metadata"]["name"].as_str().unwrap());
    dr["spec"]["trafficPolicy"]["outlierDetection"]["interval"] = json!("ten");
    fake.apply("MODIFIED", dr.clone());
    let mut ns = fake.state().objects["/api/v1/namespaces"].values().next().cloned().unwrap();
    ns["metadata"]["labels"]["extra"] = json!("1");
    fake.apply("MODIFIED", ns);
    let name = ns_name(&fake);
    until(&mut d, "the valid change is applied despite the invalid ones", move |c| {
        c.namespace(&name).is_some_and(|n| n.labels.contains_key("extra"))
    })
    .await;
    let c = d.config.borrow().clone();
    assert!(c.service(&svc.namespace, "dup-ip").is_none(), "the newcomer is left out");
    assert!(c.service(&svc.namespace, &svc.name).is_some(), "the Service it collided with stays");
    assert_eq!(interval(&c), before, "the rule keeps its last good version");
    let rejected = d.rejected.borrow().clone();
    let lines: Vec<String> = rejected.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("DestinationRule {dr_name} rejected (keeping its last good version): trafficPolicy.outlierDetection.interval: \"ten\" is not a duration"))), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("Service {}/dup-ip rejected (left out): spec.clusterIP: ", svc.namespace)) && l.contains("is already used by")), "{lines:?}");
    assert_eq!(d.rejections_total(), 2);
    // Other tests may count too (one process-wide counter): at least these two.
    let metric = crate::telemetry::mesh_metrics::CONFIG_ERRORS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(metric >= metric_before + 2, "mesh_config_errors_total {metric_before} -> {metric}");

    // Fixing both: nothing held back, the fix applied; the count stays.
    let dup = fake.state().objects["/api/v1/services"][&format!("{}/dup-ip", svc.namespace)].clone();
    fake.apply("DELETED", dup);
    dr["spec"]["trafficPolicy"]["outlierDetection"]["interval"] = json!("20s");
    fake.apply("MODIFIED", dr);
    until(&mut d, "fixed rule applied", |c| interval(c) == "Some(20s)").await;
    tokio::time::timeout(WAIT, d.rejected.wait_for(|r| r.is_empty())).await.expect("nothing held back").expect("open");
    assert_eq!(d.rejections_total(), 2);
}

fn ns_name(fake: &Fake) -> String {
    fake.state().objects["/api/v1/namespaces"].values().next().unwrap()["metadata"]["name"].as_str().unwrap().to_string()
}

/// The install's RBAC for the node proxy (deploy/rbac.yaml) grants list and watch on exactly
/// the kinds discovery reads: a kind added here without RBAC would leave nodes never ready, a
/// grant left behind would be more than least privilege.
#[test]
fn install_rbac_grants_exactly_what_discovery_reads() {
    use std::collections::BTreeSet;
    let rbac = include_str!("../../../deploy/rbac.yaml");
    let role = serde_yaml::Deserializer::from_str(rbac)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-node")
        .expect("ClusterRole mesh-node");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: BTreeSet<&str> = rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verbs, BTreeSet::from(["list", "watch"]), "{rule}");
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                granted.insert((group.as_str().unwrap().to_string(), resource.as_str().unwrap().to_string()));
            }
        }
    }
    let read: BTreeSet<(String, String)> = reflector::RESOURCES
        .iter()
        .map(|r| {
            let group = r.versions[0].rsplit_once('/').map_or("", |(g, _)| g);
            (group.to_string(), r.plural.to_string())
        })
        .collect();
    assert_eq!(granted, read);
}
