//! Criterion micro-benchmarks of the proxy's per-request hot paths, so regressions show:
//!
//! - `route/*`: VirtualService route selection (`http::router::select`) over ten routes with
//!   header exact/prefix/regex, URI exact/prefix/regex and method matches: the first route
//!   matching, the last one matching, none matching, and the per-request lookup of the
//!   Service's VirtualServices.
//! - `pick/<POLICY>/<endpoints>`: `ClusterBalancer::pick` (and dropping the pick's guard) for
//!   every balancing policy, with 4 and 64 endpoints.
//! - `outlier/*`: `ClusterBalancer::report` bookkeeping: a success, a 5xx below the threshold,
//!   a run of 5xx ending in an inline ejection, and a pick while a host is ejected.
//! - `headers/*`: the header work `http/proxy.rs` does on each request and response: trace
//!   context propagation, upgrade detection, VirtualService header rules, hop-by-hop stripping.
//!
//! Everything is built through the crate's public API from Istio YAML, as the config loader
//! does. Quick by default (0.5 s warm-up, 2 s measurement per benchmark):
//!
//! ```sh
//! cargo bench -p mesh-node --bench hot_paths            # everything (about a minute)
//! cargo bench -p mesh-node --bench hot_paths -- pick/   # one family
//! ```
use std::{
    hint::black_box,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, request::Parts};
use mesh_node::{
    balance::{Clock, ClusterBalancer, Outcome, hash_key},
    config::{Cluster, Endpoint, HttpRoute, LbPolicy, OutlierDetection, Service, VirtualService},
    http::{
        headers,
        router::{self, RequestInfo, Selected},
    },
    telemetry::trace::Tracer,
};

const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: Service
metadata:
  name: recall
  namespace: demo
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
";

/// Ten routes, evaluated in order; the last one (`api`) also carries header rules.
const VIRTUAL_SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: recall
  namespace: demo
spec:
  hosts: [recall]
  http:
  - name: canary
    match:
    - headers:
        x-canary:
          exact: "true"
    route:
    - destination: {host: recall}
  - name: bots
    match:
    - headers:
        user-agent:
          prefix: Googlebot
    route:
    - destination: {host: recall}
  - name: testers
    match:
    - headers:
        x-user-id:
          regex: "test-[0-9]+"
    route:
    - destination: {host: recall}
  - name: admin
    match:
    - uri:
        prefix: /admin
      method:
        exact: DELETE
    route:
    - destination: {host: recall}
  - name: items-write
    match:
    - uri:
        regex: "/v[0-9]+/items/[0-9]+"
      method:
        exact: POST
    route:
    - destination: {host: recall}
  - name: health
    match:
    - uri:
        exact: /healthz
    route:
    - destination: {host: recall}
  - name: gold
    match:
    - headers:
        x-tenant:
          exact: gold
      uri:
        prefix: /api
    route:
    - destination: {host: recall}
  - name: uploads
    match:
    - uri:
        prefix: /upload
      method:
        exact: PUT
    route:
    - destination: {host: recall}
  - name: grpc
    match:
    - headers:
        content-type:
          prefix: application/grpc
      uri:
        prefix: /recall.Recall/
    route:
    - destination: {host: recall}
  - name: api
    match:
    - uri:
        prefix: /api/v1
      method:
        regex: "GET|HEAD"
    headers:
      request:
        set:
          x-mesh-route: api
          x-env: prod
        add:
          x-forwarded-client: mesh
        remove: [x-debug, x-internal-token]
      response:
        set:
          cache-control: no-store
        remove: [server, x-powered-by]
    route:
    - destination: {host: recall}
      headers:
        request:
          set:
            x-destination: recall
        response:
          add:
            x-served-by: recall
"#;

fn cluster(extra: &str) -> Cluster {
    Cluster::from_yaml_files([("base.yaml", BASE), ("extra.yaml", extra)])
        .unwrap_or_else(|e| panic!("bench config: {e}"))
}

fn service(c: &Cluster) -> &Service {
    c.service("demo", "recall").expect("Service demo/recall")
}

