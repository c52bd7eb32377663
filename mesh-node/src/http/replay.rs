//! A request body that can be sent again: retries replay what the first attempt already read.
//!
//! Frames are pulled from the client lazily (so streaming requests, e.g. gRPC client streams,
//! flow without waiting for the end) and kept in a bounded buffer. Every reader, whatever
//! attempt it belongs to, reads the buffer first and then pulls more from the client, appending
//! what it pulls; so attempts stay consistent even if an abandoned attempt is still being
//! polled. Once the buffer limit is passed the body is no longer replayable and retries stop.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Envoy's default per-request buffer limit for retries is 1 MiB (per_request_buffer_limit).
pub const DEFAULT_LIMIT: usize = 1 << 20;

/// Bytes all requests of the node proxy may hold for replay at once. Istio's default retry
/// policy gives every route one, so without a node-wide bound 1 MiB uploads that never finish
/// would each pin 1 MiB (384 of them took a proxy to 374 MiB in `cargo xtask bench abuse`).
/// Past it a request streams on unbuffered: it is forwarded, only no longer retried.
static BUDGET: AtomicU64 = AtomicU64::new(48 << 20);
static BUFFERED: AtomicU64 = AtomicU64::new(0);
/// Requests that stopped buffering because the node-wide budget was spent.
pub static BUDGET_EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// Sets the node-wide replay budget (from `--memory-budget-mib`), before serving.
pub fn set_budget(bytes: u64) {
    BUDGET.store(bytes, Ordering::Relaxed);
}

/// Takes `n` bytes of the node-wide budget, if they are left.
fn reserve(n: usize) -> bool {
    let n = n as u64;
    let limit = BUDGET.load(Ordering::Relaxed);
    BUFFERED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| (used + n <= limit).then_some(used + n)).is_ok()
}

fn release(n: usize) {
    BUFFERED.fetch_sub(n as u64, Ordering::AcqRel);
}

struct Shared<B> {
    source: Option<B>,
    chunks: Vec<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    source_done: bool,
    overflowed: bool,
    limit: usize,
    /// Body bytes pulled from the client so far; shared so telemetry can read the request size
    /// after the body (and this buffer) is gone.
    pulled: Arc<AtomicU64>,
}

impl<B> Drop for Shared<B> {
    fn drop(&mut self) {
        release(self.buffered);
    }
}

pub struct ReplayBody<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
    next: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl<B: Body<Data = Bytes> + Unpin> ReplayBody<B> {
    pub fn new(source: B, limit: usize) -> Self {
        let hint = source.size_hint();
        let done = source.is_end_stream();
        let shared = Shared {
            source: Some(source),
            chunks: Vec::new(),
            buffered: 0,
            trailers: None,
            source_done: done,
            overflowed: false,
            limit,
            pulled: Arc::default(),
        };
        Self { shared: Arc::new(Mutex::new(shared)), next: 0, trailers_sent: false, hint }
    }

    /// A fresh reader from the start, for another attempt; `None` if the body outgrew the buffer.
    pub fn replay(&self) -> Option<Self> {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.overflowed {
            return None;
        }
        Some(Self { shared: self.shared.clone(), next: 0, trailers_sent: false, hint: self.hint.clone() })
    }

    /// The count of body bytes received from the client, live (the request size in metrics).
    pub fn pulled(&self) -> Arc<AtomicU64> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).pulled.clone()
    }

    pub fn is_replayable(&self) -> bool {
        !self.shared.lock().unwrap_or_else(|e| e.into_inner()).overflowed
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Marks a reader that went past the buffer limit: it streams on, keeping nothing.
const STREAMING: usize = usize::MAX;

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if this.next != STREAMING {
            if this.next < shared.chunks.len() {
                let chunk = shared.chunks[this.next].clone();
                this.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if shared.overflowed {
                // An older attempt's reader: what it would need next is no longer kept.
                return Poll::Ready(Some(Err("request body no longer buffered for replay".into())));
            }
        }
        if shared.source_done {
            if !this.trailers_sent
                && let Some(t) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = shared.source.as_mut() else { return Poll::Ready(None) };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.source_done = true;
                shared.source = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                shared.pulled.fetch_add(data.len() as u64, Ordering::Relaxed);
                if this.next != STREAMING {
                    let fits = shared.buffered + data.len() <= shared.limit;
                    let reserved = fits && reserve(data.len());
                    if fits && !reserved {
                        BUDGET_EXHAUSTED.fetch_add(1, Ordering::Relaxed);
                    }
                    if reserved {
                        shared.buffered += data.len();
                        shared.chunks.push(data.clone());
                        this.next = shared.chunks.len();
                    } else {
                        shared.overflowed = true;
                        shared.chunks = Vec::new();
                        release(std::mem::take(&mut shared.buffered));
                        this.next = STREAMING;
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Err(frame) => frame,
        };
        match frame.into_trailers() {
            Ok(trailers) => {
                shared.trailers = Some(trailers.clone());
                shared.source_done = true;
                shared.source = None;
                this.trailers_sent = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            // Unknown frame kinds are not forwarded.
            Err(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let buffered_read = self.next == STREAMING || self.next >= shared.chunks.len();
        shared.source_done && buffered_read && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint.clone()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    struct ChunkStream(std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>);
    impl hyper::body::Body for ChunkStream {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.next())
        }
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(b: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B::Error: std::fmt::Debug,
    {
        let c = b.collect().await.unwrap();
        let trailers = c.trailers().cloned();
        (c.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn replays_data_and_trailers() {
        let first = ReplayBody::new(ChunkStreamBody::new(&["ab", "cd", "ef"], true), 1024);
        let second = first.replay().unwrap();
        let (data, trailers) = collect(first).await;
        assert_eq!(data, b"abcdef");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        let (data, trailers) = collect(second).await;
        assert_eq!(data, b"abcdef");
        assert!(trailers.is_some());
    }

    #[tokio::test]
    async fn a_replay_taken_mid_stream_starts_from_the_beginning() {
        let mut first = ReplayBody::new(ChunkStreamBody::new(&["ab", "cd"], false), 1024);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        let second = first.replay().unwrap();
        drop(first);
        assert_eq!(collect(second).await.0, b"abcd");
    }

    #[tokio::test]
    async fn past_the_limit_the_body_streams_on_but_cannot_be_replayed() {
        let first = ReplayBody::new(ChunkStreamBody::new(&["abcd", "efgh", "ij"], false), 6);
        let early = first.replay().unwrap();
        let (data, _) = collect(first).await;
        assert_eq!(data, b"abcdefghij");
        assert!(early.replay().is_none());
        assert!(collect_err(early).await);
    }

    async fn collect_err<B: Body<Data = Bytes> + Unpin>(b: B) -> bool {
        b.collect().await.is_err()
    }

    struct ChunkStreamBody;
    impl ChunkStreamBody {
        fn new(parts: &[&'static str], trailers: bool) -> ChunkStream {
            let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
            if trailers {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                frames.push(Ok(Frame::trailers(t)));
            }
            ChunkStream(frames.into_iter())
        }
    }
}
