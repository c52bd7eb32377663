//! The CA's view of the cluster: which service accounts have pods on which node, from Pods
//! alone (the CA's RBAC allows listing pods and nothing else it would need the full model
//! for). A kube-runtime reflector store keeps the typed k8s-openapi Pods.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
use tokio::sync::{Notify, watch};

use super::watcher::{gone_at_watch_start, log_error, stream};
use super::{ApiServer, Options};

/// Service accounts of the running pods, per node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeAccounts {
    /// node -> (namespace, service account)
    by_node: HashMap<String, BTreeSet<(String, String)>>,
    pods: usize,
}

impl NodeAccounts {
    /// Whether a pod running `namespace`/`service_account` is scheduled on `node`.
    pub fn has(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.by_node
            .get(node)
            .is_some_and(|set| set.contains(&(namespace.to_string(), service_account.to_string())))
    }

    /// Pods counted (scheduled, with an IP, not finished).
    pub fn pods(&self) -> usize {
        self.pods
    }

    fn from_pods<'a>(pods: impl Iterator<Item = &'a Pod>) -> NodeAccounts {
        let mut out = NodeAccounts::default();
        for pod in pods {
            let text = |s: Option<&'a String>| s.map(String::as_str).filter(|s| !s.is_empty());
            let spec = pod.spec.as_ref();
            let status = pod.status.as_ref();
            let (Some(node), Some(namespace)) = (text(spec.and_then(|s| s.node_name.as_ref())), text(pod.metadata.namespace.as_ref()))
            else {
                continue;
            };
            // Not running yet (no IP) or finished (its IP may be reused): not a workload.
            if text(status.and_then(|s| s.pod_ip.as_ref())).is_none()
                || matches!(text(status.and_then(|s| s.phase.as_ref())), Some("Succeeded" | "Failed"))
            {
                continue;
            }
            // The API server fills serviceAccountName in at admission; "default" is what it
            // would fill in, for objects written without admission.
            let account = text(spec.and_then(|s| s.service_account_name.as_ref())).unwrap_or("default");
            out.by_node.entry(node.to_string()).or_default().insert((namespace.to_string(), account.to_string()));
            out.pods += 1;
        }
        out
    }
}

/// A live [`NodeAccounts`], kept current by list + watch of Pods.
#[derive(Clone)]
pub struct PodIndex {
    accounts: watch::Receiver<Arc<NodeAccounts>>,
    ready: watch::Receiver<bool>,
}

impl PodIndex {
    /// True once Pods have been listed.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for the first list; false if the index stopped first.
    pub async fn wait_ready(&mut self) -> bool {
        self.ready.wait_for(|r| *r).await.is_ok()
    }

    pub fn current(&self) -> Arc<NodeAccounts> {
        self.accounts.borrow().clone()
    }
}

