//! Giving freed memory back to the node. glibc's malloc keeps what a burst of connections freed
//! in its arenas (it returns only the top of each heap, and only of the main arena on its own),
//! so after an attack or a load spike the proxy would sit at its peak resident size for good. A
//! background task compares the resident memory with what the allocator has in use and, when
//! the difference grew past a threshold, trims it.
//!
//! The same goes for code. Start-up runs code from all over the binary (argument parsing, the
//! YAML and Kubernetes types, the BPF loader, certificate requests) and the kernel maps code
//! 64 KiB around every page first touched, so an idle proxy would keep most of its `.text`
//! resident for good although it never runs it again. Once start-up is over, and again when
//! something rare (a config reload) brought megabytes of it back, the program's read-only pages
//! are unmapped from the process (they stay in the page cache, shared and reclaimable) and what
//! runs again comes back on first use.
use std::time::{Duration, Instant};

use tracing::debug;

/// How often the allocator's free memory is looked at.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Free memory the allocator may keep before it is asked to give it back: enough that a proxy
/// under steady load is not trimmed over and over for the same few pages.
pub const TRIM_THRESHOLD: usize = 4 << 20;

/// Code is released when the trimmer starts (the proxy is ready: config, capture and listeners
/// are up) and once more this long after: what ran once more around the first requests (the
/// certificates of the node's pods, TLS and pool set-up) is over by then.
pub const CODE_RELEASE_AGAIN_AFTER: Duration = Duration::from_secs(15);
/// After that, code is released again when the resident file pages grew by more than this over
/// what the proxy settled at after the last release: a config reload runs the parsing code
/// again (4-10 MiB of it with fault-around), a steady load does not grow it.
pub const CODE_GROWTH_THRESHOLD: usize = 2 << 20;

/// When to release code again: the decision of one trimmer tick.
#[derive(Debug, Default)]
struct CodeReleases {
    done: u32,
    /// Resident file bytes one tick after the last release (what runs kept coming back);
    /// `None` until that tick.
    settled: Option<usize>,
}

impl CodeReleases {
    /// Whether to release now, given the time since start and the resident file bytes.
    fn due(&mut self, since_start: Duration, resident_file: usize) -> bool {
        let due = self.done == 0
            || (self.done == 1 && since_start >= CODE_RELEASE_AGAIN_AFTER)
            || self.settled.is_some_and(|settled| resident_file > settled + CODE_GROWTH_THRESHOLD);
        if due {
            self.done += 1;
            self.settled = None;
        } else if self.settled.is_none() {
            self.settled = Some(resident_file);
        }
        due
    }
}

/// Arenas glibc may create. Every thread that allocates gets one of its own, up to 8 per core,
/// and each keeps the free memory at the top of its heap: the config is parsed on blocking
/// threads, so a large config left a few MiB resident in each of a dozen arenas after it was
/// gone. Two are enough for one worker and the threads that load config.
pub const ARENA_MAX: i32 = 2;
/// Blocks of this size and more are mapped on their own and unmapped when freed (a config file's
/// text, a parse of thousands of objects). Fixing it also stops glibc raising it (and the trim
/// threshold with it, to twice as much) each time such a block is freed, which is what let
/// arenas keep megabytes at their tops; 1 MiB keeps the pipes' 256 KiB buffers in the arenas.
pub const MMAP_THRESHOLD: i32 = 1 << 20;
/// Free memory at the top of an arena beyond this goes back to the kernel when a block is freed.
/// `malloc_trim` cannot do it for the arenas of threads other than the main one (it returns free
/// blocks inside them but not their top), so it must happen on free.
pub const ARENA_TOP_KEPT: i32 = 1 << 20;

/// Sets the allocator's limits above; call before other threads start. Returns false if glibc
/// refused one (the defaults then stay for it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; these three are documented.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, ARENA_TOP_KEPT) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() -> bool {
    true
}

/// `/proc/self/statm`'s resident and shared (file-backed and shared-memory) sizes, in bytes.
fn statm() -> Option<(usize, usize)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut fields = statm.split_whitespace().skip(1).map(|f| f.parse::<usize>().ok());
    let (resident, shared) = (fields.next()??, fields.next()??);
    Some((resident * page_size(), shared * page_size()))
}

