//! End to end: the hardened CA. The root rotates with overlap while traffic flows between
//! nodes (nodes reload the trust bundle without a restart; no request fails), and the CA
//! refuses its own identity, weak or mismatched keys and a node over its request budget, each
//! with an error naming why. Needs root; run through `cargo xtask test`.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, cluster::CA_ADDRESS, report::status_count, wait_until};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn json(out: &str) -> Value {
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn probe_in_netns(c: &SimCluster, netns: &str, args: &[&str]) -> Value {
    let out = c.run_in_netns(netns, &bins::path("mesh-probe"), args, T).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mesh-probe {} in {netns}: {}\n{stdout}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    json(&stdout)
}

fn probe_here(args: &[&str]) -> Value {
    let out = Command::new(bins::path("mesh-probe")).args(args).output().unwrap();
    assert!(out.status.success(), "mesh-probe {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    json(&String::from_utf8_lossy(&out.stdout))
}

fn node_log(c: &SimCluster, node: usize) -> String {
    c.proxy_log_plain(node)
}

fn ca_log(c: &SimCluster) -> String {
    mesh_e2e::cluster::strip_ansi(&c.ca_log())
}

fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| parts.iter().all(|p| l.contains(p))).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn scratch(c: &SimCluster, name: &str) -> PathBuf {
    let dir = c.ca_dir.parent().unwrap().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new root with openssl, as an operator makes one for a rotation (deploy/README.md):
/// ECDSA P-256, PKCS#8 key, CA:true. Returns (certificate, key) paths, owned by the CA's user.
fn new_root(c: &SimCluster, dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("root-b.pem"), dir.join("root-b-key.pem"));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    };
    run(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", s(&key)]);
    run(&[
        "req", "-x509", "-new", "-key", s(&key), "-sha256", "-days", "3650", "-subj", "/O=cluster.local/CN=mesh root CA B",
        "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", s(&cert),
    ]);
    for p in [&cert, &key] {
        c.give_to_ca(p).unwrap();
    }
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (cert, key)
}

/// Times node `i` logged a trust bundle reload with `roots` roots.
fn reloads(c: &SimCluster, i: usize, roots: usize) -> usize {
    lines_with(&node_log(c, i), &["trust bundle reloaded", &format!("roots={roots}")]).len()
}

fn issued(log: &str, id: &str) -> usize {
    lines_with(log, &["workload certificate issued", id]).len()
}

/// `tls-connect` from node-a's namespace to node-b's tunnel port, presenting `cert`, trusting
/// `ca` for node-b's certificate.
fn handshake(c: &SimCluster, cert: (&Path, &Path), ca: &Path) -> Value {
    let addr = format!("{}:15008", c.node(1).ip);
    probe_in_netns(
        c,
        &c.node(0).netns,
        &["tls-connect", "--addr", &addr, "--sni", "web.demo.identity.mesh", "--cert-pem", s(cert.0), "--key-pem", s(cert.1), "--ca-pem", s(ca)],
    )
}

