//! Small writes gathered into one: into a tunnel stream (one HTTP/2 DATA frame), to a pod that
//! speaks HTTP/2, to a client that does.
//!
//! Every write into a tunnel stream becomes its own DATA frame, TLS record and `writev` on this
//! node, and its own read, `sendto` and wake-up of the target pod on the far node. An HTTP/2
//! peer (hyper's and h2's, ours) writes a request or an answer as several small pieces: the
//! HEADERS frame when it starts, the body's DATA frame (split in two where the stream cannot
//! take vectored writes) and the END_STREAM frame or trailers from the body's own task a moment
//! later, each followed by a flush. Measured on the L7 pair's gRPC requests: four tunnel frames,
//! four TLS writes here and four `sendto` to the pod on the far node per request, and two
//! writes of each answer to the client.
//!
//! [`Gather`] in [`Mode::Hold`] takes writes into a buffer (vectored writes whole) and holds a
//! flush back while the scheduler has other work: the flush wakes its own task and returns
//! `Pending`, so tasks already runnable (the body's) add their frames first; it waits again
//! while each turn brings more, up to [`MAX_HOLDS`] turns, then sends everything as one write.
//! No timer: nothing waits for bytes that are not already on their way. Writes of
//! [`PASS_THROUGH`] bytes or more skip the buffer (bulk data is not copied twice). A tunnel
//! stream itself only merges
//! ([`Mode::Merge`]): a vectored write (HTTP/1.1 headers and body) leaves as one frame, and an
//! L4 pipe's reads go straight through, neither copied nor held.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this large go straight to the stream; smaller ones are gathered up to it.
pub const PASS_THROUGH: usize = 16 * 1024;

/// Buffer capacity kept between writes; a larger one is freed once sent, so ten thousand quiet
/// connections that once gathered a large answer do not hold 16 KiB each.
const KEEP: usize = 4 * 1024;

/// Turns a flush may wait while each brings more to send.
const MAX_HOLDS: u8 = 3;

/// How much a [`Gather`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every call goes straight to the stream.
    Off,
    /// A vectored write leaves as one write at the next flush; a single piece written with
    /// nothing gathered goes straight through (an L4 pipe's reads are not copied again).
    Merge,
    /// Everything small is gathered, and a flush waits while the scheduler has other work (the
    /// pieces of an HTTP/2 request or answer).
    Hold,
}

#[derive(Debug)]
pub struct Gather<IO> {
    inner: IO,
    buf: Vec<u8>,
    /// Turns the current flush has waited, and how much was gathered at the last.
    held: u8,
    held_len: usize,
    mode: Mode,
}

impl<IO> Gather<IO> {
    /// One type for every mode: the serving code is generic over its stream, and a copy of it
    /// per stream type would cost resident code.
    pub fn new(inner: IO, mode: Mode) -> Self {
        Self { inner, buf: Vec::new(), held: 0, held_len: 0, mode }
    }
}

