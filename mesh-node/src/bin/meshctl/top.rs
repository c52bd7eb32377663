//! `meshctl top`: requests per second, success rate and p99 per destination service, from
//! the difference between two scrapes of the node's Istio metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`), the way the Istio dashboards compute them. Without
//! a metrics endpoint it falls back to the node's request counter from `/stats`.
use std::{
    collections::BTreeMap,
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use hyper::Method;
use serde_json::{Value, json};

use crate::{client, prom, table::Table};

pub struct Options {
    pub metrics: String,
    pub interval: Duration,
    pub iterations: Option<u64>,
    /// `source` (requests this node's pods sent), `destination` (received), or `None`:
    /// source when the node reports any, else everything.
    pub reporter: Option<String>,
}

#[derive(Default, Clone)]
struct Counts {
    total: f64,
    ok: f64,
    /// Cumulative duration buckets, `le` -> count.
    buckets: BTreeMap<String, f64>,
}

enum Scrape {
    Metrics(BTreeMap<String, Counts>),
    /// `http_requests` from /stats: one node-wide number.
    Stats(f64),
}

async fn scrape(admin: &client::Admin, opts: &Options, warned: &mut bool) -> anyhow::Result<Scrape> {
    match client::request(&opts.metrics, Method::GET, "/metrics", bytes::Bytes::new()).await {
        Ok((200, body)) => return Ok(Scrape::Metrics(per_service(&prom::parse(&String::from_utf8_lossy(&body)), opts.reporter.as_deref()))),
        Ok((status, _)) if !*warned => eprintln!("meshctl top: {}/metrics answered {status}; showing node totals from the admin API", opts.metrics),
        Err(e) if !*warned => eprintln!("meshctl top: no metrics at {} ({}); showing node totals from the admin API", opts.metrics, e.to_string().lines().next().unwrap_or("")),
        _ => {}
    }
    *warned = true;
    let stats = admin.get("/stats").await?;
    Ok(Scrape::Stats(stats["proxy"]["http_requests"].as_f64().unwrap_or(0.0)))
}

fn per_service(samples: &[prom::Sample], reporter: Option<&str>) -> BTreeMap<String, Counts> {
    let reporter = reporter.map(str::to_owned).or_else(|| {
        samples.iter().any(|s| s.name == "istio_requests_total" && s.labels.get("reporter").is_some_and(|r| r == "source")).then(|| "source".to_owned())
    });
    let mut out: BTreeMap<String, Counts> = BTreeMap::new();
    for s in samples {
        if reporter.as_ref().is_some_and(|r| s.labels.get("reporter") != Some(r)) {
            continue;
        }
        let service = s.labels.get("destination_service").or_else(|| s.labels.get("destination_service_name")).cloned().unwrap_or_else(|| "unknown".into());
        match s.name.as_str() {
            "istio_requests_total" => {
                let c = out.entry(service).or_default();
                c.total += s.value;
                // Istio's success rate: everything but 5xx.
                if !s.labels.get("response_code").is_some_and(|code| code.starts_with('5')) {
                    c.ok += s.value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                if let Some(le) = s.labels.get("le") {
                    *out.entry(service).or_default().buckets.entry(le.clone()).or_default() += s.value;
                }
            }
            _ => {}
        }
    }
    out
}

fn rows(before: &Scrape, after: &Scrape, secs: f64) -> (&'static str, Vec<Value>) {
    match (before, after) {
        (Scrape::Metrics(a), Scrape::Metrics(b)) => {
            let rows = b
                .iter()
                .filter_map(|(svc, now)| {
                    let then = a.get(svc).cloned().unwrap_or_default();
                    let total = now.total - then.total;
                    if total <= 0.0 {
                        return None;
                    }
                    let buckets: Vec<(f64, f64)> = now
                        .buckets
                        .iter()
                        .filter_map(|(le, n)| {
                            let delta = n - then.buckets.get(le).copied().unwrap_or(0.0);
                            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                            Some((le, delta))
                        })
                        .collect();
                    Some(json!({
                        "service": svc,
                        "rps": round(total / secs, 1),
                        "success_rate": round((now.ok - then.ok) / total, 4),
                        "p99_ms": prom::quantile(0.99, &buckets).map(|v| round(v, 1)),
                    }))
                })
                .collect();
            ("metrics", rows)
        }
        (Scrape::Stats(a), Scrape::Stats(b)) => {
            let rows = vec![json!({"service": "(all services on this node)", "rps": round((b - a) / secs, 1), "success_rate": null, "p99_ms": null})];
            ("stats", rows)
        }
        // The metrics endpoint came or went between scrapes; the next pair will agree.
        _ => ("mixed", Vec::new()),
    }
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// Prints one sample per interval: a table, or one JSON/YAML document each.
pub async fn run(admin: &client::Admin, opts: &Options, format: crate::Format) -> anyhow::Result<()> {
    let mut warned = false;
    let mut before = scrape(admin, opts, &mut warned).await?;
    let mut at = Instant::now();
    let clear = format == crate::Format::Table && opts.iterations != Some(1) && std::io::stdout().is_terminal();
    let mut n = 0;
    while opts.iterations.is_none_or(|max| n < max) {
        tokio::time::sleep(opts.interval).await;
        let after = scrape(admin, opts, &mut warned).await?;
        let now = Instant::now();
        let (source, rows) = rows(&before, &after, now.duration_since(at).as_secs_f64());
        let doc = json!({"source": source, "interval_seconds": round(now.duration_since(at).as_secs_f64(), 2), "services": rows});
        match format {
            crate::Format::Table => {
                if clear {
                    print!("\x1b[2J\x1b[H");
                }
                println!("{}", table(&doc));
            }
            crate::Format::Json => println!("{}", serde_json::to_string(&doc)?),
            crate::Format::Yaml => print!("---\n{}", serde_yaml::to_string(&doc)?),
        }
        before = after;
        at = now;
        n += 1;
    }
    Ok(())
}

fn table(doc: &Value) -> String {
    let mut t = Table::new(&["SERVICE", "RPS", "SUCCESS", "P99"]);
    for r in doc["services"].as_array().into_iter().flatten() {
        let success = r["success_rate"].as_f64().map(|s| format!("{:.2}%", s * 100.0)).unwrap_or("-".into());
        let p99 = r["p99_ms"].as_f64().map(|p| format!("{p}ms")).unwrap_or("-".into());
        t.row(vec![r["service"].as_str().unwrap_or("?").into(), format!("{}", r["rps"]), success, p99]);
    }
    if t.is_empty() {
        return format!("no requests in the last {}s", doc["interval_seconds"]);
    }
    t.render()
}
