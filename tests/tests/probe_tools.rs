//! The probe tools themselves, without the mesh: `mesh-probe http-serve` / `http` /
//! `http-concurrent` / `ws` and the Python gRPC probes, on 127.0.0.1 in the host namespace.
//! No root needed. Every server is killed when its test ends, also on panic.
use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher as _, Hasher as _},
    io::Read as _,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use mesh_e2e::tools;

const PROBE: &str = env!("CARGO_BIN_EXE_mesh-probe");
/// Upper bound for one client run; the clients' own per-request timeouts are far below it.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// Servers of one test, killed on drop.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Procs {
    /// Starts a server on a free port and waits until it accepts.
    fn start(&mut self, program: &Path, args: &[&str]) -> u16 {
        let port = free_port();
        let child = Command::new(program)
            .args(args)
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        self.0.push(child);
        wait_listening(port, self.0.last_mut().expect("just pushed"));
        port
    }

    fn http(&mut self, name: &str, extra: &[&str]) -> u16 {
        let mut args = vec!["http-serve", "--name", name];
        args.extend_from_slice(extra);
        self.start(Path::new(PROBE), &args)
    }

    fn grpc(&mut self, name: &str, extra: &[&str]) -> u16 {
        let script = tools::grpc_script("probe_server.py");
        let mut args = vec![script.to_str().expect("utf-8 path"), "--name", name];
        args.extend_from_slice(extra);
        self.start(&tools::python(), &args)
    }
}

/// Ports from 20000 up, spread randomly so parallel tests and runs rarely meet; checked free.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (RandomState::new().build_hasher().finish() % 30000) as u16;
    for _ in 0..200 {
        let port = base + NEXT.fetch_add(7, Ordering::SeqCst) % 10000;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port near {base}");
}

fn wait_listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server for port {port} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listening on 127.0.0.1:{port} after 20s");
}

/// Runs a client to completion (killed past CLIENT_LIMIT); returns its exit success and stdout.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + CLIENT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} still running after {CLIENT_LIMIT:?}", program.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.success(), reader.join().expect("reader"))
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON line ({e}): {out:?}"))
}

