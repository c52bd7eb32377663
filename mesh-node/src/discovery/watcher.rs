//! One kind's list + watch, by kube-runtime's watcher: a paginated list (`limit`/`continue`),
//! then a watch from the list's resourceVersion with bookmarks; a closed watch resumes from
//! the last resourceVersion seen (an event's or a bookmark's), a 410 Gone (as a watch ERROR
//! event, or on an expired `continue` token) lists again, and every failure is retried after
//! an exponential, jittered backoff. This module adds what the mesh needs on top: the
//! fallback through a kind's API versions (Istio CRDs are served at different versions by
//! different releases) and "not served at all" as an empty kind, so a node becomes ready
//! without the CRDs.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::{ResetTimerBackoff, StreamBackoff};
use kube::runtime::watcher::{self, Event, ExponentialBackoff};
use serde_json::Value;

use super::api::chain;
use super::kinds::Kind;
use super::store::Shared;
use super::{ApiServer, Options};

/// The watcher settings of `opts`: pages of `page_size`, bookmarks, `timeoutSeconds`.
fn config(opts: &Options) -> watcher::Config {
    let timeout = u32::try_from(opts.watch_timeout.as_secs().max(1)).unwrap_or(u32::MAX);
    watcher::Config::default().page_size(opts.page_size).timeout(timeout)
}

/// Doubling from `backoff_initial` up to `backoff_max`, with jitter so many nodes do not
/// retry in step; starts over after a quiet `backoff_max` x 4.
///
/// Not kube-runtime's `default_backoff`: its delays are fixed (and its jitter is dropped), and
/// `StreamBackoff` resets a backoff on every `Ok` item, while the watcher yields `Ok(Init)`
/// before each list attempt, so a list failing again and again would be retried at the
/// initial delay forever. This one ignores those resets; only the quiet period resets it.
pub(crate) struct Backoff(ResetTimerBackoff<ExponentialBackoff>);

impl Backoff {
    fn new(opts: &Options) -> Backoff {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(opts.backoff_initial)
            .with_max_delay(opts.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff(ResetTimerBackoff::new(ExponentialBackoff::from(builder), opts.backoff_max.saturating_mul(4)))
    }
}

impl Iterator for Backoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        self.0.next()
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {}
}

/// The watcher of `api` with the mesh's settings and backoff.
pub(crate) fn stream<K>(api: Api<K>, opts: &Options) -> StreamBackoff<impl Stream<Item = watcher::Result<Event<K>>>, Backoff>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config(opts)).backoff(Backoff::new(opts))
}

/// Logs a watcher error at the level it deserves: a 410 is routine (history compacted, the
/// watcher lists again), anything else is a failure retried after the backoff.
pub(crate) fn log_error(kind: &str, api_version: &str, e: &watcher::Error) {
    match e {
        watcher::Error::WatchError(status) if status.code == 410 => {
            tracing::info!(kind, api_version, "resourceVersion expired (410 Gone); listing again");
        }
        watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 410 => {
            tracing::info!(kind, api_version, "list continue token expired (410 Gone); listing again from the start");
        }
        other => tracing::warn!(kind, api_version, "list/watch failed (retrying after a backoff): {}", chain(other)),
    }
}