/// Resident file-backed (and shared-memory) bytes of this process.
fn resident_file() -> Option<usize> {
    statm().map(|(_, shared)| shared)
}

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
    statm().map(|(resident, shared)| resident.saturating_sub(shared))
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
        let started = Instant::now();
        let mut code = CodeReleases::default();
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut baseline = slack().unwrap_or(0);
        loop {
            tick.tick().await;
            if let Some(file) = resident_file()
                && code.due(started.elapsed(), file)
            {
                let bytes = release_code();
                debug!(bytes, resident_file = file, releases = code.done, "code released");
            }
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

/// Unmaps the resident pages of every never-written segment of the program and of the libraries
/// it loaded from files (code, read-only data, unwind tables); what runs again comes back on
/// its first use (with the kernel's fault-around: `MADV_RANDOM` does not turn that off on
/// recent kernels, measured, so it is not asked for). Returns the bytes of address space
/// covered. Writable segments (data, the relocated read-only data after RELRO) are left alone:
/// their pages are private copies that would revert to the file's contents.
#[cfg(target_os = "linux")]
pub fn release_code() -> usize {
    use std::ffi::{CStr, c_int, c_void};

    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _size: usize, covered: *mut c_void) -> c_int {
        // SAFETY: the loader hands a valid entry for the duration of the call; `covered` is the
        // usize passed to dl_iterate_phdr below.
        let (info, covered) = unsafe { (&*info, &mut *covered.cast::<usize>()) };
        let name = if info.dlpi_name.is_null() { &b""[..] } else { unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes() };
        // The program itself (no name) and libraries from files; not the vDSO.
        if !(name.is_empty() || name.starts_with(b"/")) || info.dlpi_phdr.is_null() {
            return 0;
        }
        let page = page_size();
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers of a loaded object.
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let segments: Vec<(usize, usize)> = headers
            .iter()
            .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0)
            .map(|h| {
                let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
                // Whole pages inside the segment only: a page shared with a writable neighbour
                // stays.
                (start.next_multiple_of(page), (start + h.p_memsz as usize) & !(page - 1))
            })
            .filter(|(start, end)| end > start)
            .collect();
        for (start, end) in segments {
            let (addr, len) = (start as *mut c_void, end - start);
            // SAFETY: [start, end) lies inside a loaded, never-written, file-backed segment:
            // dropping its pages loses nothing, the next access reads them again.
            if unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } == 0 {
                *covered += len;
            }
        }
        0
    }

    let mut covered = 0usize;
    // SAFETY: `each` matches the callback signature and only touches `covered`.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut covered).cast()) };
    covered
}

#[cfg(not(target_os = "linux"))]
pub fn release_code() -> usize {
    0
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1)
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

    /// The allocator's parameters are process-wide and the other tests' allocations move the
    /// resident size, so the check runs in a process of its own: this test binary again, asked
    /// for this one test.
    #[test]
    fn a_threads_freed_memory_goes_back_without_a_trim() {
        const CHILD: &str = "MESH_MEMORY_TEST_CHILD";
        let name = "memory::tests::a_threads_freed_memory_goes_back_without_a_trim";
        if std::env::var_os(CHILD).is_none() {
            let exe = std::env::current_exe().expect("test binary");
            let out = std::process::Command::new(exe).args(["--exact", name, "--test-threads=1", "--nocapture"]).env(CHILD, "1").output().expect("run");
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        if std::env::var_os("MESH_MEMORY_TEST_UNTUNED").is_none() {
            assert!(tune_allocator(), "glibc refused the limits");
        }
        let before = resident_anonymous().expect("statm");
        // A config load on a blocking thread: the file's text (a block of its own), then
        // thousands of small objects, all freed when the thread is done with them. Freeing the
        // text first is what raised glibc's own thresholds past the rest.
        std::thread::spawn(|| {
            let text = vec![b'y'; 4 << 20];
            let objects: Vec<Box<[u8; 240]>> = (0..24_000).map(|i| Box::new([i as u8; 240])).collect();
            drop(text);
            drop(objects);
        })
        .join()
        .expect("thread");
        let after = resident_anonymous().expect("statm");
        let kept = after.saturating_sub(before);
        println!("resident anonymous memory {before} -> {after} bytes");
        assert!(kept < 2 << 20, "the thread freed about 6 MiB, but {kept} bytes of it stayed resident");
    }

    #[test]
    fn code_is_released_at_start_after_15_s_and_when_it_grew_past_where_it_settled() {
        let mut c = CodeReleases::default();
        let s = Duration::from_secs;
        let mib = |n: usize| n << 20;
        assert!(c.due(s(0), mib(10)), "at start");
        assert!(!c.due(s(5), mib(2)), "settles at 2 MiB");
        assert!(!c.due(s(10), mib(3)), "1 MiB of growth is not enough");
        assert!(c.due(s(15), mib(3)), "15 s after the start");
        assert!(!c.due(s(20), mib(3)), "settles at 3 MiB");
        assert!(!c.due(s(25), mib(5)), "a steady working set");
        assert!(!c.due(s(300), mib(5)));
        assert!(c.due(s(305), mib(7)), "a config reload brought the parser back");
        assert!(!c.due(s(310), mib(3)), "settles again");
        assert!(!c.due(s(315), mib(5)));
        assert_eq!(c.done, 3);
    }

    #[test]
    fn released_code_goes_out_of_the_resident_set_and_still_runs() {
        let before = resident_file().expect("statm");
        let covered = release_code();
        assert!(covered > 1 << 20, "only {covered} bytes of code and read-only data covered");
        let after = resident_file().expect("statm");
        assert!(after < before, "file-backed resident pages went from {before} to {after}");
        // Code and read-only data come back on use: formatting, allocation and the test's own
        // code all ran from released pages.
        let text = format!("{:?}", (0..100).map(|i| i * 3).collect::<Vec<u32>>());
        assert!(text.ends_with("297]"), "{text}");
    }
}