fn probe(args: &[&str]) -> serde_json::Value {
    let (ok, out) = run(Path::new(PROBE), args);
    assert!(ok, "mesh-probe {args:?} failed: {out}");
    json(&out)
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

fn grpc_client(port: u16, extra: &[&str]) -> serde_json::Value {
    let script = tools::grpc_script("probe_client.py");
    let target = format!("127.0.0.1:{port}");
    let mut args = vec![script.to_str().expect("utf-8 path"), "--target", &target];
    args.extend_from_slice(extra);
    let (ok, out) = run(&tools::python(), &args);
    assert!(ok, "probe_client {args:?} failed: {out}");
    json(&out)
}

#[test]
fn http1_names_the_pod_and_spreads_requests_over_persistent_connections() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let r = probe(&["http", &url(a, "/"), "--count", "9", "--conns", "3", "--expect-all-ok", "--print-body"]);
    assert_eq!(r["requests"], 9, "{r}");
    assert_eq!(r["by_pod"], serde_json::json!({"a": 9}), "{r}");
    assert_eq!(r["by_status"], serde_json::json!({"200": 9}), "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert_eq!(r["connections_opened"], 3, "keep-alive: one open per connection slot: {r}");
    assert_eq!(r["pods_in_order"].as_array().unwrap().len(), 9, "{r}");
    assert_eq!(r["last_body"], "a\n", "{r}");
    assert!(r["p50_us"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn h2_prior_knowledge_multiplexes_one_connection() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let r = probe(&["http", &url(a, "/headers"), "--h2", "--count", "20", "--expect-all-ok", "--print-body"]);
    assert_eq!(r["by_pod"]["a"], 20, "{r}");
    assert_eq!(r["connections_opened"], 1, "{r}");
    let seen = json(r["last_body"].as_str().unwrap());
    assert_eq!(seen[":version"], "HTTP/2.0", "the server spoke h2: {seen}");
    assert_eq!(seen[":authority"], format!("127.0.0.1:{a}"), "{seen}");
}

#[test]
fn headers_endpoint_reports_what_the_server_received() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let r = probe(&[
        "http", &url(a, "/headers?q=1"), "--method", "PUT", "--print-body", "--expect-all-ok",
        "--header", "X-Multi: one", "--header", "x-multi: two", "--header", "x-single: v",
    ]);
    let seen = json(r["last_body"].as_str().unwrap());
    assert_eq!(seen["x-multi"], "one,two", "{seen}");
    assert_eq!(seen["x-single"], "v", "{seen}");
    assert_eq!(seen["x-pod"], "a", "{seen}");
    assert_eq!(seen[":method"], "PUT", "{seen}");
    assert_eq!(seen[":path"], "/headers?q=1", "{seen}");
    assert_eq!(seen["host"], format!("127.0.0.1:{a}"), "{seen}");
    assert_eq!(seen[":version"], "HTTP/1.1", "{seen}");
}

#[test]
fn fail_every_fails_each_nth_request_across_connections() {
    let mut p = Procs::default();
    let b = p.http("b", &["--fail-every", "3"]);
    let (ok, out) = run(Path::new(PROBE), &["http", &url(b, "/"), "--count", "9", "--conns", "2", "--expect-all-ok"]);
    assert!(!ok, "--expect-all-ok with 503s must exit non-zero: {out}");
    let r = json(&out);
    assert_eq!(r["by_status"], serde_json::json!({"200": 6, "503": 3}), "{r}");
    assert_eq!(r["by_pod"]["b"], 9, "failures carry x-pod too: {r}");
    let order: Vec<_> = r["pods_in_order"].as_array().unwrap().iter().collect();
    assert_eq!(order.len(), 9, "{r}");
    // /count does not count itself.
    for _ in 0..2 {
        let c = probe(&["http", &url(b, "/count"), "--print-body"]);
        assert_eq!(json(c["last_body"].as_str().unwrap())["requests"], 9, "{c}");
    }
}

#[test]
fn request_headers_script_failures_and_statuses() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let b = p.http("b", &[]);
    let fail = ["--header", "x-fail-pods: b,c", "--header", "x-fail-status: 502"];
    let ra = probe(&[&["http", &url(a, "/"), "--count", "3"][..], &fail].concat());
    assert_eq!(ra["by_status"], serde_json::json!({"200": 3}), "a is not listed: {ra}");
    let rb = probe(&[&["http", &url(b, "/"), "--count", "3"][..], &fail].concat());
    assert_eq!(rb["by_status"], serde_json::json!({"502": 3}), "{rb}");
    let rb = probe(&["http", &url(b, "/"), "--count", "2", "--header", "x-fail-pods: b"]);
    assert_eq!(rb["by_status"], serde_json::json!({"503": 2}), "default failure status: {rb}");
    let teapot = probe(&["http", &url(a, "/status/418"), "--h2", "--count", "2"]);
    assert_eq!(teapot["by_status"], serde_json::json!({"418": 2}), "{teapot}");
}

#[test]
fn delays_by_header_and_flag_and_client_timeouts() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let slow = p.http("slow", &["--delay-ms", "120"]);

    let r = probe(&["http", &url(a, "/"), "--count", "3", "--header", "x-delay-ms: 150"]);
    assert!(r["p50_us"].as_f64().unwrap() >= 150_000.0, "{r}");
    let r = probe(&["http", &url(a, "/"), "--count", "3", "--header", "x-delay-pods: b=900,a=100"]);
    assert!((100_000.0..800_000.0).contains(&r["p50_us"].as_f64().unwrap()), "a's own entry applies: {r}");
    let r = probe(&["http", &url(slow, "/"), "--count", "2", "--h2"]);
    assert!(r["p50_us"].as_f64().unwrap() >= 120_000.0, "{r}");

    let target = url(a, "/");
    for proto in [&[][..], &["--h2"][..]] {
        let args = [&["http", &target, "--count", "3", "--timeout-ms", "100", "--header", "x-delay-pods: a=400"][..], proto].concat();
        let r = probe(&args);
        assert_eq!(r["errors"], serde_json::json!({"timeout": 3}), "{proto:?}: {r}");
        assert_eq!(r["by_status"], serde_json::json!({}), "{r}");
    }
}

