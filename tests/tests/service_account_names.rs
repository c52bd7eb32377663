//! End to end: ServiceAccount names with dots and of the longest valid length (253 characters,
//! in a 63-character namespace) across nodes over mutual TLS. Bytes flow both ways; the far
//! node reports the caller's whole principal; the tunnel's SNI takes the dotted and hashed
//! forms on the wire and node-b answers them with the right certificate; AuthorizationPolicy
//! allows exactly those principals (not near-misses). Needs root; run through `cargo xtask test`.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, wait_until};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const T: Duration = Duration::from_secs(30);
const SERVER_VIP: &str = "10.96.0.90:80";
const LONG_VIP: &str = "10.96.0.91:80";
const READER_SA: &str = "recall.reader";
const SERVER_SA: &str = "api.server.v1";

/// A 63-character namespace.
fn long_ns() -> String {
    format!("long-{}", "n".repeat(58))
}

/// 253-character ServiceAccount names sharing their first 200 characters: only the whole name
/// tells them apart.
fn long_sa(tail: char) -> String {
    format!("{}.{}", "p".repeat(200), tail.to_string().repeat(52))
}

fn principal(ns: &str, sa: &str) -> String {
    format!("cluster.local/ns/{ns}/sa/{sa}")
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{}", principal(ns, sa))
}

/// The SNIs the proxies must put on the wire, written out independently of mesh-node: a
/// change here breaks proxies of different releases talking to each other.
fn dotted_sni(ns: &str, sa: &str) -> String {
    format!("{sa}.{ns}.dotted.identity.mesh")
}

fn hashed_sni(ns: &str, sa: &str) -> String {
    let digest = Sha256::digest(format!("{ns}/{sa}").as_bytes());
    let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = sa.chars().take(30).map(|c| if c == '.' { '-' } else { c }).collect();
    format!("{}-{hash}.{ns}.hashed.identity.mesh", prefix.trim_end_matches('-'))
}

/// node-a: `reader` (demo, `recall.reader`), `recall` (demo, `recall`: a near miss) and `long`
/// (the long namespace, a 253-character name); node-b: `server` (demo, `api.server.v1`) and
/// `longserver` (the long namespace, another 253-character name), each behind a Service.
fn spec() -> ClusterSpec {
    let ns = long_ns();
    ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace(&ns, true)
        .pod("reader", "demo", 0, "reader", 9000)
        .service_account("reader", READER_SA)
        .pod("recall", "demo", 0, "recall", 9000)
        .pod("long", &ns, 0, "long", 9000)
        .service_account("long", &long_sa('c'))
        .pod("server", "demo", 1, "server", 7000)
        .service_account("server", SERVER_SA)
        .pod("longserver", &ns, 1, "longserver", 7001)
        .service_account("longserver", &long_sa('s'))
        .service("server", "demo", [10, 96, 0, 90], "server", 80, 7000)
        .service("longserver", &ns, [10, 96, 0, 91], "longserver", 80, 7001)
}

