//! The CA's view of the cluster: which service accounts have pods on which node, from Pods
//! alone (the CA's RBAC allows listing pods and nothing else it would need the full model
//! for). A kube-runtime reflector keeps the typed k8s-openapi Pods.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use tokio::sync::{Notify, watch};

use super::watcher::{log_error, stream};
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

/// Runs the reflector into `writer`, telling `changed` after each event.
async fn reflect(api: ApiServer, writer: reflector::store::Writer<Pod>, changed: Arc<Notify>, opts: Options) {
    let client = loop {
        match api.client() {
            Ok(client) => break client,
            Err(e) => {
                tracing::error!(kind = "Pod", "{e}");
                tokio::time::sleep(opts.backoff_max).await;
            }
        }
    };
    let pods: Api<Pod> = Api::all(client);
    let mut events = std::pin::pin!(reflector::reflector(writer, stream(pods, &opts)));
    while let Some(event) = events.next().await {
        match event {
            Ok(_) => changed.notify_one(),
            Err(e) => log_error("Pod", "v1", &e),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