#[test]
fn root_rotates_with_overlap_under_continuous_traffic_without_a_failed_request() {
    const TTL: u64 = 6;
    let mut spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod_labelled("web", "demo", 1, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 97], "web", "http", 80, 8080);
    spec.cert_ttl_secs = Some(TTL);
    spec.ca_root_poll_ms = Some(200);
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    c.serve_in_pod("web", &bins::path("mesh-probe"), &["http-serve", "--name", "web", "--port", "8080"], 8080).unwrap();
    let (client_id, web_id) = (identity("demo", "client"), identity("demo", "web"));

    let dir = scratch(c, "rotation");
    let root_a = dir.join("root-a.pem");
    std::fs::copy(c.ca_root_cert(), &root_a).unwrap();
    c.give_to_ca(&root_a).unwrap();
    let (root_b, key_b) = new_root(c, &dir);
    let bundle_ab = dir.join("bundle-ab.pem");
    std::fs::write(&bundle_ab, std::fs::read_to_string(&root_a).unwrap() + &std::fs::read_to_string(&root_b).unwrap()).unwrap();
    // Probe client certificates from each root (what a peer node's workload would present).
    let (cert_a, key_a) = (dir.join("probe-a.pem"), dir.join("probe-a-key.pem"));
    let state_key = c.ca_dir.join("state/root-key.pem");
    probe_here(&["mkcert", "--spiffe", &client_id, "--cert-out", s(&cert_a), "--key-out", s(&key_a), "--ca-cert", s(&root_a), "--ca-key", s(&state_key)]);
    let (cert_b, key_b_probe) = (dir.join("probe-b.pem"), dir.join("probe-b-key.pem"));
    probe_here(&["mkcert", "--spiffe", &client_id, "--cert-out", s(&cert_b), "--key-out", s(&key_b_probe), "--ca-cert", s(&root_b), "--ca-key", s(&key_b)]);
    let v = handshake(c, (&cert_a, &key_a), &root_a);
    assert_eq!(v["handshake"], "ok", "before the rotation, root A: {v}");
    let v = handshake(c, (&cert_b, &key_b_probe), &bundle_ab);
    assert_eq!(v["handshake"], "error", "before the rotation, root B is not trusted: {v}");

    let started = Instant::now();
    let (load, steps) = std::thread::scope(|scope| {
        // 40 s of requests at 50 per second over 4 connections, across every step.
        let http = scope.spawn(|| {
            let out = c
                .probe("client", &["http", "http://10.96.0.97/", "--rate", "50", "--count", "2000", "--conns", "4", "--timeout-ms", "3000"], Duration::from_secs(90))
                .unwrap();
            json(&out)
        });
        let mut steps = Vec::new();
        let mut step = |name: &str| steps.push(format!("{:>5.1}s {name}", started.elapsed().as_secs_f64()));
        std::thread::sleep(Duration::from_secs(3));

        // 1. Overlap: the CA still signs with A and publishes A+B; the nodes reload it.
        let (r0, r1) = (reloads(c, 0, 2), reloads(c, 1, 2));
        c.restart_ca_with(&["--extra-roots", s(&root_b)]).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || reloads(c, 0, 2) > r0 && reloads(c, 1, 2) > r1),
            "both nodes reloaded the A+B bundle:\n{}\n{}",
            node_log(c, 0),
            node_log(c, 1)
        );
        step("nodes trust A+B");
        // A fresh handshake with a B certificate is now accepted, without a restart.
        let v = handshake(c, (&cert_b, &key_b_probe), &bundle_ab);
        assert_eq!(v["handshake"], "ok", "root B trusted after the reload: {v}\n{}", node_log(c, 1));

        // 2. Switch: the CA signs with B (still publishing A next to it); certificates renew
        // onto B within a lifetime.
        let (a0, b0) = (issued(&node_log(c, 0), &client_id), issued(&node_log(c, 1), &web_id));
        c.restart_ca_with(&["--root-cert", s(&root_b), "--root-key", s(&key_b), "--extra-roots", s(&root_a)]).unwrap();
        step("CA signs with B");
        assert!(
            wait_until(Duration::from_secs(TTL + 4), || issued(&node_log(c, 0), &client_id) > a0 + 1 && issued(&node_log(c, 1), &web_id) > b0 + 1),
            "both nodes renewed from the new root:\n{}\n{}\n{}",
            node_log(c, 0),
            node_log(c, 1),
            ca_log(c)
        );
        step("certificates renewed from B");
        // node-b now presents a certificate of B: a client trusting B alone accepts it.
        let v = handshake(c, (&cert_b, &key_b_probe), &root_b);
        assert_eq!(v["handshake"], "ok", "node-b serves a certificate of root B: {v}");

        // 3. Retire A: the CA publishes B alone; the nodes reload it.
        let (r0, r1) = (reloads(c, 0, 1), reloads(c, 1, 1));
        c.restart_ca_with(&["--root-cert", s(&root_b), "--root-key", s(&key_b)]).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || reloads(c, 0, 1) > r0 && reloads(c, 1, 1) > r1),
            "both nodes reloaded the B-only bundle:\n{}\n{}",
            node_log(c, 0),
            node_log(c, 1)
        );
        step("nodes trust B only");
        let v = handshake(c, (&cert_a, &key_a), &root_b);
        assert_eq!(v["handshake"], "error", "a certificate of the retired root A is refused: {v}");
        let v = handshake(c, (&cert_b, &key_b_probe), &root_b);
        assert_eq!(v["handshake"], "ok", "{v}");
        (http.join().unwrap(), steps)
    });
    let mut summary = load.clone();
    if let Some(o) = summary.as_object_mut() {
        o.remove("pods_in_order");
    }
    eprintln!("rotation steps:\n  {}\nload: {summary}", steps.join("\n  "));
    assert_eq!(status_count(&load, "200"), 2000, "every request succeeded across the rotation: {summary}\nnode-a:\n{}\nnode-b:\n{}", node_log(c, 0), node_log(c, 1));
    assert_eq!(load["not_ok"], 0, "{summary}");
    assert_eq!(load["errors"], serde_json::json!({}), "{summary}");
    // No proxy restarted: one "node proxy ready" per node.
    for i in 0..2 {
        assert_eq!(lines_with(&node_log(c, i), &["node proxy ready"]).len(), 1, "node {i} was not restarted");
        assert!(!node_log(c, i).contains("trust bundle not reloaded"), "no partial read of the bundle:\n{}", node_log(c, i));
    }
}

