//! Discovery against the in-process fake API server (`fake_api`), driven as kube-runtime's
//! watcher drives a real one.

use std::time::Duration;

use serde_json::{Value, json};

use super::fake_api::Fake;
use super::kinds::KINDS;
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
        s += &format!("  dr {:?}\n  vs {:?}\n", c.destination_rule_for(svc, None), c.virtual_services_for(svc, None));
    }
    for pa in c.peer_authentications() {
        s += &format!("pa {pa:?}\n");
    }
    s
}

/// Tunables for tests: short debounce and backoff.
pub(super) fn fast() -> Options {
    Options {
        debounce: Duration::from_millis(20),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        watch_timeout: Duration::from_secs(60),
        page_size: 500,
        ..Options::default()
    }
}

async fn start(fake: &Fake) -> Discovery {
    start_with(fake, fast()).await
}

async fn start_with(fake: &Fake, opts: Options) -> Discovery {
    let addr = fake.clone().serve(None).await;
    let api = ApiServer::new(&format!("http://{addr}"), None, None).unwrap();
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
    assert!(!fake.lists("/apis/networking.istio.io/v1/virtualservices").is_empty());
    assert!(!fake.watches("/apis/networking.istio.io/v1beta1/virtualservices").is_empty());
}

#[tokio::test]
async fn not_ready_until_every_kind_is_listed() {
    // Services' list fails (500): nothing is published and the node is not ready.
    let fake = loaded_fake(&[]);
    fake.state().fail_list.push("/api/v1/services".into());
    let addr = fake.clone().serve(None).await;
    let api = ApiServer::new(&format!("http://{addr}"), None, None).unwrap();
    let mut d = spawn(api, Options { backoff_max: Duration::from_millis(50), ..fast() });
    until_true("the other kinds are watched", || fake.watcher_count("/api/v1/pods") > 0).await;
    // The failing list is retried (after a backoff) and never makes the node ready.
    until_true("the Service list retried", || fake.lists("/api/v1/services").len() >= 3).await;
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
    for kind in KINDS.iter().filter(|k| k.versions[0].contains("istio")) {
        fake.state().objects.remove(&kind.path(kind.versions[0]));
    }
    let d = start(&fake).await;
    assert!(d.config.borrow().pods().count() > 0);
    assert_eq!(d.config.borrow().destination_rules().count(), 0);
    // Every version was tried.
    assert!(!fake.lists("/apis/networking.istio.io/v1alpha3/destinationrules").is_empty());
}

/// A CRD uninstalled while watched: its watch is answered 404, no version is served any more,
/// the kind counts as empty.
#[tokio::test]
async fn a_crd_removed_while_watched_empties_its_kind() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    let path = "/apis/networking.istio.io/v1/destinationrules";
    until_true("rule watch", || fake.watcher_count(path) > 0).await;
    assert!(d.config.borrow().destination_rules().count() > 0);
    fake.state().objects.remove(path);
    fake.close_watches(path);
    until(&mut d, "no rules once the CRD is gone", |c| c.destination_rules().count() == 0).await;
    // Every version was looked at again.
    until_true("v1alpha3 tried", || !fake.lists("/apis/networking.istio.io/v1alpha3/destinationrules").is_empty()).await;
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
        c.services().find(|s| c.destination_rule_for(s, None).is_some_and(|x| x.name == dr.name)).cloned()
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
async fn closed_watch_resumes_from_the_last_event_and_bookmarks_keep_it_inside_the_watch_window() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("node watch", || fake.watcher_count("/api/v1/nodes") > 0).await;
    let lists_before = fake.lists("/api/v1/nodes").len();
    let watch = fake.watches("/api/v1/nodes").pop().expect("a node watch");
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"), "{watch:?}");
    assert_eq!(watch.param("timeoutSeconds"), Some("60"), "{watch:?}");

    // An event advances the client's resourceVersion to the object's.
    let c = d.config.borrow().clone();
    let node = c.nodes().next().unwrap().name.clone();
    let mut nj = fake.state().objects["/api/v1/nodes"][&format!("/{node}")].clone();
    nj["status"]["addresses"] = json!([{"type": "InternalIP", "address": "172.18.0.99"}]);
    fake.apply("MODIFIED", nj);
    let event_rv = fake.state().rv.to_string();
    until(&mut d, "the node change", |c| c.nodes().any(|n| n.ip.to_string() == "172.18.0.99")).await;
    fake.close_watches("/api/v1/nodes");
    until_true("re-watch from the event's resourceVersion", || {
        fake.watches("/api/v1/nodes").iter().any(|w| w.param("resourceVersion") == Some(event_rv.as_str()))
    })
    .await;
    until_true("node watch again", || fake.watcher_count("/api/v1/nodes") > 0).await;

    // Other kinds move on; the server then compacts its history. Without the bookmark the
    // node watch would resume from a resourceVersion outside the window (410, relist).
    let mut ns = fake.state().objects["/api/v1/namespaces"].values().next().cloned().unwrap();
    ns["metadata"]["labels"]["moved"] = json!("on");
    fake.apply("MODIFIED", ns);
    let bookmark_rv = fake.bookmark("/api/v1/nodes", "Node", "v1").to_string();
    fake.compact();
    // The stream delivers what was sent before it ends: the bookmark, then the close.
    fake.close_watches("/api/v1/nodes");
    until_true("re-watch from the bookmark's resourceVersion", || {
        fake.watches("/api/v1/nodes").iter().any(|w| w.param("resourceVersion") == Some(bookmark_rv.as_str()))
    })
    .await;
    until_true("node watch again", || fake.watcher_count("/api/v1/nodes") > 0).await;
    // No relist for a plain close, nor after a bookmark.
    assert_eq!(fake.lists("/api/v1/nodes").len(), lists_before);
}

