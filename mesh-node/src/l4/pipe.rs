//! The byte pump of an L4 connection: copies both ways until both sides are done, with
//! half-close preserved (one side's EOF shuts the other side's write half, the reverse keeps
//! flowing), and ends pipes idle for too long.
//!
//! Each direction starts with a small buffer ([`PIPE_BUFFER`]) and grows to [`LARGE_BUFFER`]
//! while its reads keep filling it, if the node-wide allowance for large buffers has room. Why:
//! a bulk transfer through two proxies is bound by per-chunk work (one syscall per read and write,
//! one HTTP/2 DATA frame and one `writev` of TLS records per chunk, a wake-up per chunk), and 16
//! KiB chunks made it half as fast as 256 KiB ones on the overhead bench's VM; but ten thousand
//! quiet connections must not hold 512 KiB each. The allowance
//! ([`set_large_allowance_from_budget`]) bounds what all grown buffers take together, and a
//! direction whose reads stay small gives its large buffer back.
use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Every direction's first buffer: what an open pipe holds per direction (the memory budget's
/// connection caps count two).
pub const PIPE_BUFFER: usize = 16 * 1024;

/// A direction's buffer while it moves bulk data.
pub const LARGE_BUFFER: usize = 256 * 1024;

/// Reads smaller than [`PIPE_BUFFER`] in a row after which a large buffer is given back.
const SHRINK_AFTER_SMALL_READS: u32 = 16;

/// Bytes all large buffers of the node proxy may take together.
static LARGE_ALLOWANCE: AtomicUsize = AtomicUsize::new(12 << 20);
static LARGE_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// A sixteenth of the memory budget goes to large pipe buffers (12 MiB, 48 buffers, at the
/// default 192 MiB), between one and 32 MiB.
pub fn set_large_allowance_from_budget(budget_bytes: u64) {
    let allowance = (budget_bytes / 16).clamp(1 << 20, 32 << 20);
    LARGE_ALLOWANCE.store(allowance as usize, Ordering::Relaxed);
}

/// Bytes of large buffers in use now.
#[cfg(test)]
fn large_in_use() -> usize {
    LARGE_IN_USE.load(Ordering::Relaxed)
}

/// A share of the large-buffer allowance, returned on drop.
struct Grant;

impl Grant {
    fn try_take() -> Option<Grant> {
        let limit = LARGE_ALLOWANCE.load(Ordering::Relaxed);
        LARGE_IN_USE.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used + LARGE_BUFFER <= limit).then_some(used + LARGE_BUFFER)).ok().map(|_| Grant)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        LARGE_IN_USE.fetch_sub(LARGE_BUFFER, Ordering::AcqRel);
    }
}

/// Copies both ways until both sides are done. A pipe with no byte in either direction for
/// [`IDLE_TIMEOUT`] (Istio's TCP `idleTimeout` default) ends with `TimedOut`, so idle
/// connections do not hold their buffers forever.
pub async fn pipe<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pipe_with_idle(a, b, IDLE_TIMEOUT).await
}

/// Istio's default `connectionPool.tcp.idleTimeout`: one hour.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

async fn pipe_with_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let seen = Activity::default();
    let (mut a_to_b, mut b_to_a) = (Direction::new(), Direction::new());
    let copy = std::future::poll_fn(|cx| {
        let forward = a_to_b.poll(cx, &mut *a, &mut *b, &seen)?;
        let back = b_to_a.poll(cx, &mut *b, &mut *a, &seen)?;
        Poll::Ready(Ok((ready!(forward), ready!(back))))
    });
    let mut copy = std::pin::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = copy.as_mut() => return r,
            _ = tokio::time::sleep(check) => {
                if seen.idle_for() >= idle {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no bytes either way for {idle:?}")));
                }
            }
        }
    }
}

/// One direction of a pipe: read into the buffer, write it all out, again until EOF, then shut
/// the writer down.
struct Direction {
    buf: Box<[u8]>,
    /// Written up to `pos` of the `cap` bytes read.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    shut_down: bool,
    amount: u64,
    /// Whether the last read filled the whole buffer (more is likely waiting).
    filled: bool,
    small_reads: u32,
    large: Option<Grant>,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0; PIPE_BUFFER].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            shut_down: false,
            amount: 0,
            filled: false,
            small_reads: 0,
            large: None,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W, seen: &Activity) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.shut_down {
            return Poll::Ready(Ok(self.amount));
        }
        loop {
            // Read while the buffer has room: a write that cannot proceed still lets the next
            // chunk come in behind it.
            if !self.read_done && self.cap < self.buf.len() {
                match self.poll_fill(cx, reader, seen) {
                    Poll::Ready(r) => r?,
                    Poll::Pending if self.pos == self.cap => {
                        // Nothing to write and nothing to read: push out what the writer holds.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            while self.pos < self.cap {
                let n = loop {
                    match Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.cap]) {
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Poll::Ready(r) => break r?,
                        Poll::Pending => {
                            if !self.read_done && self.cap < self.buf.len() {
                                ready!(self.poll_fill(cx, reader, seen))?;
                                continue;
                            }
                            return Poll::Pending;
                        }
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::WriteZero, "the other side accepts no more bytes")));
                }
                self.pos += n;
                self.amount += n as u64;
                self.need_flush = true;
            }
            // All written: the buffer is empty again, and the moment to change its size.
            self.pos = 0;
            self.cap = 0;
            self.resize();
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.shut_down = true;
                self.release();
                return Poll::Ready(Ok(self.amount));
            }
        }
    }

    fn poll_fill<R: AsyncRead + Unpin + ?Sized>(&mut self, cx: &mut Context<'_>, reader: &mut R, seen: &Activity) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::new(&mut self.buf);
        buf.set_filled(self.cap);
        loop {
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        let filled = buf.filled().len();
        let read = filled - self.cap;
        if read == 0 {
            self.read_done = true;
        } else {
            seen.touch();
            self.filled = filled == self.buf.len();
            self.small_reads = if read < PIPE_BUFFER { self.small_reads.saturating_add(1) } else { 0 };
        }
        self.cap = filled;
        Poll::Ready(Ok(()))
    }

    /// With the buffer empty: grow it after a read that filled it, give a large one back after
    /// a run of small reads.
    fn resize(&mut self) {
        if self.large.is_none() && self.filled {
            if let Some(grant) = Grant::try_take() {
                self.buf = vec![0; LARGE_BUFFER].into_boxed_slice();
                self.large = Some(grant);
            }
        } else if self.large.is_some() && self.small_reads >= SHRINK_AFTER_SMALL_READS {
            self.release();
        }
    }

    fn release(&mut self) {
        if self.large.take().is_some() {
            self.buf = vec![0; PIPE_BUFFER].into_boxed_slice();
        }
        self.small_reads = 0;
        self.filled = false;
    }
}

