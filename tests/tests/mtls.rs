//! End to end: mutual TLS between nodes. What crosses the wire between nodes is encrypted; the
//! inbound port refuses certificates from another CA, expired ones and foreign identities, and
//! says why; AuthorizationPolicy allows and denies by principal and namespace; certificates
//! rotate under traffic and survive a CA outage; the CA signs only identities of the calling
//! node's pods. Needs root; run through `cargo xtask test`.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, cluster::CA_ADDRESS, report::status_count, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

// ---------- helpers ----------

fn json(out: &str) -> Value {
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `mesh-probe` in a pod; its JSON report.
fn probe(c: &SimCluster, pod: &str, args: &[&str]) -> Value {
    let out = c.probe(pod, args, T).unwrap_or_else(|e| panic!("{e}\nnode-a log:\n{}\nnode-b log:\n{}", node_log(c, 0), node_log(c, 1)));
    json(&out)
}

/// `mesh-probe` in a network namespace (a node's or the switch's); its JSON report.
fn probe_in_netns(c: &SimCluster, netns: &str, args: &[&str]) -> Value {
    let out = c.run_in_netns(netns, &bins::path("mesh-probe"), args, T).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mesh-probe {} in {netns}: {}\n{stdout}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    json(&stdout)
}

/// `mesh-probe` on the host (no network needed: certificates).
fn probe_here(args: &[&str]) -> Value {
    let out = std::process::Command::new(bins::path("mesh-probe")).args(args).output().unwrap();
    assert!(out.status.success(), "mesh-probe {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    json(&String::from_utf8_lossy(&out.stdout))
}


/// A log without its ANSI colours (tracing colours field names: `identity=` is split by escapes).
fn plain(log: String) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(ch);
    }
    out
}

fn node_log(c: &SimCluster, node: usize) -> String {
    plain(c.proxy_log(node))
}

fn ca_log(c: &SimCluster) -> String {
    plain(c.ca_log())
}

/// Lines of `log` that contain every one of `parts`.
fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| parts.iter().all(|p| l.contains(p))).collect()
}

/// An HTTP report without its per-request list.
fn summary(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("pods_in_order");
    }
    v
}


/// A marker no other traffic contains.
fn new_marker() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("MESHMARK{}Z{nanos:x}Q", std::process::id())
}