#[tokio::test]
async fn a_watch_outside_the_window_gets_410_and_relists() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    let before = fake.lists("/api/v1/pods").len();

    // A pod removed while the client was away, its event compacted away: the resumed watch
    // is answered with an ERROR event carrying a 410 Status; the client must list again.
    let c = d.config.borrow().clone();
    let gone = a_pod(&c);
    let key = format!("{}/{}", gone.namespace, gone.name);
    fake.change_unseen("/api/v1/pods", |pods| {
        pods.remove(&key);
    });
    fake.close_watches("/api/v1/pods");
    until_true("relist after the 410 event", || fake.lists("/api/v1/pods").len() > before).await;
    let name = gone.name.clone();
    until(&mut d, "deleted pod gone after relist", move |c| pod(c, &name).is_none()).await;
    // The relist was a fresh one (no continue token), and the watch resumes from its rv.
    let relist = fake.lists("/api/v1/pods").pop().expect("relist");
    assert_eq!(relist.param("continue"), None);
    let rv = fake.state().rv.to_string();
    until_true("watch from the relist's resourceVersion", || {
        fake.watches("/api/v1/pods").iter().any(|w| w.param("resourceVersion") == Some(rv.as_str()))
    })
    .await;
}

/// Some servers (and proxies) refuse the watch request itself with HTTP 410: listed again
/// too, rather than the watch retried from the same expired resourceVersion forever.
#[tokio::test]
async fn a_watch_refused_with_http_410_relists() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    let before = fake.lists("/api/v1/pods").len();
    let c = d.config.borrow().clone();
    let gone = a_pod(&c);
    let key = format!("{}/{}", gone.namespace, gone.name);
    {
        let mut st = fake.state();
        st.refuse_watch_gone.push("/api/v1/pods".into());
        st.objects.get_mut("/api/v1/pods").expect("pods").remove(&key);
    }
    fake.close_watches("/api/v1/pods");
    until_true("relist after the HTTP 410", || fake.lists("/api/v1/pods").len() > before).await;
    let name = gone.name.clone();
    until(&mut d, "deleted pod gone after relist", move |c| pod(c, &name).is_none()).await;
    until_true("pod watch again", || fake.watcher_count("/api/v1/pods") > 0).await;
}

#[tokio::test]
async fn lists_are_paginated_and_an_expired_continue_token_lists_again_from_the_start() {
    let fake = loaded_fake(&[]);
    let pods = fake.state().objects["/api/v1/pods"].len();
    assert!(pods >= 3, "the sample has several pods");
    // The first page's continue token has expired by the time the client asks for page 2.
    fake.state().expire_continue.push("/api/v1/pods".into());
    let d = start_with(&fake, Options { page_size: 2, ..fast() }).await;
    assert_eq!(summary(&d.config.borrow()), summary(&file_mode()));

    let lists = fake.lists("/api/v1/pods");
    assert!(lists.iter().all(|l| l.param("limit") == Some("2")), "{lists:?}");
    // Page 1, page 2 refused (410), then a fresh list from page 1 through to the last page.
    let pages = pods.div_ceil(2);
    assert_eq!(lists.len(), 2 + pages, "{lists:?}");
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some());
    assert_eq!(lists[2].param("continue"), None, "listed again from the start");
    assert!(lists[3..].iter().all(|l| l.param("continue").is_some()));
    // The watch starts from the list's resourceVersion.
    let rv = fake.state().rv.to_string();
    until_true("pod watch", || fake.watcher_count("/api/v1/pods") > 0).await;
    assert_eq!(fake.watches("/api/v1/pods")[0].param("resourceVersion"), Some(rv.as_str()));
}