#[test]
fn echo_streams_5mib_back_over_http1_and_h2() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let size = 5 * 1024 * 1024;
    let (target, bytes) = (url(a, "/echo"), size.to_string());
    for proto in [&[][..], &["--h2"][..]] {
        let args = [&["http", &target, "--method", "POST", "--body-bytes", &bytes, "--count", "2", "--expect-all-ok"][..], proto].concat();
        let r = probe(&args);
        assert_eq!(r["body_bytes"], 2 * size, "{proto:?}: {r}");
        assert_eq!(r["connections_opened"], 1, "{r}");
    }
}

#[test]
fn ws_upgrade_echoes_raw_bytes() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let r = probe(&["ws", &url(a, "/ws"), "--bytes", &(3 * 1024 * 1024 + 17).to_string()]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"], 101, "{r}");
    // Without Upgrade the endpoint refuses rather than hanging.
    let r = probe(&["http", &url(a, "/ws")]);
    assert_eq!(r["by_status"], serde_json::json!({"426": 1}), "{r}");
}

#[test]
fn concurrency_keeps_k_requests_in_flight() {
    let mut p = Procs::default();
    let a = p.http("a", &["--delay-ms", "300"]);
    // 16 requests of 300 ms, 8 at a time: about 600 ms; one at a time would be 4.8 s.
    let r = probe(&["http-concurrent", &url(a, "/"), "--h2", "--concurrency", "8", "--count", "16", "--expect-all-ok"]);
    assert_eq!(r["connections_opened"], 1, "h2 multiplexes: {r}");
    assert_eq!(r["max_in_flight"], 8, "{r}");
    assert!(r["elapsed_ms"].as_f64().unwrap() < 2400.0, "{r}");

    let r = probe(&["http", &url(a, "/"), "--concurrency", "4", "--count", "8", "--expect-all-ok"]);
    assert_eq!(r["connections_opened"], 4, "one HTTP/1.1 connection per request in flight: {r}");
    assert_eq!(r["max_in_flight"], 4, "{r}");
    assert!(r["elapsed_ms"].as_f64().unwrap() < 2000.0, "{r}");

    let (ok, _) = run(Path::new(PROBE), &["http-concurrent", &url(a, "/")]);
    assert!(!ok, "http-concurrent without --concurrency is refused");
}

#[test]
fn rate_paces_request_starts() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let r = probe(&["http", &url(a, "/"), "--count", "10", "--rate", "40", "--conns", "2", "--expect-all-ok"]);
    // The 10th start is due at 9/40 s.
    assert!(r["elapsed_ms"].as_f64().unwrap() >= 220.0, "{r}");
    assert_eq!(r["by_pod"]["a"], 10, "{r}");
}

#[test]
fn connect_errors_are_counted_not_fatal() {
    let port = free_port();
    let (ok, out) = run(Path::new(PROBE), &["http", &url(port, "/"), "--count", "3", "--timeout-ms", "1000"]);
    assert!(ok, "without --expect-all-ok errors are reported, exit 0: {out}");
    let r = json(&out);
    assert_eq!(r["errors"], serde_json::json!({"connect": 3}), "{r}");
    assert_eq!(r["connections_opened"], 0, "{r}");
    let (ok, _) = run(Path::new(PROBE), &["http", &url(port, "/"), "--count", "1", "--expect-all-ok"]);
    assert!(!ok);
}