/// Lists and watches Pods. The tasks stop when every clone of the returned index is dropped.
/// Must be called inside a Tokio runtime.
pub fn spawn_pod_index(api: ApiServer, opts: Options) -> PodIndex {
    let (tx, rx) = watch::channel(Arc::new(NodeAccounts::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let (store, writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let reflector = tokio::spawn(reflect(api, writer, changed.clone(), opts.clone()));
    tokio::spawn(async move {
        let _abort_on_drop = AbortOnDrop(reflector);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = changed.notified() => {}
            }
            tokio::time::sleep(opts.debounce).await;
            let Some(accounts) = listed(&store) else { continue };
            tracing::debug!(pods = accounts.pods(), nodes = accounts.by_node.len(), "pod index updated");
            tx.send_replace(Arc::new(accounts));
            ready_tx.send_replace(true);
        }
    });
    PodIndex { accounts: rx, ready: ready_rx }
}

/// The accounts of `store`'s pods; `None` before its first complete list.
fn listed(store: &Store<Pod>) -> Option<NodeAccounts> {
    // The store is ready from the first list's end on (it never becomes unready again).
    futures::FutureExt::now_or_never(store.wait_until_ready()).and_then(Result::ok)?;
    let pods = store.state();
    Some(NodeAccounts::from_pods(pods.iter().map(AsRef::as_ref)))
}

/// Keeps `writer`'s store current from the Pods watcher (what kube-runtime's `reflector`
/// does, plus a new watcher when a watch is refused with HTTP 410), telling `changed` after
/// each event.
async fn reflect(api: ApiServer, mut writer: Writer<Pod>, changed: Arc<Notify>, opts: Options) {
    let client = loop {
        match api.client() {
            Ok(client) => break client,
            Err(e) => {
                tracing::error!(kind = "Pod", "{e}");
                tokio::time::sleep(opts.backoff_max).await;
            }
        }
    };
    loop {
        let pods: Api<Pod> = Api::all(client.clone());
        let mut events = std::pin::pin!(stream(pods, &opts));
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    changed.notify_one();
                }
                Err(e) if gone_at_watch_start(&e) => {
                    tracing::info!(kind = "Pod", "watch refused with 410 Gone; listing again");
                    break;
                }
                Err(e) => log_error("Pod", "v1", &e),
            }
        }
        tokio::time::sleep(opts.backoff_initial).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::discovery::fake_api::Fake;

    const PODS: &str = "/api/v1/pods";
    const WAIT: Duration = Duration::from_secs(10);

    fn pod(name: &str, node: &str, account: &str, ip: Option<&str>) -> Value {
        let mut status = json!({"phase": "Running"});
        if let Some(ip) = ip {
            status["podIP"] = json!(ip);
        }
        json!({
            "metadata": {"namespace": "demo", "name": name},
            "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "app"}]},
            "status": status,
        })
    }

    async fn until(index: &PodIndex, what: &str, f: impl Fn(&NodeAccounts) -> bool) {
        let mut rx = index.accounts.clone();
        let ok = tokio::time::timeout(WAIT, rx.wait_for(|a| f(a))).await;
        assert!(matches!(ok, Ok(Ok(_))), "timed out waiting for: {what}");
    }

    /// The CA's index follows Pods through a 410 (event after compaction, and HTTP 410 on the
    /// watch request), counting only pods that run (scheduled, with an IP).
    #[tokio::test]
    async fn pod_index_follows_pods_through_relists() {
        let fake = Fake::serving(&[PODS]);
        fake.apply_at(PODS, "ADDED", pod("a", "node-a", "web", Some("10.0.0.1")));
        fake.apply_at(PODS, "ADDED", pod("b", "node-b", "db", Some("10.0.0.2")));
        fake.apply_at(PODS, "ADDED", pod("pending", "node-a", "batch", None));
        let addr = fake.clone().serve(None).await;
        let api = ApiServer::new(&format!("http://{addr}"), None, None).expect("api");
        let opts = Options { debounce: Duration::from_millis(10), backoff_initial: Duration::from_millis(10), ..Options::default() };
        let mut index = spawn_pod_index(api, opts);
        assert!(tokio::time::timeout(WAIT, index.wait_ready()).await.expect("ready in time"));
        let now = index.current();
        assert_eq!(now.pods(), 2, "{now:?}");
        assert!(now.has("node-a", "demo", "web") && now.has("node-b", "demo", "db"));
        assert!(!now.has("node-a", "demo", "batch"), "no IP yet: not running");

        // Removed while the watch was down and the history compacted: ERROR 410, relist.
        fake.change_unseen(PODS, |pods| {
            pods.remove("demo/b");
        });
        fake.close_watches(PODS);
        until(&index, "b gone", |a| !a.has("node-b", "demo", "db")).await;

        // The watch request itself refused with 410 (history not compacted, so only a relist
        // can show the pod stored without an event): relisted too.
        let lists = fake.lists(PODS).len();
        {
            let mut st = fake.state();
            st.refuse_watch_gone.push(PODS.into());
            st.objects.get_mut(PODS).expect("pods").insert("demo/c".into(), pod("c", "node-b", "cache", Some("10.0.0.3")));
        }
        fake.close_watches(PODS);
        until(&index, "c seen", |a| a.has("node-b", "demo", "cache")).await;
        assert!(fake.lists(PODS).len() > lists);
    }
}