#[tokio::test]
async fn failures_are_retried_with_backoff() {
    // Services' list fails: retried with growing delays (10 ms doubling, capped at 80 ms, each
    // plus up to as much jitter).
    let fake = loaded_fake(&[]);
    fake.state().fail_list.push("/api/v1/services".into());
    let addr = fake.clone().serve(None).await;
    let api = ApiServer::new(&format!("http://{addr}"), None, None).unwrap();
    let opts = Options { backoff_initial: Duration::from_millis(10), backoff_max: Duration::from_millis(80), ..fast() };
    let mut d = spawn(api, opts);
    until_true("six tries", || fake.lists("/api/v1/services").len() >= 6).await;
    let tries: Vec<_> = fake.lists("/api/v1/services").iter().map(|s| s.at).take(6).collect();
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    // Without backoff the gaps would be a few ms; with it 10, 20, 40, 80, 80 ms at least.
    let least = [10, 20, 40, 80, 80].map(Duration::from_millis);
    assert!(gaps.iter().zip(least).all(|(g, l)| *g >= l), "{gaps:?}");
    assert!(gaps[0] < Duration::from_millis(80), "starts small: {gaps:?}");
    assert!(!d.is_ready());
    fake.state().fail_list.clear();
    tokio::time::timeout(WAIT, d.wait_ready()).await.expect("ready once the list succeeds");
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

/// Whether `pod` (lemo-dev) accepts `sa` (lemo-dev) on `port`, by the published model.
fn admits(c: &Cluster, pod: &str, sa: &str, port: u16) -> bool {
    let pod = c.pod("lemo-dev", pod).expect("pod");
    let principal = format!("cluster.local/ns/lemo-dev/sa/{sa}");
    let req = crate::authz::Request {
        source_principal: Some(&principal),
        source_namespace: None,
        source_ip: "10.244.0.10".parse::<std::net::IpAddr>().expect("ip").into(),
        destination_port: port,
    };
    crate::authz::evaluate(&c.authorization_policies_for(pod), &req).is_allow()
}

fn istio_policy(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"namespace": "lemo-dev", "name": name}, "spec": spec})
}