/// When a pipe last moved a byte (milliseconds since it started).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn an_idle_pipe_ends_and_a_busy_one_does_not() {
        let (mut a, mut a_far) = tokio::io::duplex(1024);
        let (mut b, mut b_far) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(300);
        let pump = tokio::spawn(async move { pipe_with_idle(&mut a, &mut b, idle).await });
        // Bytes every 100 ms for a second: the pipe stays up.
        for _ in 0..10 {
            a_far.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            b_far.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!pump.is_finished(), "a busy pipe was cut");
        // Then nothing: it ends within about the idle time.
        let r = tokio::time::timeout(Duration::from_secs(2), pump).await.expect("the idle pipe ended").unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    /// A pattern that shows misordered, lost or repeated bytes.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) as u8 ^ seed).collect()
    }

    /// The tests that look at the node-wide allowance take turns.
    static ALLOWANCE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn bulk_both_ways_arrives_intact_with_half_close_and_the_large_buffers_come_back() {
        let _turn = ALLOWANCE.lock().await;
        let (mut a, a_far) = tokio::io::duplex(512 * 1024);
        let (mut b, b_far) = tokio::io::duplex(512 * 1024);
        let pump = tokio::spawn(async move { pipe(&mut a, &mut b).await });
        let (up, down) = (pattern(8 << 20, 7), pattern(3 << 20, 11));
        let (up2, down2) = (up.clone(), down.clone());
        let (mut a_read, mut a_write) = tokio::io::split(a_far);
        let (mut b_read, mut b_write) = tokio::io::split(b_far);
        let sender_a = tokio::spawn(async move {
            a_write.write_all(&up2).await.unwrap();
            a_write.shutdown().await.unwrap();
        });
        let sender_b = tokio::spawn(async move {
            for chunk in down2.chunks(1000) {
                b_write.write_all(chunk).await.unwrap();
            }
            b_write.shutdown().await.unwrap();
        });
        let mut got_b = Vec::new();
        let mut got_a = Vec::new();
        let (r1, r2) = tokio::join!(b_read.read_to_end(&mut got_b), a_read.read_to_end(&mut got_a));
        r1.unwrap();
        r2.unwrap();
        sender_a.await.unwrap();
        sender_b.await.unwrap();
        assert!(got_b == up, "a -> b: {} bytes, {} sent", got_b.len(), up.len());
        assert!(got_a == down, "b -> a: {} bytes, {} sent", got_a.len(), down.len());
        let (n_ab, n_ba) = pump.await.unwrap().unwrap();
        assert_eq!((n_ab, n_ba), (up.len() as u64, down.len() as u64));
        assert_eq!(large_in_use(), 0, "every large buffer is given back when the pipe ends");
    }

    #[tokio::test]
    async fn a_full_read_grows_the_buffer_within_the_allowance_and_small_reads_shrink_it() {
        let _turn = ALLOWANCE.lock().await;
        let (mut reader, mut feed) = tokio::io::duplex(1 << 20);
        let mut sink = tokio::io::sink();
        let seen = Activity::default();
        let mut d = Direction::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // More than a small buffer waiting: the first read fills it, and the buffer grows.
        feed.write_all(&vec![1u8; 3 * PIPE_BUFFER]).await.unwrap();
        assert!(d.poll(&mut cx, &mut reader, &mut sink, &seen).is_pending());
        assert_eq!(d.buf.len(), LARGE_BUFFER, "grown after a full read");
        assert_eq!(d.amount, 3 * PIPE_BUFFER as u64);
        // Then only small reads: given back after a run of them.
        for _ in 0..SHRINK_AFTER_SMALL_READS {
            feed.write_all(b"tiny").await.unwrap();
            assert!(d.poll(&mut cx, &mut reader, &mut sink, &seen).is_pending());
        }
        assert_eq!(d.buf.len(), PIPE_BUFFER, "shrunk after small reads");
        assert!(d.large.is_none());
    }
}