/// A scratch directory inside the cluster's temp dir (removed with the cluster).
fn scratch(c: &SimCluster) -> PathBuf {
    let dir = c.ca_dir.parent().unwrap().join("probe-certs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn start_http_server(c: &SimCluster, pod: &str, port: u16) {
    let port = port.to_string();
    c.serve_in_pod(pod, &bins::path("mesh-probe"), &["http-serve", "--name", pod, "--port", &port], port.parse().unwrap()).unwrap();
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn issued(log: &str, id: &str) -> usize {
    lines_with(log, &["workload certificate issued", id]).len()
}

// ---------- 1. no plaintext on the wire ----------

/// A sniffer on the switch port of node-a (veth `n0`) until its stdin closes.
struct Sniffer {
    child: Child,
}

impl Sniffer {
    fn start(c: &SimCluster, iface: &str, marker: &str) -> Sniffer {
        let mut child = c
            .spawn_in_netns_piped(&c.switch_netns(), &bins::path("mesh-probe"), &["sniff", "--iface", iface, "--seconds", "25", "--marker", marker, "--stop-on-eof"])
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut ready).unwrap();
        assert!(ready.contains("\"ready\":true"), "sniffer did not start: {ready:?}");
        Sniffer { child }
    }

    fn finish(mut self) -> Value {
        drop(self.child.stdin.take());
        let status = mesh_e2e::cluster::wait_timeout(&mut self.child, Duration::from_secs(10)).unwrap_or_else(|e| {
            let _ = self.child.kill();
            panic!("sniffer: {e}")
        });
        let mut out = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(status.success(), "sniffer failed: {out}");
        json(&out)
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const WIRE_TCP_VIP: &str = "10.96.0.80";
const WIRE_HTTP_VIP: &str = "10.96.0.81";
const WIRE_REQUESTS: u64 = 20;

/// Client on node-a, web server on node-b behind an L4 (`tcp`) and an L7 (`http`) Service;
/// HTTP requests carrying the marker in a header and in a POST body while the switch is sniffed.
/// Returns the sniffer's report after checking that the pod received the marker intact.
fn marker_run(mtls: bool) -> (Value, SimCluster, String) {
    let mut spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
        .service_named("web-tcp", "demo", [10, 96, 0, 80], "web", "tcp", 80, 8080)
        .service_named("web-http", "demo", [10, 96, 0, 81], "web", "http", 80, 8080);
    spec.mtls = mtls;
    let cluster = SimCluster::start(spec).unwrap();
    let c = &cluster;
    start_http_server(c, "web", 8080);
    let marker = new_marker();
    // Warm up: certificates and tunnels exist before the capture starts.
    for vip in [WIRE_TCP_VIP, WIRE_HTTP_VIP] {
        let v = probe(c, "client", &["http", &format!("http://{vip}/"), "--count", "2"]);
        assert_eq!(status_count(&v, "200"), 2, "{v}");
    }

    let sniffer = Sniffer::start(c, "n0", &marker);
    // A body of ~4 KiB of marker copies (some land whole in a segment whatever the split).
    let body: String = std::iter::repeat_n(format!("{marker}-"), 4096 / (marker.len() + 1)).collect();
    let header = format!("x-marker: {marker}");
    let count = WIRE_REQUESTS.to_string();
    for vip in [WIRE_TCP_VIP, WIRE_HTTP_VIP] {
        let v = probe(c, "client", &["http", &format!("http://{vip}/headers"), "--count", &count, "--header", &header, "--print-body"]);
        assert_eq!(status_count(&v, "200"), WIRE_REQUESTS, "{v}");
        let seen = json(v["last_body"].as_str().unwrap_or(""));
        assert_eq!(seen["x-marker"], marker.as_str(), "the pod got the marker header intact via {vip}: {seen}");
        assert_eq!(seen["x-pod"], "web");

        let v = probe(c, "client", &["http", &format!("http://{vip}/echo"), "--method", "POST", "--body-text", &body, "--count", &count, "--print-body"]);
        assert_eq!(status_count(&v, "200"), WIRE_REQUESTS, "{v}");
        assert_eq!(v["last_body"].as_str(), Some(body.as_str()), "the pod got the marker body intact via {vip} and echoed it");
        assert_eq!(v["body_bytes"].as_u64(), Some(WIRE_REQUESTS * body.len() as u64), "{v}");
    }
    let report = sniffer.finish();
    eprintln!("sniffer (mtls={mtls}): {report}");
    (report, cluster, body)
}

#[test]
fn no_plaintext_crosses_the_wire_between_nodes() {
    let (report, c, body) = marker_run(true);
    let c = &c;
    // Traffic did cross: request and echoed bodies of both Services, at least, on the tunnel port.
    let payload = 2 * 2 * WIRE_REQUESTS * body.len() as u64;
    let tunnel = report["tcp_payload_by_port"]["15008"].as_u64().unwrap_or(0);
    assert!(tunnel >= payload, "expected at least {payload} bytes of tunnel payload on the wire, saw {tunnel}: {report}");
    assert!(report["frames"].as_u64().unwrap_or(0) >= 40, "{report}");
    assert_eq!(report["drops"], 0, "the capture lost frames: {report}");
    assert_eq!(report["truncated"], 0, "{report}");
    // Nothing reached the pod except through the tunnel (15008) or went to the CA (15012).
    let ports: Vec<&String> = report["tcp_payload_by_port"].as_object().unwrap().iter().filter(|(_, n)| n.as_u64() > Some(0)).map(|(p, _)| p).collect();
    assert!(ports.iter().all(|p| *p == "15008" || *p == "15012"), "TCP payload on other ports crossed between nodes: {report}");
    // And the marker never appeared, in any frame.
    assert_eq!(report["marker_frames"], 0, "plaintext on the wire: {report}");
    assert!(c.counter(1, "proxy", "inbound_tls_refused") == 0, "{}", node_log(c, 1));
}

#[test]
fn without_mtls_the_sniffer_sees_the_marker() {
    // The control: the same traffic through plaintext tunnels shows the marker on the wire, so
    // the sniffer would have seen it above.
    let (report, c, _) = marker_run(false);
    let c = &c;
    assert!(node_log(c, 0).contains("PLAINTEXT"), "node-a runs without a CA:\n{}", node_log(c, 0));
    let hits = report["marker_frames"].as_u64().unwrap_or(0);
    assert!(hits >= WIRE_REQUESTS, "the marker should be visible in plaintext tunnels: {report}");
    let first = report["markers"][0]["first"].as_str().unwrap_or("");
    assert!(first.contains(":15008"), "seen in the tunnel to node-b's port 15008: {report}");
}

// ---------- 2. refusals at the inbound port ----------

/// `tls-connect` from node-a's namespace to node-b's inbound port.
fn tls_connect(c: &SimCluster, sni: &str, cert: Option<(&Path, &Path)>, extra: &[&str]) -> Value {
    let addr = format!("{}:15008", c.node(1).ip);
    let mut args = vec!["tls-connect", "--addr", &addr, "--sni", sni];
    if let Some((cert, key)) = cert {
        args.extend(["--cert-pem", s(cert), "--key-pem", s(key)]);
    }
    args.extend_from_slice(extra);
    probe_in_netns(c, &c.node(0).netns, &args)
}

/// Presents `cert` to node-b; expects the handshake refused, one more `inbound_tls_refused`, and
/// a `TLS refused` log line with `reason` in it. Returns that line.
fn expect_refused(c: &SimCluster, case: &str, cert: (&Path, &Path), reason: &str) -> String {
    let before_count = c.counter(1, "proxy", "inbound_tls_refused");
    let before_log = node_log(c, 1).len();
    let v = tls_connect(c, "server.demo.identity.mesh", Some(cert), &[]);
    assert_eq!(v["handshake"], "error", "{case}: node-b accepted the handshake: {v}");
    assert!(
        wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_tls_refused") > before_count),
        "{case}: inbound_tls_refused did not grow ({before_count}):\n{}",
        node_log(c, 1)
    );
    let mut line = String::new();
    let found = wait_until(Duration::from_secs(5), || {
        let log = node_log(c, 1);
        match lines_with(&log[before_log..], &["TLS refused"]).first() {
            Some(l) => {
                line = l.to_string();
                true
            }
            None => false,
        }
    });
    assert!(found, "{case}: no `TLS refused` line on node-b:\n{}", node_log(c, 1));
    assert!(line.to_lowercase().contains(&reason.to_lowercase()), "{case}: the refusal should name the reason ({reason:?}): {line}");
    eprintln!("{case}: client saw {v}\n  node-b: {line}");
    line
}

#[test]
fn inbound_refuses_foreign_ca_expired_and_foreign_identity_certificates() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod("server", "demo", 1, "server", 7000)
        .pod("helper", "demo", 1, "helper", 7001);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    c.start_servers().unwrap();
    let dir = scratch(c);
    let root = c.ca_root_cert();
    // The CA's state dir holds the root key next to the certificate (0600).
    let root_key = c.ca_dir.join("state/root-key.pem");
    assert!(root_key.exists(), "no root key in {}", c.ca_dir.join("state").display());
    let client_id = identity("demo", "client");
    let mk = |name: &str, spiffe: &str, extra: &[&str]| -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
        let mut args = vec!["mkcert", "--spiffe", spiffe, "--cert-out", s(&cert), "--key-out", s(&key)];
        args.extend_from_slice(extra);
        probe_here(&args);
        (cert, key)
    };
    let mesh_signed = ["--ca-cert", s(&root), "--ca-key", s(&root_key)];

    // The control: a valid mesh certificate, SNI naming the target pod's identity, gets a
    // tunnel to the pod (so the refusals below are about the certificates, not the tool).
    let (good, good_key) = mk("good", &client_id, &mesh_signed);
    let server = format!("{}:7000", c.pod("server").ip);
    let v = tls_connect(c, "server.demo.identity.mesh", Some((&good, &good_key)), &["--ca-pem", s(&root), "--connect", &server, "--send", "WHO"]);
    assert_eq!(v["handshake"], "ok", "{v}");
    assert_eq!(v["alpn"], "h2", "{v}");
    assert_eq!(v["version"], "TLSv1_3", "{v}");
    assert_eq!(v["server_spiffe"], identity("demo", "server").as_str(), "node-b presents the identity the SNI asked for: {v}");
    assert_eq!(v["connect_status"], 200, "{v}");
    assert!(v["answer"].as_str().unwrap_or("").starts_with("server "), "{v}");
    assert_eq!(c.counter(1, "proxy", "inbound_tls_refused"), 0);

    // No client certificate at all.
    let before = c.counter(1, "proxy", "inbound_tls_refused");
    let v = tls_connect(c, "server.demo.identity.mesh", None, &[]);
    assert_eq!(v["handshake"], "error", "no client certificate: {v}");
    assert!(wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_tls_refused") > before));

    // (a) Another CA: a self-signed root of its own, a perfectly shaped SPIFFE ID.
    let evil_root = dir.join("evil-root.pem");
    let a = mk("foreign-ca", &client_id, &["--new-ca-out", s(&evil_root)]);
    expect_refused(c, "(a) certificate from another CA", (&a.0, &a.1), "not issued by a CA this mesh trusts");

    // (b) Signed by the mesh root, expired an hour ago.
    let b = mk("expired", &client_id, &[mesh_signed.as_slice(), &["--expired"]].concat());
    expect_refused(c, "(b) expired certificate", (&b.0, &b.1), "expired");

    // (c) Signed by the mesh root, but for another trust domain.
    let c_cert = mk("foreign-domain", "spiffe://evil.local/ns/demo/sa/client", &mesh_signed);
    let line = expect_refused(c, "(c) identity in another trust domain", (&c_cert.0, &c_cert.1), "trust domain");
    assert!(line.contains("evil.local"), "names the offending identity: {line}");

    // (d) A valid certificate, but the SNI asks for an identity that is not the target pod's:
    // node-b presents helper's certificate, and then refuses a tunnel to server.
    let refused_before = c.counter(1, "proxy", "inbound_refused");
    let log_before = node_log(c, 1).len();
    let v = tls_connect(c, "helper.demo.identity.mesh", Some((&good, &good_key)), &["--ca-pem", s(&root), "--connect", &server, "--send", "WHO"]);
    assert_eq!(v["handshake"], "ok", "{v}");
    assert_eq!(v["server_spiffe"], identity("demo", "helper").as_str(), "{v}");
    assert_eq!(v["connect_status"], 403, "a CONNECT to a pod of another identity than the SNI's: {v}");
    assert!(v.get("answer").is_none(), "{v}");
    assert!(wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_refused") > refused_before));
    assert!(
        wait_until(Duration::from_secs(5), || node_log(c, 1)[log_before..].contains("asked for identity")),
        "node-b logs the identity mismatch:\n{}",
        node_log(c, 1)
    );

    // An SNI naming an identity node-b has no workload for: no certificate to present.
    let v = tls_connect(c, "nobody.demo.identity.mesh", Some((&good, &good_key)), &[]);
    assert_eq!(v["handshake"], "error", "{v}");

    // The mesh's own traffic is unaffected by all this.
    let v = probe(c, "client", &["connect", &server]);
    assert_eq!(v["result"], "ok", "{v}");
}

// ---------- 3. AuthorizationPolicy ----------

fn who(c: &SimCluster, from: &str, addr: &str) -> Value {
    probe(c, from, &["connect", addr, "--timeout-ms", "2000"])
}

fn authz(name: &str, action: &str, source: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: {action}\n  rules:\n  - from:\n    - source:\n{source}\n"
    )
}

#[test]
fn authorization_policy_allows_and_denies_by_principal_and_namespace() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("other", true)
        .pod("server", "demo", 1, "server", 7000)
        // Service account = app label: `client` in demo, `intruder` in other; one of each per node.
        .pod("client", "demo", 0, "client", 9000)
        .pod("intruder", "other", 0, "intruder", 9000)
        .pod("client-b", "demo", 1, "client", 9000)
        .pod("intruder-b", "other", 1, "intruder", 9000)
        .service("server", "demo", [10, 96, 0, 90], "server", 80, 7000);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    c.start_servers().unwrap();
    let vip = "10.96.0.90:80";
    let clients = ["client", "intruder", "client-b", "intruder-b"];
    let check = |expect: &[(&str, bool)], when: &str| {
        for (from, allowed) in expect {
            let v = who(c, from, vip);
            eprintln!("{when}: {from} -> {v}");
            if *allowed {
                assert_eq!(v["result"], "ok", "{when}: {from} should get through: {v}\nnode-b:\n{}", node_log(c, 1));
                assert!(v["answer"].as_str().unwrap_or("").starts_with("server "), "{v}");
            } else {
                assert_ne!(v["result"], "ok", "{when}: {from} should be refused: {v}");
                assert!(!v["answer"].as_str().unwrap_or("").starts_with("server "), "{when}: {from} reached the server: {v}");
            }
        }
    };
    // No policy: everyone gets in.
    check(&clients.map(|p| (p, true)), "no policy");

    // ALLOW by principal.
    let denied_before = c.counter(1, "proxy", "inbound_denied");
    let log_before = node_log(c, 1).len();
    c.apply_config("authz.yaml", &authz("allow-client", "ALLOW", "        principals: [\"cluster.local/ns/demo/sa/client\"]")).unwrap();
    check(&[("client", true), ("intruder", false), ("client-b", true), ("intruder-b", false)], "ALLOW principal demo/client");
    assert!(
        wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_denied") > denied_before),
        "the cross-node refusal counts inbound_denied on node-b"
    );
    let log = node_log(c, 1)[log_before..].to_string();
    let intruder_id = identity("other", "intruder");
    // Cross node (node-b's inbound) and same node (node-b's outbound side, before connecting).
    let lines = lines_with(&log, &["authorization:", "no ALLOW policy matched (demo/allow-client)", &intruder_id]);
    assert!(lines.len() >= 2, "node-b logs both refusals of other/intruder with the policy:\n{log}");
    assert!(lines.iter().any(|l| l.contains(&c.node(0).ip.to_string())), "cross-node refusal (peer node-a):\n{log}");
    assert!(lines.iter().any(|l| l.contains(&c.pod("intruder-b").ip.to_string())), "same-node refusal (source intruder-b):\n{log}");
    assert!(lines_with(&log, &["authorization:", &identity("demo", "client")]).is_empty(), "demo/client was allowed:\n{log}");

    // DENY by namespace (replacing the ALLOW policy): demo is out, other is back in.
    let denied_before = c.counter(1, "proxy", "inbound_denied");
    let log_before = node_log(c, 1).len();
    c.apply_config("authz.yaml", &authz("deny-demo", "DENY", "        namespaces: [\"demo\"]")).unwrap();
    check(&[("client", false), ("intruder", true), ("client-b", false), ("intruder-b", true)], "DENY namespace demo");
    assert!(wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_denied") > denied_before));
    let log = node_log(c, 1)[log_before..].to_string();
    let lines = lines_with(&log, &["authorization:", "denied by AuthorizationPolicy demo/deny-demo", &identity("demo", "client")]);
    assert!(lines.len() >= 2, "node-b logs the DENY for both demo clients:\n{log}");

    // Deny wins over allow: both policies, and the allowed principal is denied by namespace.
    let both = format!(
        "{}---\n{}",
        authz("allow-client", "ALLOW", "        principals: [\"cluster.local/ns/demo/sa/client\"]"),
        authz("deny-demo", "DENY", "        namespaces: [\"demo\"]")
    );
    c.apply_config("authz.yaml", &both).unwrap();
    check(&clients.map(|p| (p, false)), "ALLOW demo/client + DENY demo");

    // Policies gone: default allow again.
    c.apply_config("authz.yaml", "").unwrap();
    check(&clients.map(|p| (p, true)), "no policy again");
}

// ---------- 4. rotation under traffic ----------

#[test]
fn certificates_rotate_under_continuous_traffic_without_a_failed_request() {
    let mut spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 95], "web", "http", 80, 8080);
    spec.cert_ttl_secs = Some(6);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    start_http_server(c, "web", 8080);
    let (client_id, web_id) = (identity("demo", "client"), identity("demo", "web"));
    let (a0, b0) = (issued(&node_log(c, 0), &client_id), issued(&node_log(c, 1), &web_id));
    assert!(a0 >= 1 && b0 >= 1, "both workloads have certificates at start:\n{}\n{}", node_log(c, 0), node_log(c, 1));
    let signed0 = ca_log(c).matches("signed a workload certificate").count();

    // A mesh client certificate for probing which certificate node-b serves.
    let dir = scratch(c);
    let (cert, key) = (dir.join("probe.pem"), dir.join("probe-key.pem"));
    let root = c.ca_root_cert();
    let root_key = c.ca_dir.join("state/root-key.pem");
    probe_here(&["mkcert", "--spiffe", &client_id, "--cert-out", s(&cert), "--key-out", s(&key), "--ca-cert", s(&root), "--ca-key", s(&root_key)]);

    let (load, serials) = std::thread::scope(|scope| {
        // 15 s of requests at 50 per second over 4 persistent connections (L7: each request is
        // routed on its own), plus fresh L4 connections every 100 ms.
        let http = scope.spawn(|| probe(c, "client", &["http", "http://10.96.0.95/", "--rate", "50", "--count", "750", "--conns", "4", "--timeout-ms", "3000"]));
        // Every ~2 s, a fresh handshake with node-b, verifying its certificate against the mesh
        // root (an expired certificate would fail here).
        let mut serials = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(14) && serials.len() < 10 {
            let addr = format!("{}:15008", c.node(1).ip);
            let v = probe_in_netns(c, &c.node(0).netns, &["tls-connect", "--addr", &addr, "--sni", "web.demo.identity.mesh", "--cert-pem", s(&cert), "--key-pem", s(&key), "--ca-pem", s(&root)]);
            assert_eq!(v["handshake"], "ok", "a handshake with node-b during rotation: {v}\n{}", node_log(c, 1));
            assert_eq!(v["server_spiffe"], web_id.as_str());
            serials.push(v["server_serial"].as_str().unwrap_or("").to_string());
            std::thread::sleep(Duration::from_secs(2));
        }
        (http.join().unwrap(), serials)
    });
    eprintln!("load: {}\nserials: {serials:?}", summary(&load));
    assert_eq!(status_count(&load, "200"), 750, "every request succeeded across rotations: {load}\nnode-a:\n{}\nnode-b:\n{}", node_log(c, 0), node_log(c, 1));
    assert_eq!(load["not_ok"], 0, "{load}");
    assert_eq!(load["errors"], serde_json::json!({}), "{load}");

    // The certificates did rotate: several issuances per identity, on both nodes and at the CA,
    // and node-b served different certificates over time.
    let (a1, b1) = (issued(&node_log(c, 0), &client_id), issued(&node_log(c, 1), &web_id));
    assert!(a1 >= a0 + 3, "node-a renewed demo/client at half-life (6 s TTL, 15 s of traffic): {a0} -> {a1}\n{}", node_log(c, 0));
    assert!(b1 >= b0 + 3, "node-b renewed demo/web: {b0} -> {b1}\n{}", node_log(c, 1));
    let signed = ca_log(c).matches("signed a workload certificate").count();
    assert!(signed >= signed0 + 6, "the CA signed the renewals: {signed0} -> {signed}");
    let mut distinct = serials.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 3, "node-b presented new certificates as they rotated: {serials:?}");
    assert!(!node_log(c, 0).contains("renewal failed") && !node_log(c, 1).contains("renewal failed"));
}