/// Issue 13, "an unenforceable DENY in Kubernetes mode", and the other ways a new policy used
/// to leave its workloads open: an HTTP attribute, an unreadable value, an unknown mode.
#[tokio::test]
async fn new_policies_the_proxy_cannot_apply_in_full_fail_closed() {
    let fake = loaded_fake(&[]);
    let mut d = start(&fake).await;
    until_true("policy watch", || fake.watcher_count("/apis/security.istio.io/v1/authorizationpolicies") > 0).await;
    until_true("peer auth watch", || fake.watcher_count("/apis/security.istio.io/v1/peerauthentications") > 0).await;
    assert!(admits(&d.config.borrow(), "rank-0", "rerank", 50061), "before: rank is open");

    // A DENY with HTTP attributes: applied (not held back) on its L4 part, and reported.
    fake.apply("ADDED", istio_policy("AuthorizationPolicy", "no-admin", json!({
        "selector": {"matchLabels": {"app": "rank"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/lemo-dev/sa/rerank"]}}],
                   "to": [{"operation": {"paths": ["/admin"]}}],
                   "when": [{"key": "request.headers[x-admin]", "values": ["1"]}]}],
    })));
    until(&mut d, "the DENY applied", |c| !admits(c, "rank-0", "rerank", 50061)).await;
    let c = d.config.borrow().clone();
    assert!(admits(&c, "rank-0", "bff", 50061), "another caller is still allowed");
    assert!(d.rejected.borrow().is_empty(), "not held back: {:?}", d.rejected.borrow());
    let warnings: Vec<String> = c.warnings().iter().map(|w| format!("{}: {}", w.object.as_deref().unwrap_or(""), w.field.as_deref().unwrap_or(""))).collect();
    assert_eq!(warnings, ["AuthorizationPolicy lemo-dev/no-admin: rules[0].to[0].operation.paths", "AuthorizationPolicy lemo-dev/no-admin: rules[0].when"]);

    // A new ALLOW that cannot be read (a bad CIDR): held back, and its workload denies all.
    assert!(admits(&c, "rerank-0", "bff", 8090));
    fake.apply("ADDED", istio_policy("AuthorizationPolicy", "rerank", json!({
        "selector": {"matchLabels": {"app": "rerank"}},
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/lemo-dev/sa/bff"], "ipBlocks": ["10.0.0.0/33"]}}]}],
    })));
    until(&mut d, "the broken ALLOW fails closed", |c| !admits(c, "rerank-0", "bff", 8090)).await;
    let rejected = d.rejected.borrow().clone();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].fail_closed);
    assert!(rejected[0].to_string().starts_with("AuthorizationPolicy lemo-dev/rerank rejected (applied as deny-all for what it selects): rules[0].from[0].source.ipBlocks[0]"), "{}", rejected[0]);
    let c = d.config.borrow().clone();
    assert!(admits(&c, "recall-0", "bff", 50051), "other workloads keep their policies");

    // A new PeerAuthentication with a mode that does not exist: STRICT for what it selects.
    // (The sample's namespace policy is STRICT: made PERMISSIVE first.)
    let rerank = pod(&c, "rerank-0").expect("rerank-0");
    fake.apply("MODIFIED", istio_policy("PeerAuthentication", "default", json!({"mtls": {"mode": "PERMISSIVE"}})));
    until(&mut d, "namespace PERMISSIVE", move |c| c.mtls_mode_for(&rerank, 8090) == crate::config::MtlsMode::Permissive).await;
    let rerank = pod(&d.config.borrow(), "rerank-0").expect("rerank-0");
    fake.apply("ADDED", istio_policy("PeerAuthentication", "rerank-open", json!({
        "selector": {"matchLabels": {"app": "rerank"}},
        "mtls": {"mode": "PERMISIVE"},
    })));
    until_true("the broken PeerAuthentication held back", || d.rejected.borrow().len() == 2).await;
    let c = d.config.borrow().clone();
    assert_eq!(c.mtls_mode_for(&rerank, 8090), crate::config::MtlsMode::Strict);
    assert!(c.peer_authentications().any(|p| p.name == "rerank-open" && p.mtls == Some(crate::config::MtlsMode::Strict)));
}

/// EndpointSlices are watched like every other kind: a selector-less Service (as
/// `default/kubernetes`) gets its endpoints from them, with their conditions, and follows
/// their changes and deletion.
#[tokio::test]
async fn endpoint_slices_give_a_selectorless_service_its_endpoints() {
    let fake = loaded_fake(&[]);
    fake.apply("ADDED", json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": "kubernetes"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]},
    }));
    let mut slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["172.30.0.254"], "conditions": {"ready": true}},
            {"addresses": ["172.30.0.253"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ],
    });
    fake.apply("ADDED", slice.clone());
    let mut d = start(&fake).await;
    assert!(!fake.lists("/apis/discovery.k8s.io/v1/endpointslices").is_empty());
    let endpoints = |c: &Cluster| {
        let svc = c.service("default", "kubernetes").expect("the Service");
        assert!(svc.selector.is_none());
        c.endpoints(svc, 443).iter().map(|e| (e.addr.to_string(), e.conditions.ready, e.conditions.terminating)).collect::<Vec<_>>()
    };
    assert_eq!(
        endpoints(&d.config.borrow()),
        [("172.30.0.253:6443".to_string(), false, true), ("172.30.0.254:6443".to_string(), true, false)]
    );

    // The terminating endpoint is gone, a new one is not ready yet.
    slice["endpoints"] = json!([
        {"addresses": ["172.30.0.254"], "conditions": {"ready": true}},
        {"addresses": ["172.30.0.252"], "conditions": {"ready": false, "serving": false, "terminating": false}},
    ]);
    fake.apply("MODIFIED", slice.clone());
    until(&mut d, "the slice change", move |c| {
        endpoints(c) == [("172.30.0.252:6443".to_string(), false, false), ("172.30.0.254:6443".to_string(), true, false)]
    })
    .await;
    fake.apply("DELETED", slice);
    until(&mut d, "no endpoints without the slice", |c| {
        c.service("default", "kubernetes").is_some_and(|svc| c.endpoints(svc, 443).is_empty())
    })
    .await;
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
    let read: BTreeSet<(String, String)> = KINDS
        .iter()
        .chain(super::kinds::REPORTED)
        .map(|r| {
            let group = r.versions[0].rsplit_once('/').map_or("", |(g, _)| g);
            (group.to_string(), r.plural.to_string())
        })
        .collect();
    assert_eq!(granted, read);
}

