//! Kubernetes API discovery: builds the same [`Cluster`] model file mode
//! builds, from list + watch on the API server instead of a directory.
//!
//! One reflector per kind (`reflector`) keeps a store of objects (`store`);
//! after any change (debounced) the stores are rendered into one document per
//! object and validated by [`Cluster::from_yaml_files`], so validation is
//! exactly file mode's. A model that fails validation is logged and the last
//! good one stays live. Ready means every kind has been listed once and a
//! model has been published.
//!
//! The protocol is spoken directly over hyper (`client`) rather than through
//! kube-rs: it needs only GET, and the crates already in the tree suffice.

mod client;
mod reflector;
mod store;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use client::ApiServer;

use crate::config::Cluster;
use store::Shared;

/// Tunables; the defaults suit a real cluster, tests shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// Quiet time after a change before the model is rebuilt.
    pub debounce: Duration,
    /// First retry delay after a failed list or watch; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `timeoutSeconds` asked of the server for each watch.
    pub watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            debounce: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(290),
        }
    }
}

/// The running discovery: the model channel (same type as
/// [`crate::config::spawn_watcher`]'s) and readiness.
pub struct Discovery {
    pub config: watch::Receiver<Arc<Cluster>>,
    ready: watch::Receiver<bool>,
}

impl Discovery {
    /// True once every kind has been listed and a valid model published.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for readiness; false if discovery stopped first.
    pub async fn wait_ready(&mut self) -> bool {
        self.ready.wait_for(|r| *r).await.is_ok()
    }
}

/// Starts one reflector per kind and the model builder. Everything stops
/// when every receiver of `Discovery::config` is dropped. Must be called
/// inside a Tokio runtime.
pub fn spawn(api: ApiServer, opts: Options) -> Discovery {
    let (tx, rx) = watch::channel(Arc::new(Cluster::default()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let api = Arc::new(api);
    let shared = Arc::new(Shared::default());
    let mut reflectors = JoinSet::new();
    for res in reflector::RESOURCES {
        reflectors.spawn(reflector::run(api.clone(), *res, shared.clone(), opts.clone()));
    }
    let kinds: Vec<&'static str> = reflector::RESOURCES.iter().map(|r| r.plural).collect();
    tokio::spawn(async move {
        // Owned here so the reflectors are aborted when this task ends.
        let _reflectors = reflectors;
        let mut seen: Option<u64> = None;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = shared.changed.notified() => {}
            }
            // Debounce: let a burst of events (a list, a rollout) settle.
            tokio::time::sleep(opts.debounce).await;
            let Some(docs) = shared.documents(&kinds) else { continue };
            let fingerprint = store::fingerprint(&docs);
            if seen == Some(fingerprint) {
                continue;
            }
            seen = Some(fingerprint);
            let built = tokio::task::spawn_blocking(move || {
                Cluster::from_yaml_files(docs.iter().map(|(n, t)| (n.as_str(), t.as_str())))
            })
            .await;
            match built {
                Ok(Ok(cluster)) => {
                    tracing::info!(
                        pods = cluster.pods().count(),
                        services = cluster.services().count(),
                        "cluster model updated from the API server"
                    );
                    if tx.send(Arc::new(cluster)).is_err() {
                        return;
                    }
                    ready_tx.send_replace(true);
                }
                Ok(Err(e)) => {
                    tracing::error!(
                        count = e.problems().len(),
                        "cluster objects rejected; keeping the last good model"
                    );
                    for problem in e.problems() {
                        tracing::error!("{problem}");
                    }
                }
                Err(e) => tracing::error!("model build task failed: {e}"),
            }
        }
    });
    Discovery {
        config: rx,
        ready: ready_rx,
    }
}