#[test]
fn grpc_probes_report_pods_and_status_codes() {
    let mut p = Procs::default();
    let a = p.grpc("a", &["--fail-every", "3"]);
    let b = p.grpc("b", &[]);

    let r = grpc_client(a, &["--count", "9"]);
    assert_eq!(r["calls"], 9, "{r}");
    assert_eq!(r["by_pod"], serde_json::json!({"a": 9}), "{r}");
    assert_eq!(r["by_code"], serde_json::json!({"OK": 6, "UNAVAILABLE": 3}), "{r}");

    let fail = ["--method", "Fail", "--count", "4", "--metadata", "x-fail-pods=a,b", "--metadata", "x-grpc-status=UNAVAILABLE"];
    let r = grpc_client(b, &fail);
    assert_eq!(r["by_code"], serde_json::json!({"UNAVAILABLE": 4}), "{r}");
    assert_eq!(r["by_pod"], serde_json::json!({"b": 4}), "failed calls still name the pod: {r}");
    let r = grpc_client(b, &["--method", "Fail", "--count", "2", "--metadata", "x-fail-pods=a"]);
    assert_eq!(r["by_code"], serde_json::json!({"OK": 2}), "{r}");
    let r = grpc_client(b, &["--method", "Fail", "--count", "1", "--metadata", "x-fail-pods=b", "--metadata", "x-grpc-status=resource_exhausted"]);
    assert_eq!(r["by_code"], serde_json::json!({"RESOURCE_EXHAUSTED": 1}), "{r}");

    let nobody = free_port();
    let r = grpc_client(nobody, &["--count", "2", "--timeout", "2"]);
    assert_eq!(r["by_code"], serde_json::json!({"UNAVAILABLE": 2}), "{r}");
    assert_eq!(r["by_pod"], serde_json::json!({}), "{r}");
}

#[test]
fn progress_lines_tally_each_second_and_the_report_comes_last() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    // 2.5 s of calls at 40/s: two whole seconds of progress, the rest only in the report.
    let (ok, out) = run(Path::new(PROBE), &["http", &url(a, "/grpc"), "--h2", "--grpc", "--count", "100", "--rate", "40", "--progress-ms", "1000", "--expect-all-ok"]);
    assert!(ok, "{out}");
    let lines: Vec<serde_json::Value> = out.lines().map(json).collect();
    let (report, progress) = lines.split_last().expect("some output");
    assert_eq!(report["progress"], serde_json::Value::Null, "the report is last: {out}");
    assert_eq!(report["by_pod"]["a"], 100, "{report}");
    // A third line only if the VM is so loaded the last calls end after 3 s.
    assert!((2..=3).contains(&progress.len()), "one line a second: {out}");
    for (i, w) in progress.iter().enumerate() {
        assert_eq!(w["progress"], true, "{w}");
        let n = w["requests"].as_u64().unwrap();
        if i < 2 {
            assert!((30..=50).contains(&n), "about 40 calls in each whole second: {w}");
        }
        assert_eq!(w["by_pod"]["a"].as_u64(), Some(n), "{w}");
        assert_eq!(w["not_ok"], 0, "{w}");
    }
    let counted: u64 = progress.iter().map(|w| w["requests"].as_u64().unwrap()).sum();
    assert!(counted <= 100, "each call counted once at most: {out}");
}

#[test]
fn sigusr1_makes_the_server_fail_every_call_and_sigusr2_heals_it() {
    let mut p = Procs::default();
    let a = p.http("a", &[]);
    let pid = p.0.last().expect("server").id() as libc::pid_t;
    let grpc = || probe(&["http", &url(a, "/grpc"), "--h2", "--grpc", "--count", "5"]);
    assert_eq!(grpc()["by_grpc_status"], serde_json::json!({"0": 5}));
    let signal = |sig| assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    signal(libc::SIGUSR1);
    // The signal is handled on the server's runtime: give it a moment.
    let failing = (0..50).find_map(|_| {
        let r = grpc();
        (r["by_grpc_status"]["14"] == 5).then_some(r).or_else(|| {
            std::thread::sleep(Duration::from_millis(20));
            None
        })
    });
    let r = failing.expect("every call UNAVAILABLE after SIGUSR1");
    assert_eq!(r["by_status"], serde_json::json!({"200": 5}), "trailers-only gRPC answers: {r}");
    assert_eq!(r["by_pod"]["a"], 5, "failures name the pod: {r}");
    let plain = probe(&["http", &url(a, "/"), "--count", "3"]);
    assert_eq!(plain["by_status"], serde_json::json!({"503": 3}), "{plain}");
    signal(libc::SIGUSR2);
    let healed = (0..50).any(|_| {
        let ok = grpc()["by_grpc_status"] == serde_json::json!({"0": 5});
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    });
    assert!(healed, "every call OK again after SIGUSR2");
}
