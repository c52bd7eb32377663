//! End to end: the node proxies' telemetry read by the real tools users run. A real Prometheus
//! (the Debian package) scrapes the proxies' `/metrics` under known traffic and answers the
//! PromQL of Istio's dashboards; a real OTLP collector (rotel) receives the spans of requests
//! that cross two node proxies, linked to the caller's span; access log lines carry response
//! flags. Needs root; run through `cargo xtask test`.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, report};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const WEB: &str = "web.demo.svc.cluster.local";
const ECHO: &str = "echo.demo.svc.cluster.local";

/// client and old-1 on node-a; web-1, echo-1 and down-1 (no server: connections refused) on
/// node-b.
fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web-1", "demo", 1, "web", &[("version", "v1")], "http", 8080)
        .pod_labelled("echo-1", "demo", 1, "echo", &[("version", "v1")], "tcp", 7000)
        .pod_labelled("down-1", "demo", 1, "down", &[], "http", 8080)
        .pod_labelled("old-1", "demo", 0, "old", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080)
        .service_named("echo", "demo", [10, 96, 0, 60], "echo", "tcp", 7000, 7000)
        .service_named("down", "demo", [10, 96, 0, 70], "down", "http", 80, 8080)
        .service_named("old", "demo", [10, 96, 0, 80], "old", "http", 80, 8080);
    spec.start_proxies = false;
    spec
}

fn start(extra: &[&str]) -> SimCluster {
    let c = SimCluster::start(spec()).expect("simulated cluster");
    for i in 0..c.nodes.len() {
        c.start_proxy_with(i, extra).expect("node proxy");
    }
    let probe = bins::path("mesh-probe");
    for pod in ["web-1", "old-1"] {
        c.serve_in_pod(pod, &probe, &["http-serve", "--name", pod, "--port", "8080"], 8080).unwrap();
    }
    c.serve_in_pod("echo-1", &probe, &["serve", "--name", "echo-1", "--port", "7000"], 7000).unwrap();
    c
}

fn http(c: &SimCluster, url: &str, args: &[&str]) -> Value {
    report::http(c, "client", url, args, T)
}

fn curl(c: &SimCluster, node: usize, args: &[&str]) -> String {
    let out = c.run_in_netns(&c.node(node).netns, Path::new("curl"), args, Duration::from_secs(10)).expect("curl runs");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real Prometheus in node-a's network namespace, scraping both node proxies every second.
struct Prometheus<'a> {
    c: &'a SimCluster,
}

impl<'a> Prometheus<'a> {
    fn start(c: &'a SimCluster) -> Self {
        let dir = c.log_dir().join("prometheus");
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = c.nodes.iter().map(|n| format!("'{}:15020'", n.ip)).collect();
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: mesh\n  static_configs:\n  - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let (config, storage, log) = (config.to_str().unwrap().to_string(), dir.join("data"), dir.join("prometheus.log"));
        c.spawn_in_netns(
            &c.node(0).netns,
            &PathBuf::from("prometheus"),
            &[
                &format!("--config.file={config}"),
                &format!("--storage.tsdb.path={}", storage.display()),
                "--web.listen-address=127.0.0.1:9090",
                "--log.level=warn",
            ],
            &log,
        )
        .expect("prometheus starts (apt package `prometheus`; `cargo xtask setup` installs it)");
        let p = Self { c };
        p.wait_for("count(up{job=\"mesh\"} == 1)", 2.0, &log);
        p
    }

