//! The tally of an HTTP client run, printed as the one JSON line tests parse.
use std::collections::BTreeMap;

use super::conn::Answer;

/// How many `x-pod` values the report lists in order; enough to see a balancing pattern.
const PODS_IN_ORDER: usize = 200;
/// Quantiles listed in the report's `cdf_us`.
const CDF_POINTS: [f64; 16] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0];

#[derive(Default)]
pub struct Tally {
    latencies_us: Vec<f64>,
    /// Split by outcome: 2xx (and gRPC ok) answers, and every other answer.
    ok_latencies_us: Vec<f64>,
    not_ok_latencies_us: Vec<f64>,
    by_pod: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
    by_grpc_status: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    pods_in_order: Vec<String>,
    body_bytes: u64,
    last_body: Option<String>,
    not_ok: u64,
}

impl Tally {
    pub fn answer(&mut self, answer: Answer, latency_us: f64) {
        self.latencies_us.push(latency_us);
        *self.by_status.entry(answer.status.to_string()).or_default() += 1;
        let grpc_failed = answer.grpc_status.as_deref().is_some_and(|s| s != "0");
        if let Some(s) = answer.grpc_status {
            *self.by_grpc_status.entry(s).or_default() += 1;
        }
        if !(200..300).contains(&answer.status) || grpc_failed {
            self.not_ok += 1;
            self.not_ok_latencies_us.push(latency_us);
        } else {
            self.ok_latencies_us.push(latency_us);
        }
        // Answers the proxy made itself (overflow, no healthy upstream) carry no x-pod.
        let pod = answer.pod.unwrap_or_else(|| "-".into());
        if pod != "-" {
            *self.by_pod.entry(pod.clone()).or_default() += 1;
        }
        if self.pods_in_order.len() < PODS_IN_ORDER {
            self.pods_in_order.push(pod);
        }
        self.body_bytes += answer.body_len;
        if let Some(body) = answer.body {
            self.last_body = Some(String::from_utf8_lossy(&body).into_owned());
        }
    }

    pub fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
        self.not_ok += 1;
    }

    /// Requests tallied so far: answers and errors.
    pub fn seen(&self) -> u64 {
        self.latencies_us.len() as u64 + self.errors.values().sum::<u64>()
    }

    pub fn all_ok(&self) -> bool {
        self.not_ok == 0
    }

    pub fn finish(&mut self, requests: u64, connections_opened: u64, max_in_flight: usize, elapsed_ms: f64) -> serde_json::Value {
        self.latencies_us.sort_by(f64::total_cmp);
        let p = |q: f64| percentile(&self.latencies_us, q);
        let mut out = serde_json::json!({
            "requests": requests,
            "by_pod": self.by_pod,
            "by_status": self.by_status,
            "errors": self.errors,
            "p50_us": p(0.50), "p90_us": p(0.90), "p99_us": p(0.99),
            "connections_opened": connections_opened,
            "max_in_flight": max_in_flight,
            "elapsed_ms": elapsed_ms,
            "body_bytes": self.body_bytes,
            "pods_in_order": self.pods_in_order,
        });
        // Enough points to draw a latency CDF.
        out["cdf_us"] = CDF_POINTS.iter().map(|&q| serde_json::json!([q, p(q)])).collect::<Vec<_>>().into();
        if !self.by_grpc_status.is_empty() {
            out["by_grpc_status"] = serde_json::json!(self.by_grpc_status);
        }
        out["not_ok"] = self.not_ok.into();
        for (key, v) in [("ok", &mut self.ok_latencies_us), ("not_ok_answers", &mut self.not_ok_latencies_us)] {
            v.sort_by(f64::total_cmp);
            out[format!("{key}_p50_us")] = percentile(v, 0.50).into();
            out[format!("{key}_p99_us")] = percentile(v, 0.99).into();
        }
        if let Some(body) = &self.last_body {
            out["last_body"] = body.clone().into();
        }
        out
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}