fn ca_request(c: &SimCluster, id: &str, csr: Option<&Path>) -> Value {
    let token = c.node_token_file(0);
    let root = c.ca_root_cert();
    let mut args = vec!["ca-request", "--ca", CA_ADDRESS, "--root", s(&root), "--token-file", s(&token), "--node", "node-a", "--identity", id];
    if let Some(csr) = csr {
        args.extend(["--csr", s(csr)]);
    }
    probe_in_netns(c, &c.node(0).netns, &args)
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-node/src/ca/testdata").join(name)
}

#[test]
fn the_ca_refuses_its_own_identity_weak_keys_and_a_node_over_its_budget() {
    // A pod running under the CA's own ServiceAccount on node-a, and the pod the CSR fixtures
    // are for (demo/client): only the key or the reserved identity can be why a request fails.
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("istio-system", true)
        .pod("client", "demo", 0, "client", 9000)
        .pod("impostor", "istio-system", 0, "impostor", 9001)
        .service_account("impostor", "mesh-ca");
    let c = SimCluster::start(spec).unwrap();
    let c = &c;
    let dir = scratch(c, "csrs");

    let own = identity("istio-system", "mesh-ca");
    let v = ca_request(c, &own, None);
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    assert_eq!(
        v["message"],
        format!("identity {own} is the CA's own (ServiceAccount istio-system/mesh-ca) and is never issued to workloads"),
        "{v}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || !lines_with(&ca_log(c), &["certificate request refused", "is the CA's own"]).is_empty()),
        "the CA logs the refusal:\n{}",
        ca_log(c)
    );

    let accepted = "the CA accepts ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits";
    for (file, want) in [
        ("rsa1024.csr", format!("CSR RSA key of 1024 bits is too weak; {accepted}")),
        ("secp256k1.csr", format!("CSR ECDSA key on curve secp256k1 is not accepted; {accepted}")),
        ("ed25519.csr", format!("CSR Ed25519 key is not accepted; {accepted}")),
        ("p256-sha384.csr", "CSR signature algorithm ecdsa-with-SHA384 does not match its ECDSA P-256 key (expected ecdsa-with-SHA256)".into()),
    ] {
        let csr = dir.join(file);
        std::fs::copy(testdata(file), &csr).unwrap();
        let v = ca_request(c, &identity("demo", "client"), Some(&csr));
        assert_eq!(v["code"], "InvalidArgument", "{file}: {v}");
        assert_eq!(v["message"], want.as_str(), "{file}: {v}");
    }
    for file in ["p256.csr", "p384.csr", "rsa2048.csr"] {
        let csr = dir.join(file);
        std::fs::copy(testdata(file), &csr).unwrap();
        let v = ca_request(c, &identity("demo", "client"), Some(&csr));
        assert_eq!(v["code"], "Ok", "{file} is accepted: {v}");
        assert_eq!(v["leaf_spiffe"], identity("demo", "client"), "{v}");
    }

    // A small budget: two requests at once, then one per 10 s.
    c.restart_ca_with(&["--node-rate-limit", "0.1", "--node-burst", "2"]).unwrap();
    let codes: Vec<Value> = (0..4).map(|_| ca_request(c, &identity("demo", "client"), None)).collect();
    // (node-a's proxy shares the budget: at most two get through.)
    let ok = codes.iter().filter(|v| v["code"] == "Ok").count();
    let limited: Vec<&Value> = codes.iter().filter(|v| v["code"] == "ResourceExhausted").collect();
    assert!(ok <= 2 && limited.len() >= 2 && ok + limited.len() == 4, "{codes:?}");
    let message = limited[0]["message"].as_str().unwrap_or("");
    assert!(message.starts_with("rate limit: ") && message.contains("made more than 2 requests at once or 0.1/s sustained; retry in "), "{message}");
}
