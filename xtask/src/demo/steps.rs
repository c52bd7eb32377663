//! Steps 1 and 2: per-request balancing of gRPC over one channel, with mTLS between the nodes;
//! the seed's canary (90/10, and `x-canary: true` only to v2).
use std::time::Instant;

use serde_json::Value;

use super::{
    Demo, expect,
    load::{Load, Spec, Window},
    topology::{NS, V1, V2},
    watch,
};

/// bff-0's calls through the seed's default route, over steps 1 and 2: the canary share.
#[derive(Default)]
pub struct Shares {
    pub routed: Window,
}

/// The main client's pace: calls a second, and at most in flight on its one channel.
pub const RATE: f64 = 80.0;
pub const CONCURRENCY: u32 = 16;
/// Calls the 90/10 split is judged on at the least (binomial sd of the v2 share ~1.3% there).
const MIN_SPLIT_CALLS: u64 = 500;

pub fn main_load(d: &Demo, seconds: f64) -> anyhow::Result<Load> {
    Load::start(d, Spec { from: "bff-0", label: "bff-0 (seed routes)", rate: RATE, duration: d.phase(seconds), concurrency: CONCURRENCY, headers: &[] })
}

pub fn grpc_balancing(d: &mut Demo, shares: &mut Shares) -> anyhow::Result<()> {
    d.view.say(&format!(
        "\n[1/5] bff-0 (node-a) calls recall over gRPC on ONE long-lived HTTP/2 channel, {RATE:.0} calls/s.\n      The node proxy balances every call (LEAST_REQUEST, the seed's DestinationRule), not the connection; calls to node-b travel over mTLS."
    ));
    let report = main_load(d, 16.0)?.run_out(d)?;
    let w = Window::parse(&report, Instant::now());
    shares.routed.add(&w);
    let v1_total: u64 = V1.iter().map(|p| w.pod(p)).sum();
    let shares_text: Vec<String> = V1.iter().map(|p| format!("{p} {:.1}%", w.share(p, &V1) * 100.0)).collect();
    d.view.say(&format!(
        "  {} calls on {} connection(s), {} failed; the v1 calls went to {} ({v1_total} v1 calls)",
        w.calls,
        report["connections_opened"],
        w.failed,
        shares_text.join(", ")
    ));
    expect(report["connections_opened"] == 1, || format!("bff-0's client opened {} connections, not one channel: {report}", report["connections_opened"]))?;
    expect(w.failed == 0, || format!("{} of {} calls failed with every pod healthy: {report}", w.failed, w.calls))?;
    for pod in V1 {
        // A third each on average; below a fifth is no per-request balancing.
        expect(v1_total >= 200 && w.share(pod, &V1) >= 0.2, || format!("{pod} got {:.1}% of {v1_total} v1 calls (expected about a third, at least 20%)", w.share(pod, &V1) * 100.0))?;
    }

    // mTLS: node-b's proxy reports the tunnel streams it accepted with the identity the peer's
    // certificate proved; node-a's, its calls by the security toward their destination.
    let streams = series(&d.c.metrics(1)?, "istio_tcp_connections_opened_total", "destination");
    let calls = series(&d.c.metrics(0)?, "istio_requests_total", "source");
    let mut text = String::from("  mTLS: tunnel streams node-b's proxy accepted, by the identity the peer's certificate proved:");
    for (src, dst, security, n) in &streams {
        text.push_str(&format!("\n    {src} -> {dst}  {security}  {n} streams"));
    }
    text.push_str("\n  calls node-a's proxy sent, by the security toward the destination pod (same-node calls need no tunnel):");
    for (src, dst, security, n) in &calls {
        text.push_str(&format!("\n    {src} -> {dst}  {security}  {n} calls"));
    }
    d.view.say(&text);
    let bff = format!("spiffe://cluster.local/ns/{NS}/sa/bff");
    let recall = format!("spiffe://cluster.local/ns/{NS}/sa/recall");
    expect(streams.iter().any(|(s, t, sec, n)| *s == bff && *t == recall && sec == "mutual_tls" && *n > 0), || format!("node-b accepted no mutual_tls streams from {bff} to {recall}: {streams:?}"))?;
    expect(!streams.iter().any(|(_, _, sec, n)| sec != "mutual_tls" && *n > 0), || format!("node-b accepted streams without mTLS: {streams:?}"))?;
    expect(calls.iter().any(|(s, _, sec, n)| *s == bff && sec == "mutual_tls" && *n > 0), || format!("node-a sent no calls over mTLS: {calls:?}"))?;
    let certs = watch::show(d, 0, "certs", "the workload certificates node-a's proxy holds (from the mesh CA)")?;
    expect(certs.contains("sa/bff"), || format!("meshctl certs on node-a does not list bff's identity:\n{certs}"))?;
    Ok(())
}

