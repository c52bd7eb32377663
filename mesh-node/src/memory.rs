//! Giving freed memory back to the node. glibc's malloc keeps what a burst of connections freed
//! in its arenas (it returns only the top of each heap, and only of the main arena on its own),
//! so after an attack or a load spike the proxy would sit at its peak resident size for good. A
//! background task compares the resident memory with what the allocator has in use and, when
//! the difference grew past a threshold, trims it.
use std::time::Duration;

use tracing::debug;

/// How often the allocator's free memory is looked at.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Free memory the allocator may keep before it is asked to give it back: enough that a proxy
/// under steady load is not trimmed over and over for the same few pages.
pub const TRIM_THRESHOLD: usize = 4 << 20;

/// What the allocator hands out now (arena blocks in use plus its own mmapped blocks).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's own statistics.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn in_use() -> usize {
    0
}

/// The process's resident anonymous memory (resident minus file-backed pages), from
/// `/proc/self/statm`.
pub fn resident_anonymous() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1).map(|f| f.parse::<usize>().ok());
    let (resident, shared) = (fields.next()??, fields.next()??);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    Some(resident.saturating_sub(shared) * page)
}

/// Resident memory the allocator does not account as in use: freed blocks it still holds, plus
/// what is not the allocator's at all (thread stacks), which stays about the same.
pub fn slack() -> Option<usize> {
    Some(resident_anonymous()?.saturating_sub(in_use()))
}

/// Returns the allocator's free pages to the kernel; true if any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim is safe to call at any time from any thread.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

/// Trims whenever the slack grew by more than [`TRIM_THRESHOLD`] since the last trim. Measured
/// against what the last trim left, not against zero: freed blocks stay counted free in the
/// allocator after their pages went back, so "free bytes" alone would trim on every tick.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut baseline = slack().unwrap_or(0);
        loop {
            tick.tick().await;
            let Some(now) = slack() else { continue };
            if now > baseline + TRIM_THRESHOLD {
                let returned = trim();
                let after = slack().unwrap_or(now);
                debug!(slack_before = now, slack_after = after, returned, "allocator trimmed");
                baseline = after;
            } else {
                baseline = baseline.min(now);
            }
        }
    })
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_shows_as_free_and_trimming_returns_it() {
        // Many mid-sized blocks (below the mmap threshold, so they live in the arena), then all
        // but the last freed: the last pins the heap's top, so only a trim can return the rest.
        let blocks: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; 64 * 1024]).collect();
        let mut blocks = blocks;
        let pin = blocks.pop();
        drop(blocks);
        let before = slack().expect("statm");
        assert!(before >= 16 << 20, "32 MiB freed, but only {before} bytes resident beyond what is in use");
        assert!(trim(), "malloc_trim returned nothing with {before} bytes of slack");
        let after = slack().expect("statm");
        assert!(after + (16 << 20) <= before, "trimmed, the slack went from {before} only to {after} bytes");
        drop(pin);
    }
}
