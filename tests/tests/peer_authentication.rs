//! End to end: PeerAuthentication on the inbound side. STRICT mesh pods refuse plaintext from
//! outside the mesh (also a client dialling the pod IP directly); mesh traffic still arrives
//! through the node proxies. Needs root; run through `cargo xtask test`.
use std::time::Duration;

use mesh_e2e::{ClusterSpec, SimCluster};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn connect(c: &SimCluster, from: &str, addr: &str) -> Value {
    let out = c.probe(from, &["connect", addr, "--timeout-ms", "1000"], T).unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

fn pa(namespace: &str, body: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: {namespace}\nspec:\n{body}")
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_and_permissive_accepts_it() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .namespace("plain", false)
        .pod("client", "demo", 1, "client", 9000)
        .pod("server", "demo", 0, "server", 7000)
        .pod("outsider", "plain", 1, "outsider", 9000)
        .service("server", "demo", [10, 96, 0, 70], "server", 80, 7000);
    let c = SimCluster::start(spec).unwrap();
    c.start_servers().unwrap();
    let server = format!("{}:7000", c.pod("server").ip);

    // Istio's default, PERMISSIVE: plaintext from outside the mesh is accepted.
    let r = connect(&c, "outsider", &server);
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["answer"], format!("server {}", c.pod("outsider").ip));

    c.apply_config("pa.yaml", &pa("demo", "  mtls:\n    mode: STRICT\n")).unwrap();
    let r = connect(&c, "outsider", &server);
    assert_ne!(r["result"], "ok", "STRICT refuses a plaintext client dialling the pod IP: {r}");
    assert!(c.counter(0, "capture", "strict_denied") >= 1);
    // Mesh traffic, across nodes through both proxies, still gets in.
    let r = connect(&c, "client", "10.96.0.70:80");
    assert_eq!(r["result"], "ok", "{r}");

    // A workload-level port exception opens that port again.
    c.apply_config(
        "pa.yaml",
        &format!(
            "{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: server\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    7000:\n      mode: PERMISSIVE\n",
            pa("demo", "  mtls:\n    mode: STRICT\n")
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = connect(&c, "outsider", &server);
    assert_eq!(r["result"], "ok", "port-level PERMISSIVE: {r}");

    // Mesh-wide STRICT from the root namespace applies too.
    c.apply_config("pa.yaml", &pa("istio-system", "  mtls:\n    mode: STRICT\n")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = connect(&c, "outsider", &server);
    assert_ne!(r["result"], "ok", "mesh-wide STRICT: {r}");
}
