//! The CA's view of the cluster: which service accounts have pods on which
//! node, from Pods alone (the CA's RBAC allows listing pods and nothing else
//! it would need the full model for).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use super::reflector::{self, Resource};
use super::store::Shared;
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

    fn from_pods<'a>(pods: impl Iterator<Item = &'a Value>) -> NodeAccounts {
        let mut out = NodeAccounts::default();
        for pod in pods {
            let text = |p: &str| pod.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty());
            let (Some(node), Some(namespace)) = (text("/spec/nodeName"), text("/metadata/namespace")) else {
                continue;
            };
            // The API server fills serviceAccountName in at admission; "default" is what it
            // would fill in, for objects written without admission.
            let account = text("/spec/serviceAccountName").unwrap_or("default");
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

/// Lists and watches Pods. The tasks stop when every clone of the returned
/// index is dropped. Must be called inside a Tokio runtime.
pub fn spawn_pod_index(api: ApiServer, opts: Options) -> PodIndex {
    let res: Resource = *reflector::RESOURCES.iter().find(|r| r.kind == "Pod").expect("Pod is a discovered kind");
    let (tx, rx) = watch::channel(Arc::new(NodeAccounts::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let reflector = tokio::spawn(reflector::run(Arc::new(api), res, shared.clone(), opts.clone()));
    tokio::spawn(async move {
        let _abort_on_drop = AbortOnDrop(reflector);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = shared.changed.notified() => {}
            }
            tokio::time::sleep(opts.debounce).await;
            let Some(accounts) = shared.read(res.plural, |pods| NodeAccounts::from_pods(pods.values())) else {
                continue;
            };
            tracing::debug!(pods = accounts.pods(), nodes = accounts.by_node.len(), "pod index updated");
            tx.send_replace(Arc::new(accounts));
            ready_tx.send_replace(true);
        }
    });
    PodIndex { accounts: rx, ready: ready_rx }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
