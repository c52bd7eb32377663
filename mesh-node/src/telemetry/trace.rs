//! Spans of proxied HTTP requests: the sampling decision, the proxy's span as a child of the
//! caller's, and handing finished spans to the OTLP exporter.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use http::HeaderMap;
use tokio::sync::mpsc;

use super::propagation::{self, SpanContext};

/// A span attribute value.
#[derive(Clone, Debug)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

/// A finished span, as the exporter needs it.
#[derive(Debug)]
pub struct FinishedSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    /// The resource's `service.name`: the calling workload's canonical service, as a sidecar
    /// would report it (`app.namespace`).
    pub service: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttrValue)>,
    pub error: bool,
}

/// A sampled request's span, between the request's arrival and the end of its response.
#[derive(Debug)]
pub struct ActiveSpan {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub start: SystemTime,
}

pub struct Tracer {
    ratio: f64,
    tx: mpsc::Sender<FinishedSpan>,
    /// Spans the exporter could not take (queue full: collector slow or down).
    pub dropped: AtomicU64,
}

fn nonzero_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

impl Tracer {
    pub fn new(ratio: f64, tx: mpsc::Sender<FinishedSpan>) -> Self {
        Self { ratio: ratio.clamp(0.0, 1.0), tx, dropped: AtomicU64::new(0) }
    }

    /// Decides whether the request is traced and rewrites its trace headers so the next hop
    /// sees the proxy's span as its parent. A caller's explicit decision is kept (a sampled
    /// parent always gets a child span, an unsampled one never does); a new trace or a
    /// deferred decision is sampled at the configured ratio.
    pub fn start(&self, headers: &mut HeaderMap) -> Option<ActiveSpan> {
        let (parent, formats) = propagation::extract(headers);
        let sampled = match parent.and_then(|p| p.sampled) {
            Some(decided) => decided,
            None => self.ratio > 0.0 && fastrand::f64() < self.ratio,
        };
        if !sampled && parent.is_some_and(|p| p.sampled.is_some()) {
            // Not traced, and the caller said so: its headers already say it to the next hop.
            return None;
        }
        let trace_id = parent.map_or_else(nonzero_id::<16>, |p| p.trace_id);
        let context = SpanContext { trace_id, span_id: nonzero_id::<8>(), sampled: Some(sampled) };
        propagation::inject(headers, &context, parent.as_ref(), formats);
        sampled.then(|| ActiveSpan { context, parent: parent.map(|p| p.span_id), start: SystemTime::now() })
    }

    /// Queues the finished span for export; drops it when the queue is full rather than
    /// slowing requests down.
    pub fn finish(&self, span: FinishedSpan) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_of_a_sampled_parent_and_injected() {
        let (tx, _rx) = mpsc::channel(4);
        let tracer = Tracer::new(0.0, tx);
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let span = tracer.start(&mut h).expect("a sampled parent is traced even at ratio 0");
        assert_eq!(propagation::hex(&span.context.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.parent.map(|p| propagation::hex(&p)).as_deref(), Some("00f067aa0ba902b7"));
        let sent = h["traceparent"].to_str().unwrap();
        assert_eq!(sent, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", propagation::hex(&span.context.span_id)));
    }

    #[test]
    fn unsampled_parent_passes_through_and_new_traces_follow_the_ratio() {
        let (tx, _rx) = mpsc::channel(4);
        let tracer = Tracer::new(1.0, tx);
        let original = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let mut h = HeaderMap::new();
        h.insert("traceparent", original.parse().unwrap());
        assert!(tracer.start(&mut h).is_none());
        assert_eq!(h["traceparent"], original);
        let mut fresh = HeaderMap::new();
        let span = tracer.start(&mut fresh).expect("ratio 1 samples every new trace");
        assert!(span.parent.is_none());
        assert!(fresh["traceparent"].to_str().unwrap().ends_with("-01"));
    }
}
