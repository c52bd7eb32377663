//! Keeps the live config current: polls the directory and publishes a new
//! snapshot only when the changed files load cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::cluster::Cluster;
use super::load;
use super::tunnels::TunnelMode;

/// Polls `dir` every `poll` and publishes each valid change.
///
/// Change detection hashes file names and contents. A poll reads the files only when
/// their [`load::Stamp`] (names, inodes, sizes, times) moved, when a file was written
/// shortly before the last read (file times are too coarse to tell quick successive edits
/// apart), or when [`READ_AT_LEAST_EVERY`] has passed. The polls run on a thread of their
/// own, which sleeps between them, so a poll that finds nothing wakes no runtime worker: on
/// an idle process the polls are most of its CPU. A change that fails validation is logged
/// once, problem by problem, and the last good snapshot stays live. The thread ends when
/// every receiver is dropped.
pub fn spawn_watcher(
    dir: PathBuf,
    initial: Arc<Cluster>,
    poll: Duration,
) -> std::io::Result<watch::Receiver<Arc<Cluster>>> {
    spawn_watcher_in(dir, initial, poll, TunnelMode::MutualTls)
}

/// Like [`spawn_watcher`], validating each change for tunnels secured as `mode` says (without
/// a CA, a change that adds policy needing peer identities is rejected).
pub fn spawn_watcher_in(
    dir: PathBuf,
    initial: Arc<Cluster>,
    poll: Duration,
    mode: TunnelMode,
) -> std::io::Result<watch::Receiver<Arc<Cluster>>> {
    // Last input we acted on, good or bad, so a bad edit is reported once.
    let mut seen = initial.fingerprint();
    let (tx, rx) = watch::channel(initial);
    std::thread::Builder::new().name("config-watch".into()).spawn(move || {
        let mut read = LastRead::default();
        loop {
            std::thread::sleep(poll);
            if tx.is_closed() {
                return;
            }
            let now = (Instant::now(), SystemTime::now());
            let stamp = load::stamp(&dir);
            if !read.needed(stamp, now.0) {
                continue;
            }
            // A config that makes the loader panic is one more rejected config: the watcher
            // lives on, and tries again when the files change.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&dir, seen, mode)));
            // What was read is what the stamp, taken first, describes, or newer.
            let stamp = if matches!(outcome, Ok(Poll::Rejected { fingerprint: None, .. })) { None } else { stamp };
            read = LastRead { stamp, at: Some(now) };
            let Ok(outcome) = outcome else {
                tracing::error!("config reload panicked; keeping the last good config");
                continue;
            };
            match outcome {
                Poll::Unchanged => {}
                Poll::Reloaded(cluster) => {
                    seen = cluster.fingerprint();
                    tracing::info!(
                        pods = cluster.pods().count(),
                        services = cluster.services().count(),
                        "config reloaded"
                    );
                    for w in cluster.warnings() {
                        tracing::warn!("applied more restrictively than written: {w}");
                    }
                    if tx.send(cluster).is_err() {
                        return;
                    }
                }
                Poll::Rejected {
                    fingerprint,
                    problems,
                } => {
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
            }
        }
    })?;
    Ok(rx)
}

/// A file written less than this long before the last read may have been written again
/// after it within the same tick of the file-time clock, leaving the same stamp: such files
/// are read again until a read comes this long after their newest time (file times on some
/// filesystems have a granularity of seconds).
const RACY: Duration = Duration::from_secs(2);
/// The files are read at least this often whatever their stamp says.
const READ_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// The stamp of the files the watcher last read, and when it read them by both clocks
/// (file times are wall-clock times).
#[derive(Debug, Clone, Copy, Default)]
struct LastRead {
    stamp: Option<load::Stamp>,
    at: Option<(Instant, SystemTime)>,
}

impl LastRead {
    /// Whether the files must be read again, given their stamp now (`None`: they could not
    /// be looked at).
    fn needed(&self, now_stamp: Option<load::Stamp>, now: Instant) -> bool {
        let (Some(stamp), Some(last), Some((at, wall))) = (now_stamp, self.stamp, self.at) else {
            return true;
        };
        // A file time after the read (or in the future, the clock set back) is not settled.
        let settled = wall.duration_since(stamp.newest).is_ok_and(|age| age >= RACY);
        stamp.hash != last.hash || !settled || now.duration_since(at) >= READ_AT_LEAST_EVERY
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_again_unless_their_stamp_held_and_had_settled_before_the_last_read() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let stamp = |hash, written_before_read: Duration| Some(load::Stamp { hash, newest: wall - written_before_read });
        let last = LastRead { stamp: stamp(1, Duration::from_secs(5)), at: Some((t0, wall)) };
        let soon = t0 + Duration::from_millis(200);
        assert!(!last.needed(stamp(1, Duration::from_secs(5)), soon), "unchanged and settled");
        assert!(last.needed(stamp(2, Duration::from_secs(5)), soon), "the stamp moved");
        assert!(last.needed(None, soon), "the directory could not be looked at");
        assert!(last.needed(stamp(1, Duration::from_secs(5)), t0 + READ_AT_LEAST_EVERY), "read at least every 30 s");
        assert!(LastRead::default().needed(stamp(1, Duration::from_secs(5)), soon), "never read");
        // Written within RACY before the last read: a second write in the same tick of the
        // file clock would leave the same stamp, so read until a read comes after it settled.
        let racy = LastRead { stamp: stamp(1, Duration::from_millis(500)), at: Some((t0, wall)) };
        assert!(racy.needed(stamp(1, Duration::from_millis(500)), soon));
        let after_the_read = LastRead { stamp: Some(load::Stamp { hash: 1, newest: wall + Duration::from_secs(1) }), at: Some((t0, wall)) };
        assert!(after_the_read.needed(after_the_read.stamp, soon), "a file time after the read, or in the future");
    }
}