/// A browser-ish request as the proxy sees it after hyper parsed it.
fn request(method: &str, uri: &str, extra: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "recall.demo.svc.cluster.local")
        .header(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
        )
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, deflate, br")
        .header("content-type", "application/json")
        .header("x-user-id", "user-4217")
        .header("x-tenant", "silver")
        .header("x-request-id", "5f0c1d5e-8a3b-4c2f-9e61-2b7d0f3a9c44")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("cookie", "session=abc123; theme=dark")
        .header("connection", "keep-alive")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-debug", "1");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn route_name(selected: Selected<'_>) -> &str {
    match selected {
        Selected::Route { route, .. } => route.name.as_deref().unwrap_or(""),
        Selected::Default => "default",
        Selected::NoMatch => "nomatch",
    }
}

fn route_match(c: &mut Criterion) {
    let cluster = cluster(VIRTUAL_SERVICE);
    let svc = service(&cluster);
    let vss: Vec<&VirtualService> = cluster.virtual_services_for(svc, None);
    assert_eq!(vss.len(), 1);
    assert_eq!(vss[0].http.len(), 10);
    let cases = [
        (
            "first_route",
            request("GET", "/api/v1/recall?user=4217", &[("x-canary", "true")]),
            "canary",
        ),
        (
            "last_route",
            request("GET", "/api/v1/recall?user=4217", &[]),
            "api",
        ),
        ("no_match", request("GET", "/static/app.js", &[]), "nomatch"),
    ];
    let mut group = c.benchmark_group("route");
    for (name, parts, want) in &cases {
        let info = RequestInfo {
            parts,
            port: 80,
            source: None,
        };
        assert_eq!(route_name(router::select(&vss, &info)), *want, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| {
                matches!(
                    router::select(black_box(&vss), black_box(&info)),
                    Selected::Route { .. }
                )
            })
        });
    }
    // What the proxy does before `select` on every request: the Service's VirtualServices.
    group.bench_function("virtual_services_for", |b| {
        b.iter(|| cluster.virtual_services_for(black_box(svc), None).len())
    });
    group.finish();
}

/// `(lb policy, mesh.io/load-balancer: peak-ewma, outlierDetection)` of a DestinationRule for
/// `recall` (`annotations` and `traffic_policy` as indented YAML lines, either may be empty),
/// parsed and validated as the config loader does.
fn destination_policy(
    annotations: &str,
    traffic_policy: &str,
) -> (Option<LbPolicy>, bool, Option<OutlierDetection>) {
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    let traffic_policy = if traffic_policy.is_empty() {
        String::new()
    } else {
        format!("  trafficPolicy:\n{traffic_policy}")
    };
    let dr = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: recall\n  namespace: demo\n{annotations}spec:\n  host: recall\n{traffic_policy}"
    );
    let c = cluster(&dr);
    let rule = c
        .destination_rule_for(service(&c), None)
        .expect("DestinationRule");
    let policy = rule.traffic_policy.clone().unwrap_or_default().for_port(80);
    (
        policy.load_balancer.map(|l| l.policy),
        rule.mesh.peak_ewma,
        policy.outlier_detection,
    )
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            pod_namespace: "demo".into(),
            pod_name: format!("recall-7d9f8c6b5-{i:05}"),
            node: format!("node-{}", i % 3),
            addr: SocketAddr::from(([10, 244, (i / 250) as u8, (i % 250 + 2) as u8], 8080)),
            conditions: Default::default(),
            hostname: None,
        })
        .collect()
}

fn balancer(n: usize, annotations: &str, traffic_policy: &str) -> ClusterBalancer {
    let (lb, peak_ewma, outlier) = destination_policy(annotations, traffic_policy);
    let b = ClusterBalancer::new("outbound|80||recall.demo.svc.cluster.local".into());
    b.update_with(endpoints(n), lb, peak_ewma, outlier);
    b
}