// ---------- 5. CA outage ----------

#[test]
fn traffic_survives_a_ca_outage_and_renewal_resumes_when_it_returns() {
    const TTL: u64 = 12;
    let mut spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 96], "web", "http", 80, 8080);
    spec.cert_ttl_secs = Some(TTL);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    start_http_server(c, "web", 8080);
    let (client_id, web_id) = (identity("demo", "client"), identity("demo", "web"));
    let v = probe(c, "client", &["http", "http://10.96.0.96/", "--count", "5"]);
    assert_eq!(status_count(&v, "200"), 5, "{v}");

    c.stop_ca().unwrap();
    let stopped = Instant::now();
    let failures = |node: usize, id: &str| lines_with(&node_log(c, node), &["certificate renewal failed, still serving the current certificate", id]).len();
    let (issued_a, issued_b) = (issued(&node_log(c, 0), &client_id), issued(&node_log(c, 1), &web_id));

    let (during, outage) = std::thread::scope(|scope| {
        // Requests all along: through the outage and the CA's return (14 s at 20 per second).
        let http = scope.spawn(|| probe(c, "client", &["http", "http://10.96.0.96/", "--rate", "20", "--count", "280", "--conns", "2", "--timeout-ms", "3000"]));
        // Renewal at half-life fails; it is retried with backoff, visibly. Three failed attempts
        // on both nodes, then the CA comes back.
        let seen = wait_until(Duration::from_secs(TTL), || failures(0, &client_id) >= 3 && failures(1, &web_id) >= 3);
        let outage = stopped.elapsed();
        assert!(seen, "renewal failures logged with retries:\nnode-a:\n{}\nnode-b:\n{}", node_log(c, 0), node_log(c, 1));
        let listening = ca_log(c).matches("mesh CA listening").count();
        c.restart_ca().unwrap();
        // (`restart_ca` finds the first start's "listening" in the log: wait for a new one.)
        assert!(wait_until(Duration::from_secs(10), || ca_log(c).matches("mesh CA listening").count() > listening), "CA restarted:\n{}", ca_log(c));
        (http.join().unwrap(), outage)
    });
    eprintln!("outage {outage:?}; traffic: {}", summary(&during));
    assert!(outage >= Duration::from_secs(TTL / 2), "the CA was down longer than a renewal interval: {outage:?}");
    assert_eq!(status_count(&during, "200"), 280, "no request failed during the outage: {during}\nnode-a:\n{}\nnode-b:\n{}", node_log(c, 0), node_log(c, 1));
    assert_eq!(during["not_ok"], 0, "{during}");

    // The retries back off: attempts 1..3 logged with growing delays.
    let log = node_log(c, 0);
    let retries = lines_with(&log, &["certificate renewal failed", &client_id]);
    for attempt in ["attempt=1", "attempt=2", "attempt=3"] {
        assert!(retries.iter().any(|l| l.contains(attempt)), "{attempt} logged:\n{}", retries.join("\n"));
    }
    assert!(retries.iter().all(|l| l.contains("retry_in=")), "{}", retries.join("\n"));

    // Renewal resumed once the CA was back: new issuances on both nodes, before expiry.
    assert!(
        wait_until(Duration::from_secs(10), || issued(&node_log(c, 0), &client_id) > issued_a && issued(&node_log(c, 1), &web_id) > issued_b),
        "renewal resumed after the CA returned:\nnode-a:\n{}\nnode-b:\n{}\nCA:\n{}",
        node_log(c, 0),
        node_log(c, 1),
        ca_log(c)
    );
    assert!(!node_log(c, 0).contains("current certificate has expired"), "{}", node_log(c, 0));
    let v = probe(c, "client", &["http", "http://10.96.0.96/", "--count", "20", "--conns", "2"]);
    assert_eq!(status_count(&v, "200"), 20, "traffic fine after renewal: {v}");
}