/// (source principal, destination principal, connection security, sum) of a metric's series
/// reported by `reporter`, from Prometheus text.
fn series(metrics: &str, metric: &str, reporter: &str) -> Vec<(String, String, String, u64)> {
    let (prefix, by) = (format!("{metric}{{"), format!("reporter=\"{reporter}\""));
    let mut out: Vec<(String, String, String, u64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with(&prefix) && l.contains(&by)) {
        let label = |k: &str| line.split(&format!(",{k}=\"")).nth(1).or_else(|| line.split(&format!("{{{k}=\"")).nth(1)).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
        let n = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        let key = (label("source_principal"), label("destination_principal"), label("connection_security_policy"));
        match out.iter_mut().find(|(s, t, c, _)| (s, t, c) == (&key.0, &key.1, &key.2)) {
            Some(row) => row.3 += n,
            None => out.push((key.0, key.1, key.2, n)),
        }
    }
    out
}

pub fn canary(d: &mut Demo, shares: &mut Shares) -> anyhow::Result<()> {
    d.view.say(&format!(
        "\n[2/5] The canary, from the seed's VirtualService: 90% of bff's calls to v1, 10% to v2 ({V2});\n      calls with `x-canary: true` only to v2. A second stream from bff-0 sets the header."
    ));
    let main = main_load(d, 13.0)?;
    let canary = Load::start(d, Spec { from: "bff-0", label: "bff-0 x-canary: true", rate: 20.0, duration: d.phase(13.0), concurrency: 4, headers: &["x-canary: true"] })?;
    d.pause(d.phase(13.0), &[&main, &canary])?;
    let report = main.finish(d)?;
    let canary_report = canary.finish(d)?;
    shares.routed.add(&Window::parse(&report, Instant::now()));
    let w = &shares.routed;
    let answered: u64 = w.by_pod.values().sum();
    let v2 = if answered == 0 { 0.0 } else { w.pod(V2) as f64 / answered as f64 };
    let c = Window::parse(&canary_report, Instant::now());
    d.view.say(&format!(
        "  default route: {answered} calls, {:.1}% on v2 ({V2}), {:.1}% on v1; x-canary: true: {} calls, {} on {V2}, {} failed",
        v2 * 100.0,
        (1.0 - v2) * 100.0,
        c.calls,
        c.pod(V2),
        c.failed
    ));
    watch::hint(d, &[(0, &format!("describe {NS}/bff-0 recall:50051"), "which route, subset and endpoints bff-0's calls take"), (0, "routes lemo-dev/recall", "the routes in the order they are tried")]);
    expect(answered >= MIN_SPLIT_CALLS, || format!("only {answered} calls to judge the 90/10 split on (at least {MIN_SPLIT_CALLS} needed)"))?;
    expect((0.05..=0.15).contains(&v2), || format!("v2 got {:.1}% of {answered} calls, expected 5-15% (the seed's 10%)", v2 * 100.0))?;
    expect(w.failed == 0, || format!("{} calls failed on the default route with every pod healthy", w.failed))?;
    expect(c.calls >= 50 && c.pod(V2) == c.calls && c.failed == 0, || format!("x-canary: true calls: {} made, {} answered by {V2}, {} failed: {}", c.calls, c.pod(V2), c.failed, summary(&canary_report)))?;
    Ok(())
}

fn summary(v: &Value) -> String {
    format!("by_pod {} by_status {} errors {}", v["by_pod"], v["by_status"], v["errors"])
}

#[cfg(test)]
mod tests {
    #[test]
    fn series_sums_by_principals_and_security_for_one_reporter() {
        let text = "# TYPE istio_tcp_connections_opened_total counter\n\
istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://a\",destination_principal=\"spiffe://b\",connection_security_policy=\"mutual_tls\",x=\"1\"} 2\n\
istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"spiffe://a\",destination_principal=\"spiffe://b\",connection_security_policy=\"mutual_tls\",x=\"2\"} 3\n\
istio_tcp_connections_opened_total{reporter=\"source\",source_principal=\"spiffe://a\",destination_principal=\"spiffe://b\",connection_security_policy=\"mutual_tls\"} 7\n\
istio_tcp_connections_opened_total{reporter=\"destination\",source_principal=\"unknown\",destination_principal=\"spiffe://b\",connection_security_policy=\"none\"} 1\n\
istio_tcp_connections_opened_totalx{reporter=\"destination\"} 9\n";
        let rows = super::series(text, "istio_tcp_connections_opened_total", "destination");
        assert_eq!(
            rows,
            [("spiffe://a".into(), "spiffe://b".into(), "mutual_tls".into(), 5), ("unknown".into(), "spiffe://b".into(), "none".into(), 1)]
        );
    }
}