fn json(out: &str) -> Value {
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn node_log(c: &SimCluster, node: usize) -> String {
    c.proxy_log_plain(node)
}

fn probe(c: &SimCluster, pod: &str, args: &[&str]) -> Value {
    let out = c.probe(pod, args, T).unwrap_or_else(|e| panic!("{e}\nnode-a log:\n{}\nnode-b log:\n{}", node_log(c, 0), node_log(c, 1)));
    json(&out)
}

fn probe_in_netns(c: &SimCluster, netns: &str, args: &[&str]) -> Value {
    let out = c.run_in_netns(netns, &bins::path("mesh-probe"), args, T).expect("mesh-probe runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mesh-probe {} in {netns}: {}\n{stdout}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    json(&stdout)
}



/// Series of `metric` whose labels include every `label="value"` of `labels`.
fn series<'a>(text: &'a str, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a str> {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines().filter(|l| l.starts_with(&format!("{metric}{{")) && wanted.iter().all(|w| l.contains(w.as_str()))).collect()
}

fn echo_ok(c: &SimCluster, from: &str, addr: &str) {
    let v = probe(c, from, &["echo", addr, "--bytes", "200000"]);
    assert_eq!(v["ok"], true, "{from} -> {addr}: bytes through and back intact: {v}");
    assert_eq!(v["received"], 200000, "{v}");
}

fn who(c: &SimCluster, from: &str, addr: &str) -> Value {
    probe(c, from, &["connect", addr, "--timeout-ms", "2000"])
}

#[test]
fn dotted_and_longest_service_account_names_work_across_nodes_over_mtls() {
    let ns = long_ns();
    let (long_client, long_server) = (long_sa('c'), long_sa('s'));
    assert_eq!((ns.len(), long_client.len(), long_server.len()), (63, 253, 253));
    let c = SimCluster::start(spec()).expect("simulated cluster");
    let c = &c;
    c.start_servers().expect("servers");

    // Bytes both ways, every client to both Services across the node boundary: the dotted
    // destination name (dotted SNI) and the 253-character one (hashed SNI).
    for from in ["reader", "long", "recall"] {
        for addr in [SERVER_VIP, LONG_VIP] {
            echo_ok(c, from, addr);
        }
    }
    let v = who(c, "long", LONG_VIP);
    assert!(v["answer"].as_str().unwrap_or("").starts_with("longserver "), "{v}");

    // node-b saw the callers' whole identities (tunnel streams it ended, reported as the
    // destination), and node-a the servers' from their certificates.
    let mesh = "connection_security_policy";
    for (node, reporter) in [(1, "destination"), (0, "source")] {
        let text = c.metrics(node).expect("metrics");
        for (src, dst) in [
            (spiffe("demo", READER_SA), spiffe("demo", SERVER_SA)),
            (spiffe(&ns, &long_client), spiffe(&ns, &long_server)),
            (spiffe(&ns, &long_client), spiffe("demo", SERVER_SA)),
        ] {
            let found = series(&text, "istio_tcp_connections_opened_total", &[("reporter", reporter), ("source_principal", &src), ("destination_principal", &dst), (mesh, "mutual_tls")]);
            assert!(!found.is_empty(), "node {node} reports {src} -> {dst} ({reporter}):\n{}", series(&text, "istio_tcp_connections_opened_total", &[]).join("\n"));
        }
    }
    // Each node holds the certificates of its own pods, under their whole names.
    for (node, ids) in [(0, vec![spiffe("demo", READER_SA), spiffe(&ns, &long_client)]), (1, vec![spiffe("demo", SERVER_SA), spiffe(&ns, &long_server)])] {
        let out = c.meshctl(node, &["-o", "json", "certs"]).expect("meshctl certs");
        let certs: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        for id in ids {
            let cert = certs["certificates"].as_array().into_iter().flatten().find(|c| c["identity"] == id.as_str());
            assert_eq!(cert.map(|c| c["state"].clone()), Some(Value::from("valid")), "node {node} holds {id}: {certs}");
        }
    }

    sni_forms_on_the_wire(c, &ns, &long_server);
    authorization_by_whole_principal(c, &ns, &long_client);
}

/// A mesh-signed client certificate for `id` in a scratch dir.
fn mesh_cert(c: &SimCluster, name: &str, id: &str) -> (PathBuf, PathBuf) {
    let dir = c.ca_dir.parent().expect("cluster dir").join("probe-certs");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    let (root, root_key) = (c.ca_root_cert(), c.ca_dir.join("state/root-key.pem"));
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let args = ["mkcert", "--spiffe", id, "--cert-out", &s(&cert), "--key-out", &s(&key), "--ca-cert", &s(&root), "--ca-key", &s(&root_key)];
    let out = std::process::Command::new(bins::path("mesh-probe")).args(args).output().expect("mkcert");
    assert!(out.status.success(), "mkcert: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// The SNI forms as bytes on the wire: a client speaking them by hand (not through
/// mesh-node's encoder) gets node-b's certificate of exactly that identity and a tunnel to the
/// pod; an unknown hashed name is refused, and node-b says why.
fn sni_forms_on_the_wire(c: &SimCluster, ns: &str, long_server: &str) {
    let (cert, key) = mesh_cert(c, "reader", &spiffe("demo", READER_SA));
    let (cert, key, root) = (cert.to_str().unwrap().to_string(), key.to_str().unwrap().to_string(), c.ca_root_cert().to_str().unwrap().to_string());
    let inbound = format!("{}:15008", c.node(1).ip);
    let tls_connect = |sni: &str, target: &str| {
        let args = ["tls-connect", "--addr", &inbound, "--sni", sni, "--cert-pem", &cert, "--key-pem", &key, "--ca-pem", &root, "--connect", target, "--send", "WHO"];
        probe_in_netns(c, &c.node(0).netns, &args)
    };
    let server = format!("{}:7000", c.pod("server").ip);
    let longserver = format!("{}:7001", c.pod("longserver").ip);
    for (sni, target, id, name) in [
        (dotted_sni("demo", SERVER_SA), &server, spiffe("demo", SERVER_SA), "server "),
        (hashed_sni(ns, long_server), &longserver, spiffe(ns, long_server), "longserver "),
    ] {
        assert!(sni.len() <= 253 && sni.split('.').all(|l| l.len() <= 63), "{sni}");
        let v = tls_connect(&sni, target);
        assert_eq!(v["handshake"], "ok", "{sni}: {v}\nnode-b:\n{}", node_log(c, 1));
        assert_eq!(v["server_spiffe"], id.as_str(), "{sni}: node-b presents the identity asked for: {v}");
        assert_eq!(v["connect_status"], 200, "{v}");
        assert!(v["answer"].as_str().unwrap_or("").starts_with(name), "{v}");
    }

    let before = node_log(c, 1).len();
    let stranger = hashed_sni(ns, &long_sa('z'));
    let v = tls_connect(&stranger, &longserver);
    assert_eq!(v["handshake"], "error", "no certificate for an identity node-b does not hold: {v}");
    assert!(
        wait_until(Duration::from_secs(5), || node_log(c, 1)[before..].contains("hashed name of no identity")),
        "node-b logs why:\n{}",
        &node_log(c, 1)[before..]
    );
}

fn allow_policy(name: &str, ns: &str, app: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: {app}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n---\n"
    )
}

/// ALLOW with one principal each: `server` lets in only `recall.reader` (not `recall`, not the
/// long one), `longserver` only its 253-character caller.
fn authorization_by_whole_principal(c: &SimCluster, ns: &str, long_client: &str) {
    let policies = allow_policy("allow-reader", "demo", "server", &principal("demo", READER_SA))
        + &allow_policy("allow-long", ns, "longserver", &principal(ns, long_client));
    let denied_before = c.counter(1, "proxy", "inbound_denied");
    let before = node_log(c, 1).len();
    c.apply_config("authz.yaml", &policies).expect("policies applied");
    for (from, addr, allowed) in [
        ("reader", SERVER_VIP, true),
        ("recall", SERVER_VIP, false),
        ("long", SERVER_VIP, false),
        ("long", LONG_VIP, true),
        ("reader", LONG_VIP, false),
        ("recall", LONG_VIP, false),
    ] {
        let v = who(c, from, addr);
        let reached = v["result"] == "ok" && v["answer"].as_str().is_some_and(|a| a.starts_with("server ") || a.starts_with("longserver "));
        assert_eq!(reached, allowed, "{from} -> {addr}: {v}\nnode-b:\n{}", &node_log(c, 1)[before..]);
        if allowed {
            echo_ok(c, from, addr);
        }
    }
    assert!(wait_until(Duration::from_secs(5), || c.counter(1, "proxy", "inbound_denied") >= denied_before + 4), "node-b counts the 4 refusals");
    let log = node_log(c, 1)[before..].to_string();
    for (refused, policy) in [(spiffe("demo", "recall"), "demo/allow-reader"), (spiffe(ns, long_client), "demo/allow-reader"), (spiffe("demo", READER_SA), &format!("{ns}/allow-long"))] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("authorization:") && l.contains(&refused) && l.contains(policy)).collect();
        assert!(!lines.is_empty(), "node-b logs the refusal of {refused} by {policy}:\n{log}");
    }
}