/// Without a CA (`--insecure-plaintext-tunnels`), a STRICT PeerAuthentication cannot be
/// honoured: Kubernetes mode holds it back like any invalid object, and applies the rest.
#[tokio::test]
async fn without_a_ca_a_strict_peer_authentication_is_held_back() {
    let fake = loaded_fake(&[]);
    let mut d = start_with(&fake, Options { tunnels: crate::config::TunnelMode::Plaintext, ..fast() }).await;
    until_true("peer authentication watch", || fake.watcher_count("/apis/security.istio.io/v1/peerauthentications") > 0).await;
    let ns = ns_name(&fake);
    fake.apply(
        "ADDED",
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"namespace": ns, "name": "strict"},
            "spec": {"mtls": {"mode": "STRICT"}}
        }),
    );
    let expected = format!("PeerAuthentication {ns}/strict rejected (left out): mtls.mode: STRICT cannot be enforced without mutual TLS");
    let held = tokio::time::timeout(WAIT, d.rejected.wait_for(|r| r.iter().any(|o| o.to_string().starts_with(&expected)))).await.is_ok_and(|r| r.is_ok());
    assert!(held, "not held back: {:?}", d.rejected.borrow());
    let strict = |c: &Cluster| c.peer_authentications().any(|p| p.name == "strict");
    assert!(!strict(&d.config.borrow()), "the STRICT object is not applied");
    // A valid change after it still applies.
    let mut namespace = fake.state().objects["/api/v1/namespaces"].values().next().cloned().unwrap();
    namespace["metadata"]["labels"]["extra"] = json!("1");
    fake.apply("MODIFIED", namespace);
    let name = ns_name(&fake);
    until(&mut d, "a valid change applies", move |c| c.namespace(&name).is_some_and(|n| n.labels.contains_key("extra"))).await;
    assert!(!strict(&d.config.borrow()));
}

/// Kinds the mesh does not apply are watched and reported (`Cluster::unapplied`), without
/// holding readiness: the fake serves none of their CRDs at first (404: nothing to report),
/// then a ServiceEntry appears once its CRD is served.
#[tokio::test]
async fn unapplied_kinds_are_reported_and_never_hold_readiness() {
    let fake = loaded_fake(&[]);
    let d = start(&fake).await;
    assert!(d.is_ready(), "ready without any of the reported kinds' CRDs");
    assert!(d.config.borrow().unapplied().is_empty());
    until_true("the ServiceEntry CRD was looked for", || !fake.lists("/apis/networking.istio.io/v1alpha3/serviceentries").is_empty()).await;

    // A cluster with Istio's CRDs: a ServiceEntry and a Gateway exist.
    let fake = loaded_fake(&[]);
    fake.state().objects.insert("/apis/networking.istio.io/v1/serviceentries".into(), Default::default());
    fake.state().objects.insert("/apis/networking.istio.io/v1/gateways".into(), Default::default());
    let ns = ns_name(&fake);
    fake.apply("ADDED", json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"namespace": ns, "name": "payments"},
        "spec": {"hosts": ["api.payments.example"], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}], "resolution": "DNS"}}));
    fake.apply("ADDED", json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"namespace": "istio-system", "name": "ingress"},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": []}}));
    let mut d2 = start(&fake).await;
    until(&mut d2, "both reported", |c| c.unapplied().len() == 2).await;
    let c = d2.config.borrow().clone();
    let se = c.unapplied().iter().find(|u| u.kind == "ServiceEntry").expect("ServiceEntry");
    assert_eq!((se.namespace.as_str(), se.name.as_str(), se.changes_routing), (ns.as_str(), "payments", true));
    assert_eq!(se.message().split(':').next(), Some("not applied by mesh (kind ServiceEntry)"));
    let gw = c.unapplied().iter().find(|u| u.kind == "Gateway").expect("Gateway");
    assert!(!gw.changes_routing);
    // Listed by the admin API's /config_errors.
    let listed = crate::admin::config_errors::not_applied(&c);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert!(listed.to_string().contains("not applied by mesh (kind Gateway)"), "{listed}");
    // Deleted: nothing to report any more.
    let path = "/apis/networking.istio.io/v1/serviceentries";
    let object = fake.state().objects[path].values().next().cloned().unwrap();
    fake.apply_at(path, "DELETED", object);
    until(&mut d2, "the ServiceEntry is gone", |c| c.unapplied().len() == 1).await;
    drop(d);
}
