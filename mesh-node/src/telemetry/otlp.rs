//! Span export over OTLP/gRPC, batched on the proxy's own runtime (the OpenTelemetry SDK's
//! batch processor exports from a thread of its own without a Tokio reactor, which the tonic
//! transport needs; and the proxy needs none of the SDK's span machinery).
use std::{collections::BTreeMap, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    TelemetryError,
    trace::{AttrValue, FinishedSpan},
};

/// Spans per export call, and the longest a finished span waits to be sent.
const BATCH: usize = 512;
const FLUSH: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Finished spans waiting for export; past this they are dropped.
pub const QUEUE: usize = 8192;

/// Starts the exporter task for `endpoint` (`http://host:port`, or `host:port`); it ends when
/// every sender is dropped.
pub fn spawn(endpoint: &str, node: &str, rx: mpsc::Receiver<FinishedSpan>) -> Result<(), TelemetryError> {
    let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| TelemetryError::OtlpEndpoint { endpoint: endpoint.to_string(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(2))
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let client = TraceServiceClient::new(channel);
    tokio::spawn(run(client, rx, node.to_string(), uri));
    Ok(())
}

async fn run(mut client: TraceServiceClient<tonic::transport::Channel>, mut rx: mpsc::Receiver<FinishedSpan>, node: String, uri: String) {
    let mut failures = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        match client.export(request(batch, &node)).await {
            Ok(_) => debug!(spans = n, "exported spans"),
            Err(e) => {
                failures += 1;
                // A collector that is down would otherwise log once a second.
                if failures == 1 || failures.is_power_of_two() {
                    warn!(collector = %uri, failures, "exporting {n} spans: {}", e.message());
                }
            }
        }
    }
}

fn string_kv(key: &str, value: String) -> KeyValue {
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }) }
}

fn nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Groups the spans by service into one resource each.
fn request(batch: Vec<FinishedSpan>, node: &str) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<String, Vec<Span>> = BTreeMap::new();
    for s in batch {
        let attributes = s
            .attributes
            .into_iter()
            .map(|(k, v)| KeyValue {
                key: k.to_string(),
                value: Some(AnyValue {
                    value: Some(match v {
                        AttrValue::Str(s) => any_value::Value::StringValue(s),
                        AttrValue::Int(i) => any_value::Value::IntValue(i),
                    }),
                }),
            })
            .collect();
        let span = Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name,
            kind: SpanKind::Client as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes,
            // W3C sampled flag: only sampled spans are ever exported.
            flags: 0x01,
            status: Some(Status { code: if s.error { StatusCode::Error } else { StatusCode::Unset } as i32, message: String::new() }),
            ..Default::default()
        };
        by_service.entry(s.service).or_default().push(span);
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string_kv("service.name", service), string_kv("node.name", node.to_string()), string_kv("telemetry.sdk.name", "mesh".into())],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "mesh-node".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}