/// The status of an error answer to a list or watch request. kube-rs does not check a watch
/// response's HTTP status: an error answer surfaces as a `WatchFailed` item with its Status.
fn answered(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

/// Whether `e` says the kind is not served at this version (CRD missing or removed, or
/// served at another version).
fn not_served(e: &watcher::Error) -> bool {
    answered(e) == Some(404)
}

/// A watch request refused with HTTP 410 (rather than the usual ERROR event): kube-runtime
/// would retry the watch from the same expired resourceVersion forever, so the caller starts a
/// new watcher, which lists first.
pub(crate) fn gone_at_watch_start(e: &watcher::Error) -> bool {
    !matches!(e, watcher::Error::InitialListFailed(_)) && answered(e) == Some(410)
}

/// Keeps `kind`'s objects in `shared`, forever (the task is aborted to stop).
pub(crate) async fn run(api: ApiServer, kind: Kind, shared: Arc<Shared>, opts: Options) {
    loop {
        let client = match api.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(kind = kind.kind, "{e}");
                tokio::time::sleep(opts.backoff_max).await;
                continue;
            }
        };
        for &version in kind.versions {
            watch_version(client.clone(), kind, version, &shared, &opts).await;
            tracing::debug!(kind = kind.kind, api_version = version, "not served; trying the next version");
        }
        // Treat as empty so the node can become ready without the CRDs; look again later
        // in case they get installed.
        let paths: Vec<String> = kind.versions.iter().map(|v| kind.path(v)).collect();
        tracing::warn!(kind = kind.kind, ?paths, "not served by the API server (CRD not installed?); treating as empty");
        shared.replace(kind.kind, kind.plural, kind.versions[0], Vec::new());
        tokio::time::sleep(opts.backoff_max).await;
    }
}

/// Like [`run`], for a kind the mesh only reports (`kinds::REPORTED`): its CRD missing (404)
/// is nothing to report, looked at again every few minutes rather than at `backoff_max`, and
/// readiness never waits for it. A refused list (403: the ServiceAccount may not read the
/// kind) is retried after the usual backoff and reports nothing meanwhile.
pub(crate) async fn run_reported(api: ApiServer, kind: Kind, shared: Arc<Shared>, opts: Options) {
    const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_secs(300);
    loop {
        let client = match api.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(kind = kind.kind, "{e}");
                tokio::time::sleep(opts.backoff_max).await;
                continue;
            }
        };
        for &version in kind.versions {
            watch_version(client.clone(), kind, version, &shared, &opts).await;
        }
        tracing::debug!(kind = kind.kind, "not served (CRD not installed): nothing to report");
        shared.replace(kind.kind, kind.plural, kind.versions[0], Vec::new());
        tokio::time::sleep(opts.backoff_max.max(LOOK_AGAIN)).await;
    }
}

/// Runs the watcher of `kind` at `version` into `shared`; returns when that version is not
/// served (404).
async fn watch_version(client: kube::Client, kind: Kind, version: &'static str, shared: &Shared, opts: &Options) {
    loop {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource(version));
        let mut events = std::pin::pin!(stream(api, opts));
        // A (re)list in progress: the objects of its pages so far.
        let mut listing: Option<Vec<Value>> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => listing = Some(Vec::new()),
                Ok(Event::InitApply(object)) => listing.get_or_insert_default().extend(to_value(kind, object)),
                Ok(Event::InitDone) => {
                    let items = listing.take().unwrap_or_default();
                    tracing::debug!(kind = kind.kind, api_version = version, count = items.len(), "listed");
                    shared.replace(kind.kind, kind.plural, version, items);
                }
                Ok(Event::Apply(object)) => {
                    if let Some(object) = to_value(kind, object) {
                        shared.upsert(kind.kind, kind.plural, version, object);
                    }
                }
                Ok(Event::Delete(object)) => {
                    if let Some(object) = to_value(kind, object) {
                        shared.delete(kind.plural, &object);
                    }
                }
                Err(e) if not_served(&e) => return,
                Err(e) if gone_at_watch_start(&e) => {
                    tracing::info!(kind = kind.kind, api_version = version, "watch refused with 410 Gone; listing again");
                    break;
                }
                Err(e) => log_error(kind.kind, version, &e),
            }
        }
        // The watcher ended (it does not on its own): after a pause, a new one.
        tokio::time::sleep(opts.backoff_initial).await;
    }
}

/// The object as the JSON the API server sent (the model's decoding reads it as file mode
/// does); kube's `DynamicObject` keeps every field.
fn to_value(kind: Kind, object: DynamicObject) -> Option<Value> {
    match serde_json::to_value(&object) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(kind = kind.kind, name = ?object.metadata.name, "cannot re-encode the object: {e}");
            None
        }
    }
}