// ---------- 6. the CA signs only the calling node's identities ----------

fn ca_request(c: &SimCluster, as_node: usize, node_name: &str, id: &str) -> Value {
    let token = c.node_token_file(as_node);
    let root = c.ca_root_cert();
    probe_in_netns(
        c,
        &c.node(as_node).netns,
        &["ca-request", "--ca", CA_ADDRESS, "--root", s(&root), "--token-file", s(&token), "--node", node_name, "--identity", id],
    )
}

#[test]
fn the_ca_refuses_to_sign_an_identity_of_a_pod_on_another_node() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod("server", "demo", 1, "server", 7000);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;

    // node-a asks for node-b's workload: refused, and the CA says why.
    let server_id = identity("demo", "server");
    let v = ca_request(c, 0, "node-a", &server_id);
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.contains(&server_id) && msg.contains("node-a"), "{v}");
    assert!(
        wait_until(Duration::from_secs(5), || !lines_with(&ca_log(c), &["certificate request refused", &server_id, "not allowed for node node-a"]).is_empty()),
        "the CA logs the refusal:\n{}",
        ca_log(c)
    );

    // Its own pod's identity: signed, for that identity.
    let client_id = identity("demo", "client");
    let v = ca_request(c, 0, "node-a", &client_id);
    assert_eq!(v["code"], "Ok", "{v}");
    assert_eq!(v["leaf_spiffe"], client_id.as_str(), "{v}");
    assert!(v["chain_len"].as_u64().unwrap_or(0) >= 2, "leaf and root: {v}");

    // A service account no pod has, a foreign trust domain, and node-a's token claiming to be
    // node-b: all refused.
    let v = ca_request(c, 0, "node-a", &identity("demo", "nobody"));
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    // A name Kubernetes would refuse is refused as such.
    let v = ca_request(c, 0, "node-a", &identity("demo", "X"));
    assert_eq!(v["code"], "InvalidArgument", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("service account \"X\""), "names the bad part: {v}");
    let v = ca_request(c, 0, "node-a", "spiffe://evil.local/ns/demo/sa/client");
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("trust domain"), "{v}");
    let token_a = c.node_token_file(0);
    let v = probe_in_netns(
        c,
        &c.node(0).netns,
        &["ca-request", "--ca", CA_ADDRESS, "--root", s(&c.ca_root_cert()), "--token-file", s(&token_a), "--node", "node-b", "--identity", &server_id],
    );
    assert_eq!(v["code"], "Unauthenticated", "node-a's token does not make it node-b: {v}");

    // node-b itself may have its pod's identity.
    let v = ca_request(c, 1, "node-b", &server_id);
    assert_eq!(v["code"], "Ok", "{v}");
    assert_eq!(v["leaf_spiffe"], server_id.as_str(), "{v}");
}

