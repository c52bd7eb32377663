//! Kubernetes API discovery: builds the same [`Cluster`] model file mode
//! builds, from list + watch on the API server instead of a directory.
//!
//! The API is spoken by kube-rs: `api` turns the flags (in-cluster, `--api-server`,
//! kubeconfig) into a [`kube::Config`] and one shared [`kube::Client`]; `watcher` runs one
//! kube-runtime watcher per kind (`kinds`: pagination, bookmarks, 410 relists, backoff,
//! token file reloads are kube-rs's), adding the fallback through a kind's API versions and
//! "not served" as empty. Each kind's objects are kept in a store (`store`); after any change
//! (debounced) the stores are rendered into one document per object and built with file
//! mode's decoding and checks, object by object ([`PerObjectBuilder`]): an invalid object is
//! logged at warn and held back (at its last good version when there was one), everything
//! else is applied. Ready means every kind has been listed once and a model has been
//! published.
//!
//! `pods` is the CA's smaller view: which service accounts run on which node, from Pods
//! alone, in a kube-runtime reflector of typed Pods.

mod api;
mod cli;
mod kinds;
mod pods;
mod store;
mod watcher;

#[cfg(test)]
pub(crate) mod fake_api;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use api::{ApiError, ApiServer, SERVICE_ACCOUNT_DIR, TOKEN_FILE_RELOAD};
pub use cli::ApiArgs;
pub use pods::{NodeAccounts, PodIndex, spawn_pod_index};

use crate::config::{Cluster, PerObjectBuilder, RejectedObject, TunnelMode};
use store::Shared;

/// Tunables; the defaults suit a real cluster, tests shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// Quiet time after a change before the model is rebuilt.
    pub debounce: Duration,
    /// First retry delay after a failed list or watch; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `timeoutSeconds` asked of the server for each list and watch.
    pub watch_timeout: Duration,
    /// Objects per list page (`limit`; the server hands a `continue` token for the rest).
    pub page_size: u32,
    /// How this node's tunnels are secured: without a CA, objects needing peer identities are
    /// held back.
    pub tunnels: TunnelMode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            debounce: Duration::from_millis(100),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(290),
            // client-go's page size.
            page_size: 500,
            tunnels: TunnelMode::MutualTls,
        }
    }
}

/// The running discovery: the model channel (same type as
/// [`crate::config::spawn_watcher`]'s), what is held back, and readiness.
pub struct Discovery {
    pub config: watch::Receiver<Arc<Cluster>>,
    /// The objects the last build held back, with their problems.
    pub rejected: watch::Receiver<Arc<Vec<RejectedObject>>>,
    ready: watch::Receiver<bool>,
    rejections: Arc<AtomicU64>,
    held_back: watch::Receiver<Arc<Vec<HeldBack>>>,
}

/// An object the model is built without (or with its last good version), and since when:
/// what the admin API shows.
#[derive(Clone, Debug)]
pub struct HeldBack {
    pub rejected: RejectedObject,
    /// The first build of the current run of builds that held it back (a new problem with an
    /// object that is already held back does not reset it).
    pub since: SystemTime,
}

/// What the admin API reads of discovery: cheap to clone, outlives nothing.
#[derive(Clone, Debug)]
pub struct HeldBackView {
    held_back: watch::Receiver<Arc<Vec<HeldBack>>>,
    rejections: Arc<AtomicU64>,
}

impl HeldBackView {
    /// A view of a fixed list (tests of the admin API).
    pub fn fixed(held_back: Vec<HeldBack>, rejections_total: u64) -> Self {
        let (tx, rx) = watch::channel(Arc::new(held_back));
        // The last value stays readable after the sender is gone.
        drop(tx);
        Self { held_back: rx, rejections: Arc::new(AtomicU64::new(rejections_total)) }
    }

    /// The objects the last build held back.
    pub fn current(&self) -> Arc<Vec<HeldBack>> {
        self.held_back.borrow().clone()
    }

    /// See [`Discovery::rejections_total`].
    pub fn rejections_total(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
}

impl Discovery {
    /// True once every kind has been listed and a model published.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for readiness; false if discovery stopped first.
    pub async fn wait_ready(&mut self) -> bool {
        self.ready.wait_for(|r| *r).await.is_ok()
    }

    /// How many times an object was held back since start (each new problem
    /// with an object counts once, however many builds it survives). Also
    /// added to `mesh_config_errors_total`.
    pub fn rejections_total(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }

    /// The held-back objects with their first-seen times, for the admin API.
    pub fn held_back_view(&self) -> HeldBackView {
        HeldBackView { held_back: self.held_back.clone(), rejections: self.rejections.clone() }
    }
}

/// Starts one watcher per kind and the model builder. Everything stops
/// when every receiver of `Discovery::config` is dropped. Must be called
/// inside a Tokio runtime.
pub fn spawn(api: ApiServer, opts: Options) -> Discovery {
    let (tx, rx) = watch::channel(Arc::new(Cluster::default()));
    let (rejected_tx, rejected_rx) = watch::channel(Arc::new(Vec::new()));
    let (held_back_tx, held_back_rx) = watch::channel(Arc::new(Vec::new()));
    let (ready_tx, ready_rx) = watch::channel(false);
    let rejections = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared::default());
    let mut watchers = JoinSet::new();
    for kind in kinds::KINDS {
        watchers.spawn(watcher::run(api.clone(), *kind, shared.clone(), opts.clone()));
    }
    // Kinds the mesh only reports; readiness never waits for them (`kinds` below).
    for kind in kinds::REPORTED {
        watchers.spawn(watcher::run_reported(api.clone(), *kind, shared.clone(), opts.clone()));
    }
    let kinds: Vec<&'static str> = kinds::KINDS.iter().map(|k| k.plural).collect();
    let counter = rejections.clone();
    tokio::spawn(async move {
        // Owned here so the watchers are aborted when this task ends.
        let _watchers = watchers;
        let mut seen: Option<u64> = None;
        let mut builder = PerObjectBuilder::for_tunnels(opts.tunnels);
        let mut reported = Reported::default();
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
                let built = builder.build(docs.iter().map(|(n, t)| (n.as_str(), t.as_str())));
                (builder, built)
            })
            .await;
            let built = match built {
                Ok((b, built)) => {
                    builder = b;
                    built
                }
                Err(e) => {
                    // The builder's memory of last good objects went with the task: start over.
                    tracing::error!("model build task failed: {e}");
                    builder = PerObjectBuilder::for_tunnels(opts.tunnels);
                    seen = None;
                    continue;
                }
            };
            reported = report(&built.rejected, &built.other, built.cluster.warnings(), reported, &counter);
            tracing::info!(
                pods = built.cluster.pods().count(),
                services = built.cluster.services().count(),
                held_back = built.rejected.len(),
                "cluster model updated from the API server"
            );
            if tx.send(Arc::new(built.cluster)).is_err() {
                return;
            }
            let now = SystemTime::now();
            let held_back = built.rejected.iter().map(|r| HeldBack { rejected: r.clone(), since: reported.since.get(&r.object).copied().unwrap_or(now) }).collect();
            held_back_tx.send_replace(Arc::new(held_back));
            rejected_tx.send_replace(Arc::new(built.rejected));
            ready_tx.send_replace(true);
        }
    });
    Discovery { config: rx, rejected: rejected_rx, ready: ready_rx, rejections, held_back: held_back_rx }
}

/// What the previous build reported, so each problem is logged once.
#[derive(Default)]
struct Reported {
    /// Rendered problems.
    lines: BTreeSet<String>,
    /// `Kind namespace/name` of the objects held back.
    objects: BTreeSet<String>,
    /// Since when each of them has been held back without interruption.
    since: BTreeMap<String, SystemTime>,
}

/// Logs each problem the first build it appears in (warn: the rest of the
/// config is applied), and when an object that was held back is accepted
/// again. Returns what this build reported, for the next call.
fn report(
    rejected: &[RejectedObject],
    other: &[crate::config::Problem],
    warnings: &[crate::config::Problem],
    previous: Reported,
    counter: &AtomicU64,
) -> Reported {
    let mut now = Reported::default();
    for r in rejected {
        let line = r.to_string();
        if !previous.lines.contains(&line) {
            counter.fetch_add(1, Ordering::Relaxed);
            // The same Prometheus counter file mode's rejected reloads go to
            // (`mesh_config_errors_total` on :15020).
            crate::telemetry::mesh_metrics::CONFIG_ERRORS.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(object = %r.object, kept_previous = r.kept_previous, "{line}");
        }
        now.lines.insert(line);
        now.objects.insert(r.object.clone());
        let since = previous.since.get(&r.object).copied().unwrap_or_else(SystemTime::now);
        now.since.insert(r.object.clone(), since);
    }
    for p in other {
        let line = p.to_string();
        if !previous.lines.contains(&line) {
            tracing::warn!("{line}");
        }
        now.lines.insert(line);
    }
    for p in warnings {
        let line = format!("applied more restrictively than written: {p}");
        if !previous.lines.contains(&line) {
            tracing::warn!("{line}");
        }
        now.lines.insert(line);
    }
    for object in previous.objects.difference(&now.objects) {
        tracing::info!(object = %object, "object accepted again (or deleted)");
    }
    now
}

#[cfg(test)]
mod held_back_tests {
    use super::*;
    use crate::config::Problem;

    fn rejected(object: &str, message: &str) -> RejectedObject {
        let problem = Problem { file: String::new(), location: None, object: None, field: Some("spec".into()), message: message.into() };
        RejectedObject { object: object.into(), problems: vec![problem], kept_previous: true, fail_closed: false }
    }

    /// `since` is when an object started being held back: it survives later builds (even with
    /// a different problem), and starts over once the object was accepted in between.
    #[test]
    fn held_back_since_is_kept_across_builds_and_reset_after_acceptance() {
        let counter = AtomicU64::new(0);
        let dr = "DestinationRule demo/echo";
        let first = report(&[rejected(dr, "bad")], &[], &[], Reported::default(), &counter);
        let since = first.since[dr];
        std::thread::sleep(Duration::from_millis(5));
        let again = report(&[rejected(dr, "worse")], &[], &[], first, &counter);
        assert_eq!(again.since[dr], since, "still held back: same since");
        assert_eq!(counter.load(Ordering::Relaxed), 2, "each new problem counts once");
        let accepted = report(&[], &[], &[], again, &counter);
        assert!(accepted.since.is_empty());
        std::thread::sleep(Duration::from_millis(5));
        let back = report(&[rejected(dr, "bad")], &[], &[], accepted, &counter);
        assert!(back.since[dr] > since, "held back anew");
    }
}