impl<IO: AsyncWrite + Unpin> Gather<IO> {
    /// Writes out everything gathered.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.drain(..n);
        }
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gather<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gather<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.mode == Mode::Off || (this.mode == Mode::Merge && this.buf.is_empty()) {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        Pin::new(this).poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let pieces = bufs.iter().filter(|b| !b.is_empty()).count();
        if this.mode == Mode::Off || (this.mode == Mode::Merge && this.buf.is_empty() && pieces <= 1) {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        loop {
            let mut taken = 0;
            for b in bufs.iter().filter(|b| !b.is_empty()) {
                if this.buf.len() + b.len() > PASS_THROUGH {
                    break;
                }
                this.buf.extend_from_slice(b);
                taken += b.len();
            }
            if taken > 0 {
                return Poll::Ready(Ok(taken));
            }
            let Some(first) = bufs.iter().find(|b| !b.is_empty()) else { return Poll::Ready(Ok(0)) };
            if !this.buf.is_empty() {
                // What is gathered goes first; then this write is looked at again.
                ready!(this.poll_send(cx))?;
                continue;
            }
            return Pin::new(&mut this.inner).poll_write(cx, first);
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.mode != Mode::Off || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() {
            let hold = this.held == 0 || (this.buf.len() > this.held_len && this.held < MAX_HOLDS);
            if this.mode == Mode::Hold && hold {
                this.held += 1;
                this.held_len = this.buf.len();
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_send(cx))?;
        }
        this.held = 0;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records each write it is given (one tunnel DATA frame each).
    #[derive(Clone, Default)]
    struct Frames(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Frames {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Frames {
        fn taken(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    /// Frames queued for the connection (as h2 queues them per stream), and who waits for them.
    #[derive(Default)]
    struct Queue {
        frames: std::collections::VecDeque<Vec<u8>>,
        body_done: bool,
        conn: Option<std::task::Waker>,
    }

    #[tokio::test]
    async fn frames_queued_by_another_task_in_the_same_turn_leave_in_one_write() {
        let frames = Frames::default();
        let queue = Arc::new(Mutex::new(Queue::default()));
        queue.lock().unwrap().frames.push_back(b"HEADERS".to_vec());
        // The connection's task, as h2 drives it: write out every queued frame, flush, and
        // again until the body is done.
        let conn = {
            let (queue, mut g) = (queue.clone(), Gather::new(frames.clone(), Mode::Hold));
            tokio::spawn(std::future::poll_fn(move |cx| {
                loop {
                    let next = queue.lock().unwrap().frames.pop_front();
                    let Some(frame) = next else { break };
                    let n = ready!(Pin::new(&mut g).poll_write(cx, &frame)).unwrap();
                    assert_eq!(n, frame.len());
                }
                ready!(Pin::new(&mut g).poll_flush(cx)).unwrap();
                let mut q = queue.lock().unwrap();
                if q.body_done && q.frames.is_empty() {
                    return Poll::Ready(());
                }
                q.conn = Some(cx.waker().clone());
                Poll::Pending
            }))
        };
        // The body's task, already runnable: DATA and END_STREAM.
        let body = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut q = queue.lock().unwrap();
                let mut data = b"DATA-HEAD".to_vec();
                data.extend([7; 1029]);
                q.frames.extend([data, b"END".to_vec()]);
                q.body_done = true;
                if let Some(w) = q.conn.take() {
                    w.wake();
                }
            })
        };
        conn.await.unwrap();
        body.await.unwrap();
        let written = frames.taken();
        let mut want = b"HEADERSDATA-HEAD".to_vec();
        want.extend([7; 1029]);
        want.extend(b"END");
        assert_eq!(written, vec![want], "three frames from two tasks, one write");
    }

    #[tokio::test]
    async fn a_vectored_write_is_taken_whole() {
        let frames = Frames::default();
        let mut g = Gather::new(frames.clone(), Mode::Hold);
        let n = g.write_vectored(&[IoSlice::new(b"frame head"), IoSlice::new(&[3; 1029])]).await.unwrap();
        assert_eq!(n, 10 + 1029);
        g.flush().await.unwrap();
        assert_eq!(frames.taken().len(), 1);
    }

    #[tokio::test]
    async fn a_flush_sends_everything_and_large_writes_pass_through() {
        let frames = Frames::default();
        let mut g = Gather::new(frames.clone(), Mode::Hold);
        g.write_all(b"a").await.unwrap();
        g.write_all(b"b").await.unwrap();
        assert!(frames.taken().is_empty(), "nothing sent before a flush");
        g.flush().await.unwrap();
        assert_eq!(frames.taken(), vec![b"ab".to_vec()], "one write after the flush");
        // Large: gathered bytes first, then the large write as it is.
        g.write_all(b"head").await.unwrap();
        let big = vec![9u8; PASS_THROUGH * 2];
        g.write_all(&big).await.unwrap();
        g.flush().await.unwrap();
        assert_eq!(frames.taken(), vec![b"head".to_vec(), big], "gathered, then the large write untouched");
        // Shutdown sends what is left.
        g.write_all(b"tail").await.unwrap();
        g.shutdown().await.unwrap();
        assert_eq!(frames.taken(), vec![b"tail".to_vec()]);
    }

    #[tokio::test]
    async fn gathering_stops_at_the_pass_through_size() {
        let frames = Frames::default();
        let mut g = Gather::new(frames.clone(), Mode::Hold);
        let piece = vec![1u8; PASS_THROUGH / 3 + 1];
        for _ in 0..3 {
            g.write_all(&piece).await.unwrap();
        }
        g.flush().await.unwrap();
        let written = frames.taken();
        assert_eq!(written.iter().map(Vec::len).collect::<Vec<_>>(), vec![2 * piece.len(), piece.len()]);
        assert!(g.buf.capacity() <= KEEP, "a large buffer is not kept once sent");
    }

    #[tokio::test]
    async fn merging_joins_a_vectored_write_and_passes_single_pieces_straight_through() {
        let frames = Frames::default();
        let mut g = Gather::new(frames.clone(), Mode::Merge);
        // An L4 pipe's read: straight through, before any flush.
        g.write_all(b"piece").await.unwrap();
        assert_eq!(frames.taken(), vec![b"piece".to_vec()]);
        // HTTP/1.1 headers and body in one vectored write: one write at the flush, which does
        // not wait.
        let n = g.write_vectored(&[IoSlice::new(b"POST / HTTP/1.1\r\n\r\n"), IoSlice::new(b"body")]).await.unwrap();
        assert_eq!(n, 23);
        assert!(frames.taken().is_empty());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut g).poll_flush(&mut cx).is_ready(), "a merging flush sends at once");
        assert_eq!(frames.taken(), vec![b"POST / HTTP/1.1\r\n\r\nbody".to_vec()]);
    }
}