fn balancer_pick(c: &mut Criterion) {
    let policies: [(&str, &str, &str); 6] = [
        (
            "LEAST_REQUEST",
            "",
            "    loadBalancer: {simple: LEAST_REQUEST}\n",
        ),
        (
            "ROUND_ROBIN",
            "",
            "    loadBalancer: {simple: ROUND_ROBIN}\n",
        ),
        ("RANDOM", "", "    loadBalancer: {simple: RANDOM}\n"),
        (
            "RING_HASH",
            "",
            "    loadBalancer:\n      consistentHash: {httpHeaderName: x-user-id, ringHash: {minimumRingSize: 1024}}\n",
        ),
        (
            "MAGLEV",
            "",
            "    loadBalancer:\n      consistentHash: {httpHeaderName: x-user-id, maglev: {tableSize: 65537}}\n",
        ),
        ("PEAK_EWMA", "    mesh.io/load-balancer: peak-ewma\n", ""),
    ];
    // Consistent-hash keys as the proxy computes them from the request's header.
    let hashes: Vec<u64> = (0..1024)
        .map(|i| hash_key(format!("user-{i}").as_bytes()))
        .collect();
    let mut group = c.benchmark_group("pick");
    for (name, annotations, traffic_policy) in policies {
        let hashed = name == "RING_HASH" || name == "MAGLEV";
        for n in [4usize, 64] {
            let b = balancer(n, annotations, traffic_policy);
            // Picks kept for the whole benchmark: requests in flight.
            let mut held = Vec::new();
            let snapshot = b.snapshot();
            assert_eq!(snapshot.policy, name);
            if name == "PEAK_EWMA" {
                // Every endpoint measured, at different speeds, as in steady traffic.
                for (i, e) in snapshot.endpoints.iter().enumerate() {
                    b.report_latency(e.addr, Duration::from_micros(500 + 150 * i as u64));
                }
            }
            if name == "LEAST_REQUEST" || name == "PEAK_EWMA" {
                // Some requests in flight, so the comparisons are not all ties.
                held = (0..n / 2).filter_map(|_| b.pick(None, &[]).ok()).collect();
            }
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    i = (i + 1) & 1023;
                    let hash = hashed.then(|| hashes[i]);
                    b.pick(black_box(hash), black_box(&[]))
                        .map(|p| p.endpoint.addr)
                })
            });
            drop(held);
        }
    }
    group.finish();
}

/// A clock the ejection benchmark steps past every ejection, so each iteration ejects afresh.
struct SteppedClock {
    base: Instant,
    offset_ns: AtomicU64,
}

impl SteppedClock {
    fn advance(&self, by: Duration) {
        self.offset_ns
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for SteppedClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }
}

fn outlier(c: &mut Criterion) {
    const ISTIO: &str = "    outlierDetection:\n      consecutive5xxErrors: 5\n      interval: 10s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 50\n";
    let (lb, _, od) = destination_policy(
        "",
        &format!("    loadBalancer: {{simple: LEAST_REQUEST}}\n{ISTIO}"),
    );
    let eps = endpoints(4);
    let target = eps[1].addr;
    let mut group = c.benchmark_group("outlier");

    let b = ClusterBalancer::new("outbound|80||recall.demo.svc.cluster.local".into());
    b.update(eps.clone(), lb.clone(), od.clone());
    group.bench_function("report_success", |bench| {
        bench.iter(|| b.report(black_box(target), black_box(Outcome::HttpStatus(200))))
    });

    // The same path as a 5xx that counts towards a threshold, with one that is never reached
    // during the benchmark (so every iteration is the non-ejecting bookkeeping).
    let (lb_far, _, od_far) = destination_policy(
        "",
        "    loadBalancer: {simple: LEAST_REQUEST}\n    outlierDetection:\n      consecutive5xxErrors: 2000000000\n      interval: 10s\n      baseEjectionTime: 30s\n",
    );
    let b = ClusterBalancer::new("outbound|80||recall.demo.svc.cluster.local".into());
    b.update(eps.clone(), lb_far, od_far);
    group.bench_function("report_5xx", |bench| {
        bench.iter(|| b.report(black_box(target), black_box(Outcome::HttpStatus(503))))
    });

    // Five consecutive 5xx, the fifth ejecting inline (with its log line and metric); the
    // clock then moves past the ejection, so the next iteration's first report returns the
    // host first. Time is per run of five reports.
    let clock = Arc::new(SteppedClock {
        base: Instant::now(),
        offset_ns: AtomicU64::new(0),
    });
    let b = ClusterBalancer::with_clock(
        "outbound|80||recall.demo.svc.cluster.local".into(),
        clock.clone(),
    );
    b.update(eps.clone(), lb.clone(), od.clone());
    let eject_run = || {
        for _ in 0..5 {
            b.report(black_box(target), Outcome::HttpStatus(503));
        }
        clock.advance(Duration::from_secs(3600));
    };
    for _ in 0..5 {
        b.report(target, Outcome::HttpStatus(503));
    }
    assert!(b.snapshot().endpoints[1].ejected, "the fifth 5xx ejects");
    clock.advance(Duration::from_secs(3600));
    group.bench_function("five_5xx_with_ejection", |bench| bench.iter(eject_run));

    // A pick while one of 64 hosts is ejected: expired ejections are checked and the
    // ejected host is skipped.
    let (lb, _, od) = destination_policy(
        "",
        "    loadBalancer: {simple: LEAST_REQUEST}\n    outlierDetection:\n      consecutive5xxErrors: 5\n      baseEjectionTime: 1h\n      maxEjectionPercent: 50\n",
    );
    let b = ClusterBalancer::new("outbound|80||recall.demo.svc.cluster.local".into());
    let eps = endpoints(64);
    b.update(eps.clone(), lb, od);
    for _ in 0..5 {
        b.report(eps[7].addr, Outcome::HttpStatus(500));
    }
    assert!(b.snapshot().endpoints[7].ejected);
    group.bench_function("pick_with_ejected_host/64", |bench| {
        bench.iter(|| b.pick(None, black_box(&[])).map(|p| p.endpoint.addr))
    });
    group.finish();
}