    /// The query's result vector (empty when Prometheus is not answering yet).
    fn query(&self, promql: &str) -> Vec<Value> {
        let out = self.c.run_in_netns(
            &self.c.node(0).netns,
            Path::new("curl"),
            &["-s", "-G", "http://127.0.0.1:9090/api/v1/query", "--data-urlencode", &format!("query={promql}")],
            Duration::from_secs(10),
        );
        let Ok(out) = out else { return Vec::new() };
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query returning one sample.
    fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until the query's value is `want` (scrapes are every second).
    fn wait_for(&self, promql: &str, want: f64, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.scalar(promql);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("{promql}: {last:?}, expected {want}\nprometheus log:\n{}", fs::read_to_string(log).unwrap_or_default());
    }
}

#[test]
fn prometheus_scrapes_istio_metrics_under_known_traffic() {
    let c = start(&["--access-log", "json"]);
    let prom = Prometheus::start(&c);
    let plog = c.log_dir().join("prometheus/prometheus.log");

    // The 10 failures below are meant to reach the client as they are: without this, Istio's
    // default retry policy would try each 503 three times (with backoff) and the latency
    // figures below would measure the retries.
    c.apply_config(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  hosts: [web]\n  http:\n  - retries: {attempts: 0}\n    route:\n    - destination: {host: web}\n",
    )
    .unwrap();
    // 90 successes paced over 3 s (several scrapes see the rate), then 10 failures, slower.
    let v = http(&c, "http://10.96.0.50/", &["--count", "90", "--rate", "30", "--header", "x-delay-ms: 5"]);
    assert_eq!(v["by_status"]["200"], 90, "{v}");
    let v = http(&c, "http://10.96.0.50/", &["--count", "10", "--header", "x-fail-pods: web-1", "--header", "x-delay-ms: 30"]);
    assert_eq!(v["by_status"]["503"], 10, "{v}");
    // TCP: three echo connections of 10000 bytes (plus the 5-byte "ECHO\n" command).
    for _ in 0..3 {
        c.probe("client", &["echo", "10.96.0.60:7000", "--bytes", "10000"], T).unwrap();
    }
    // Same node: old-1 is on node-a with the client.
    let v = http(&c, "http://10.96.0.80/", &["--count", "5"]);
    assert_eq!(v["by_status"]["200"], 5, "{v}");
    // No endpoint answers: connect failures, retried, flagged.
    let v = http(&c, "http://10.96.0.70/", &["--count", "1"]);
    assert_eq!(v["by_status"]["503"], 1, "{v}");

    // Request counts, exact, as the dashboards sum them.
    let web = format!("destination_service=\"{WEB}\"");
    prom.wait_for(&format!("sum(istio_requests_total{{reporter=\"source\",{web}}})"), 100.0, &plog);
    prom.wait_for(&format!("sum(istio_requests_total{{reporter=\"source\",{web},response_code=\"503\"}})"), 10.0, &plog);
    let success = prom
        .scalar(&format!(
            "sum(istio_requests_total{{reporter=\"source\",{web},response_code!~\"5..\"}}) / sum(istio_requests_total{{reporter=\"source\",{web}}})"
        ))
        .unwrap();
    assert!((success - 0.9).abs() < 1e-9, "success rate {success}");
    // Request rate by destination_service (Istio's "Incoming Request Volume").
    let rates = prom.query("sum(rate(istio_requests_total{reporter=\"source\"}[1m])) by (destination_service)");
    let web_rate = rates.iter().find(|r| r["metric"]["destination_service"] == WEB).and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok());
    assert!(web_rate.is_some_and(|r| r > 0.0 && r < 100.0), "rate by destination_service: {rates:?}");
    // p99 from the histogram: the rate over the paced 5 ms requests, and over all requests
    // (10% took 30 ms, so the 99th percentile falls in the 25-50 ms bucket).
    let p99_rate = prom
        .scalar(&format!("histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{reporter=\"source\",{web}}}[1m])) by (le))"))
        .unwrap();
    assert!(p99_rate > 1.0 && p99_rate <= 50.0, "p99 of the rate: {p99_rate} ms");
    let p99_all = prom.scalar(&format!("histogram_quantile(0.99, sum(istio_request_duration_milliseconds_bucket{{reporter=\"source\",{web}}}) by (le))")).unwrap();
    assert!((25.0..=50.0).contains(&p99_all), "p99 of all requests: {p99_all} ms");
    let labels = prom.query(&format!("istio_requests_total{{reporter=\"source\",{web},response_code=\"200\"}}"));
    let m = &labels.first().unwrap_or_else(|| panic!("no series: {labels:?}"))["metric"];
    for (k, want) in [
        ("source_workload", "client"),
        ("source_workload_namespace", "demo"),
        ("source_principal", "spiffe://cluster.local/ns/demo/sa/client"),
        ("source_app", "client"),
        ("destination_workload", "web"),
        ("destination_app", "web"),
        ("destination_version", "v1"),
        ("destination_principal", "spiffe://cluster.local/ns/demo/sa/web"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "demo"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(m[k], want, "{k} in {m}");
    }

    // TCP bytes and connections, both reporters (node-b reports the tunnel streams it ends).
    let echo = format!("destination_service=\"{ECHO}\"");
    prom.wait_for(&format!("sum(istio_tcp_sent_bytes_total{{reporter=\"source\",{echo}}})"), 30000.0, &plog);
    prom.wait_for(&format!("sum(istio_tcp_received_bytes_total{{reporter=\"source\",{echo}}})"), 30015.0, &plog);
    prom.wait_for(&format!("sum(istio_tcp_connections_opened_total{{reporter=\"source\",{echo}}})"), 3.0, &plog);
    prom.wait_for(&format!("sum(istio_tcp_connections_closed_total{{reporter=\"source\",{echo}}})"), 3.0, &plog);
    let dest = "reporter=\"destination\",destination_workload=\"echo\",source_workload=\"client\",connection_security_policy=\"mutual_tls\"";
    prom.wait_for(&format!("sum(istio_tcp_sent_bytes_total{{{dest}}})"), 30000.0, &plog);
    prom.wait_for(&format!("sum(istio_tcp_connections_closed_total{{{dest}}})"), 3.0, &plog);
    // Same node: one proxy, both reporters.
    prom.wait_for("sum(istio_requests_total{reporter=\"destination\",destination_workload=\"old\"})", 5.0, &plog);
    prom.wait_for("sum(istio_requests_total{reporter=\"source\",destination_workload=\"old\",connection_security_policy=\"none\"})", 5.0, &plog);
    // The failed request: flagged.
    prom.wait_for("sum(istio_requests_total{destination_service_name=\"down\",response_code=\"503\",response_flags=\"UF,URX\"})", 1.0, &plog);

    // The mesh's own metrics.
    // One captured connection per client run above (seven).
    let captured = prom.scalar("sum(mesh_capture_captured_total)").unwrap_or(0.0);
    assert!(captured >= 7.0, "captured connections: {captured}");
    assert!(prom.scalar("sum(mesh_retries_total)").unwrap_or(0.0) >= 2.0, "retries of the refused connection");
    let expiry = prom.scalar("mesh_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/demo/sa/client\"}").unwrap_or(0.0);
    assert!(expiry > 3600.0, "client certificate expiry in {expiry} s");
    assert!(prom.scalar("sum(process_resident_memory_bytes)").unwrap_or(0.0) > 1e6);
    // Whole seconds (the process collector's resolution): present on both nodes is what a
    // short test can check.
    assert_eq!(prom.query("process_cpu_seconds_total").len(), 2);

    // The access log: a JSON line per request, the refused one with its flags.
    let log = c.proxy_log(0);
    let lines: Vec<Value> = log.lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let failed = lines.iter().find(|l| l["upstream_cluster"] == "outbound|80||down.demo.svc.cluster.local").unwrap_or_else(|| panic!("no access log line for down:\n{log}"));
    assert_eq!(failed["response_code"], 503, "{failed}");
    assert_eq!(failed["response_flags"], "UF,URX", "{failed}");
    assert_eq!(failed["method"], "GET");
    assert_eq!(failed["source_workload"], "demo/client");
    assert!(failed["upstream_host"].as_str().is_some_and(|h| h.ends_with(":8080")), "{failed}");
    assert_eq!(lines.iter().filter(|l| l["upstream_cluster"] == format!("outbound|80||{WEB}")).count(), 100);
    assert_eq!(lines.iter().filter(|l| l["protocol"] == "tcp" && l["bytes_sent"] == 10000).count(), 3, "TCP connections are logged too");

    // Bounded cardinality: a workload that leaves the config leaves /metrics.
    let metrics = || curl(&c, 0, &["-s", "http://127.0.0.1:15020/metrics"]);
    assert!(metrics().contains("destination_workload=\"old\""));
    let reloads = |m: &str| m.lines().find_map(|l| l.strip_prefix("mesh_config_reloads_total ")).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    let before = reloads(&metrics());
    let without_old: Vec<&str> = c.cluster_yaml().leak().split("---\n").filter(|doc| !doc.contains("name: old-1\n")).collect();
    c.write_config_file("cluster.yaml", &without_old.join("---\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&metrics()) <= before {
        assert!(Instant::now() < deadline, "node-a did not reload the config");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = metrics();
    assert!(!after.contains("destination_workload=\"old\""), "series of the removed workload are gone");
    assert!(after.contains("destination_workload=\"web\""), "the others stay");
}

/// rotel, an OTLP collector, in node-a's network namespace, logging every span it receives.
fn start_collector(c: &SimCluster) -> PathBuf {
    let rotel = mesh_e2e::tools::python().parent().unwrap().parent().unwrap().join("lib");
    let agent = fs::read_dir(&rotel)
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path().join("site-packages/rotel/rotel-agent")).find(|p| p.is_file()))
        .expect("rotel-agent in the venv (`cargo xtask setup` installs rotel)");
    let log = c.log_dir().join("rotel.log");
    let dir = c.log_dir().to_str().unwrap().to_string();
    c.spawn_in_netns(
        &c.node(0).netns,
        &agent,
        &[
            "start",
            "--otlp-grpc-endpoint",
            "127.0.0.1:4317",
            "--otlp-http-endpoint",
            "127.0.0.1:4318",
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "detailed",
            "--pid-file",
            &format!("{dir}/rotel.pid"),
            "--log-file",
            &format!("{dir}/rotel-agent.log"),
        ],
        &log,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(&log).unwrap_or_default().contains("Starting Rotel") {
        assert!(Instant::now() < deadline, "rotel did not start:\n{}", fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    log
}

#[test]
fn otlp_collector_receives_spans_linked_to_the_callers_trace() {
    let mut spec = spec();
    spec.start_proxies = false;
    let c = SimCluster::start(spec).expect("simulated cluster");
    let log = start_collector(&c);
    // Sampling 0: only callers that sampled their own span are traced, so the test sees
    // exactly its own requests.
    for i in 0..c.nodes.len() {
        c.start_proxy_with(i, &["--otlp-endpoint", "http://127.0.0.1:4317", "--trace-sampling", "0"]).unwrap();
    }
    let probe = bins::path("mesh-probe");
    c.serve_in_pod("web-1", &probe, &["http-serve", "--name", "web-1", "--port", "8080"], 8080).unwrap();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let v = http(&c, "http://10.96.0.50/headers", &["--header", &format!("traceparent: 00-{trace}-{client_span}-01"), "--print-body"]);
    let received: Value = serde_json::from_str(v["last_body"].as_str().unwrap_or_default().trim()).unwrap_or_else(|e| panic!("{e}: {v}"));
    // The server's parent is the proxy's span, in the caller's trace.
    let tp = received["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent reached the server: {received}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], trace, "{tp}");
    assert_eq!(parts[3], "01", "{tp}");
    let proxy_span = parts[2];
    assert_ne!(proxy_span, client_span, "the proxy adds a span of its own");

    // B3 callers get B3 back, with the proxy's span and the caller's as its parent.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let v = http(
        &c,
        "http://10.96.0.50/headers",
        &["--header", &format!("x-b3-traceid: {b3_trace}"), "--header", "x-b3-spanid: e457b5a2e4d86bd1", "--header", "x-b3-sampled: 1", "--print-body"],
    );
    let b3: Value = serde_json::from_str(v["last_body"].as_str().unwrap_or_default().trim()).unwrap();
    assert_eq!(b3["x-b3-traceid"], b3_trace, "{b3}");
    assert_eq!(b3["x-b3-parentspanid"], "e457b5a2e4d86bd1", "{b3}");
    assert_ne!(b3["x-b3-spanid"], "e457b5a2e4d86bd1", "{b3}");

    // An unsampled caller is not traced and its context passes untouched.
    let unsampled = format!("00-{}-{client_span}-00", "1".repeat(32));
    let v = http(&c, "http://10.96.0.50/headers", &["--header", &format!("traceparent: {unsampled}"), "--print-body"]);
    let plain: Value = serde_json::from_str(v["last_body"].as_str().unwrap_or_default().trim()).unwrap();
    assert_eq!(plain["traceparent"], unsampled.as_str());

    // The collector got the proxy's span: the caller's trace, the caller's span as parent.
    let deadline = Instant::now() + Duration::from_secs(20);
    let b3_span = b3["x-b3-spanid"].as_str().unwrap().to_string();
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let spans = collector_spans(&text);
        let ours = spans.iter().find(|s| s.id == proxy_span);
        let b3_seen = spans.iter().find(|s| s.id == b3_span);
        if let (Some(span), Some(b3_seen)) = (ours, b3_seen) {
            assert_eq!(span.trace, trace, "{}", span.text);
            assert_eq!(span.parent, client_span, "{}", span.text);
            assert_eq!(span.name, "web.demo.svc.cluster.local:80/*", "{}", span.text);
            assert!(span.text.contains("http.status_code: Int(200)"), "{}", span.text);
            assert!(span.text.contains("SPAN_KIND_CLIENT"), "{}", span.text);
            assert_eq!((b3_seen.trace.as_str(), b3_seen.parent.as_str()), (b3_trace, "e457b5a2e4d86bd1"), "{}", b3_seen.text);
            assert_eq!(spans.len(), 2, "only the sampled requests are exported:\n{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no span {proxy_span} at the collector:\n{text}\nnode-a log:\n{}", c.proxy_log(0));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A span as the collector's debug log prints it.
struct SeenSpan {
    trace: String,
    parent: String,
    id: String,
    name: String,
    text: String,
}

/// The spans in rotel's detailed debug log (`Span #n` records of `Field : value` lines).
fn collector_spans(log: &str) -> Vec<SeenSpan> {
    let plain: String = {
        // Drop ANSI colour sequences.
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(ch);
            }
        }
        out
    };
    plain
        .split("Span #")
        .skip(1)
        .map(|block| {
            let field = |name: &str| {
                block.lines().find_map(|l| l.trim().strip_prefix(name).and_then(|r| r.trim_start().strip_prefix(':')).map(|v| v.trim().to_string())).unwrap_or_default()
            };
            SeenSpan { trace: field("Trace ID"), parent: field("Parent ID"), id: field("ID"), name: field("Name"), text: block.to_string() }
        })
        .collect()
}