/// A pod looping garbage connections at another node's tunnel port: past the allowance of
/// failed handshakes its connections are refused at accept (no TLS session each), while the
/// node proxies' own tunnels keep carrying requests, during the flood and after it.
#[test]
fn a_pod_failing_handshakes_on_the_tunnel_port_is_turned_away_and_tunnels_keep_working() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod("attacker", "demo", 0, "attacker", 9100)
        .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 81], "web", "http", 80, 8080);
    let cluster = SimCluster::start(spec).unwrap();
    let c = &cluster;
    start_http_server(c, "web", 8080);
    let url = "http://10.96.0.81/";
    let v = probe(c, "client", &["http", url, "--count", "2"]);
    assert_eq!(status_count(&v, "200"), 2, "the control: {v}");
    assert_eq!(c.counter(1, "proxy", "inbound_handshake_penalty"), 0);

    let tunnel = format!("{}:15008", c.node(1).ip);
    let flood = c
        .spawn_piped("attacker", &bins::path("mesh-probe"), &["abuse", "tls-garbage", &tunnel, "--count", "8", "--seconds", "4"])
        .expect("attacker");
    // Requests through the tunnel while the flood runs.
    let during = probe(c, "client", &["http", url, "--count", "200", "--rate", "100"]);
    let out = flood.wait_with_output().expect("attacker ends");
    let attack: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("attacker: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(status_count(&during, "200"), 200, "requests through the tunnels during the flood: {during}");

    let penalised = c.counter(1, "proxy", "inbound_handshake_penalty");
    let refused = c.counter(1, "proxy", "inbound_tls_refused");
    let connected = attack["connected"].as_u64().unwrap_or(0);
    eprintln!("attacker {attack}; node-b: {refused} handshakes failed, {penalised} connections refused at accept");
    assert!(penalised > 0, "no connection refused at accept after {refused} failed handshakes: {attack}");
    assert!(refused < connected, "every one of the attacker's {connected} connections got a TLS session ({refused} failed)");
    assert!(
        node_log(c, 1).contains("connections from this source refused for"),
        "the penalty is logged:\n{}",
        node_log(c, 1)
    );
    // After the flood: tunnels carry requests as before.
    let after = probe(c, "client", &["http", url, "--count", "20"]);
    assert_eq!(status_count(&after, "200"), 20, "{after}");
}