fn header_handling(c: &mut Criterion) {
    let cluster = cluster(VIRTUAL_SERVICE);
    let vss = cluster.virtual_services_for(service(&cluster), None);
    let route: &HttpRoute = vss[0]
        .http
        .iter()
        .find(|r| r.name.as_deref() == Some("api"))
        .expect("api route");
    let route_headers = route.headers.as_ref().expect("route header rules");
    let dest_headers = route.route[0]
        .headers
        .as_ref()
        .expect("destination header rules");
    let req = request(
        "GET",
        "/api/v1/recall?user=4217",
        &[("x-internal-token", "s3cr3t")],
    );
    let request_headers: HeaderMap = req.headers.clone();
    let response_headers: HeaderMap = {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("content-length", "1832"),
            ("date", "Tue, 14 Apr 2026 10:00:00 GMT"),
            ("server", "uvicorn"),
            ("x-powered-by", "starlette"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("vary", "accept-encoding"),
        ] {
            h.append(k, v.parse().expect("header value"));
        }
        h
    };
    // Tracing at Istio's default 1% ratio; the request carries a sampled W3C parent, so the
    // proxy's span is created and injected.
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let tracer = Tracer::new(0.01, tx);

    let mut group = c.benchmark_group("headers");
    group.bench_function("is_upgrade", |b| {
        b.iter(|| headers::is_upgrade(black_box(&request_headers)))
    });
    group.bench_function("trace_propagation", |b| {
        b.iter_batched(
            || request_headers.clone(),
            |mut h| {
                let span = tracer.start(&mut h);
                (h, span)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("virtual_service_rules", |b| {
        b.iter_batched(
            || request_headers.clone(),
            |mut h| {
                headers::apply(&route_headers.request, &mut h);
                headers::apply(&dest_headers.request, &mut h);
                h
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched(
            || request_headers.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, false);
                h
            },
            BatchSize::SmallInput,
        )
    });
    // Everything `http/proxy.rs` does to a request's headers, in its order, including the
    // copy each upstream attempt sends.
    group.bench_function("request_path", |b| {
        b.iter_batched(
            || request_headers.clone(),
            |mut h| {
                let span = tracer.start(&mut h);
                let upgrade = headers::is_upgrade(&h);
                headers::apply(&route_headers.request, &mut h);
                headers::apply(&dest_headers.request, &mut h);
                headers::strip_hop_by_hop(&mut h, upgrade);
                let upstream = h.clone();
                (h, upstream, span)
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("response_path", |b| {
        b.iter_batched(
            || response_headers.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, false);
                headers::apply(&route_headers.response, &mut h);
                headers::apply(&dest_headers.response, &mut h);
                h
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = hot_paths;
    config = quick();
    targets = route_match, balancer_pick, outlier, header_handling
}
criterion_main!(hot_paths);
