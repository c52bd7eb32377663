//! Keeps the live config current: polls the directory and publishes a new
//! snapshot only when the changed files load cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::cluster::Cluster;
use super::load;
use super::tunnels::TunnelMode;

/// Polls `dir` every `poll` and publishes each valid change.
///
/// Change detection hashes file names and contents (mtimes can be too coarse
/// for quick successive edits). A change that fails validation is logged
/// once, problem by problem, and the last good snapshot stays live. The task
/// ends when every receiver is dropped. Must be called inside a Tokio runtime.
pub fn spawn_watcher(
    dir: PathBuf,
    initial: Arc<Cluster>,
    poll: Duration,
) -> watch::Receiver<Arc<Cluster>> {
    spawn_watcher_in(dir, initial, poll, TunnelMode::MutualTls)
}

/// Like [`spawn_watcher`], validating each change for tunnels secured as `mode` says (without
/// a CA, a change that adds policy needing peer identities is rejected).
pub fn spawn_watcher_in(
    dir: PathBuf,
    initial: Arc<Cluster>,
    poll: Duration,
    mode: TunnelMode,
) -> watch::Receiver<Arc<Cluster>> {
    let last_good = initial.fingerprint();
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(poll);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Last input we acted on, good or bad, so a bad edit is reported once.
        let mut seen = last_good;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = ticks.tick() => {}
            }
            let dir = dir.clone();
            let outcome = tokio::task::spawn_blocking(move || poll_once(&dir, seen, mode)).await;
            match outcome {
                Ok(Poll::Unchanged) => {}
                Ok(Poll::Reloaded(cluster)) => {
                    seen = cluster.fingerprint();
                    tracing::info!(
                        pods = cluster.pods().count(),
                        services = cluster.services().count(),
                        "config reloaded"
                    );
                    if tx.send(cluster).is_err() {
                        return;
                    }
                }
                Ok(Poll::Rejected {
                    fingerprint,
                    problems,
                }) => {
                    if let Some(fp) = fingerprint {
                        seen = fp;
                    }
                    tracing::error!(
                        count = problems.len(),
                        "config change rejected; keeping the last good config"
                    );
                    for problem in problems {
                        tracing::error!("{problem}");
                    }
                }
                Err(e) => tracing::error!("config reload task failed: {e}"),
            }
        }
    });
    rx
}

enum Poll {
    Unchanged,
    Reloaded(Arc<Cluster>),
    /// `fingerprint` is `None` when the files could not even be read; then
    /// the next poll retries.
    Rejected {
        fingerprint: Option<u64>,
        problems: Vec<String>,
    },
}

/// Reads once and builds from the same bytes, so what is fingerprinted is
/// exactly what is validated.
fn poll_once(dir: &std::path::Path, seen: u64, mode: TunnelMode) -> Poll {
    let sources = match load::read_sources(dir) {
        Ok(sources) => sources,
        Err(problems) => {
            return Poll::Rejected {
                fingerprint: None,
                problems: problems.iter().map(ToString::to_string).collect(),
            };
        }
    };
    let fingerprint = load::fingerprint(&sources);
    if fingerprint == seen {
        return Poll::Unchanged;
    }
    match Cluster::from_sources_in(&sources, mode) {
        Ok(cluster) => Poll::Reloaded(Arc::new(cluster)),
        Err(e) => Poll::Rejected {
            fingerprint: Some(fingerprint),
            problems: e.problems().to_vec(),
        },
    }
}
