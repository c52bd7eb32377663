//! End to end: every `meshctl` command against a live simulated cluster, each showing what the
//! test arranged (an ejected endpoint, a captured pod and its cgroup, the VIP in the kernel map,
//! the request rate driven, the workload identities), `check` passing on a healthy node and
//! failing with a hint once something is broken, and `-o json` parsing for every command.
//! Needs root; run through `cargo xtask test`.
use std::{
    os::unix::fs::MetadataExt as _,
    process::Output,
    time::Duration,
};

use mesh_e2e::{ClusterSpec, SimCluster, bins, wait_until};
use serde_json::Value;

const VIP: &str = "10.96.0.50";
const NODE_A: usize = 0;
const NODE_B: usize = 1;

const POLICY: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: demo
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 1s
      baseEjectionTime: 60s
      maxEjectionPercent: 100
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: demo
spec:
  hosts: [web]
  http:
  - match:
    - headers:
        x-canary:
          exact: "true"
    route:
    - destination: {host: web}
  - route:
    - destination: {host: web}
"#;

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs meshctl on a node and requires success.
fn ok(c: &SimCluster, node: usize, args: &[&str]) -> String {
    let out = c.meshctl(node, args).unwrap_or_else(|e| panic!("meshctl {args:?}: {e}"));
    assert!(out.status.success(), "meshctl {args:?} exited {}:\n{}\nnode log:\n{}", out.status, text(&out), c.proxy_log(node));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(c: &SimCluster, node: usize, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = ok(c, node, &full);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("meshctl -o json {args:?} is not JSON ({e}):\n{out}"))
}


fn endpoint<'a>(v: &'a Value, pod: &str) -> Option<&'a Value> {
    v["clusters"].as_array()?.iter().flat_map(|c| c["endpoints"].as_array().into_iter().flatten()).find(|e| e["pod"] == pod)
}

#[test]
fn every_meshctl_command_shows_the_live_node() {
    let spec = ClusterSpec::new(2)
        .namespace("demo", true)
        .pod("client", "demo", NODE_A, "client", 9000)
        .pod_labelled("web-1", "demo", NODE_A, "web", &[], "http", 8080)
        .pod_labelled("web-2", "demo", NODE_B, "web", &[], "http", 8080)
        .pod_labelled("web-3", "demo", NODE_A, "web", &[], "http", 8080)
        .service_named("web", "demo", [10, 96, 0, 50], "web", "http", 80, 8080);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let probe = bins::path("mesh-probe");
    for pod in ["web-1", "web-2", "web-3"] {
        c.serve_in_pod(pod, &probe, &["http-serve", "--name", pod, "--port", "8080"], 8080).unwrap();
    }
    c.apply_config("policy.yaml", POLICY).unwrap();

    // A healthy node passes every check.
    let check = ok(&c, NODE_A, &["check"]);
    assert!(!check.contains('✘'), "{check}");
    for name in ["node proxy reachable", "cgroup v2 mounted", "eBPF programs attached", "pods enrolled", "listeners up", "CA reachable", "certificates valid", "config valid"] {
        assert!(check.contains(&format!("✔ {name}")), "{name} passes:\n{check}");
    }

    let status = json(&c, NODE_A, &["status"]);
    assert_eq!(status["node"], "node-a", "{status}");
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["config"]["status"], "in-sync", "{status}");
    assert!(ok(&c, NODE_A, &["status"]).contains("programs attached"));

    // Workloads: cluster-wide, with identities and enrollment.
    let w = json(&c, NODE_A, &["workloads"]);
    let client = w["workloads"].as_array().unwrap().iter().find(|p| p["name"] == "client").expect("client listed");
    assert_eq!(client["enrolled"], true, "{client}");
    assert_eq!(client["local"], true, "{client}");
    assert_eq!(client["identity"], "spiffe://cluster.local/ns/demo/sa/client", "{client}");
    let table = ok(&c, NODE_A, &["workloads"]);
    assert!(table.contains("web-2") && table.contains("node-b"), "{table}");

    let s = json(&c, NODE_A, &["services"]);
    let web = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").expect("web listed");
    assert_eq!(web["vips"][0], VIP, "{web}");
    assert_eq!(web["ports"][0]["protocol"], "http", "{web}");
    assert_eq!(web["ports"][0]["endpoints"], 3, "{web}");

    // Before any request the endpoints come from the config.
    let e = json(&c, NODE_A, &["endpoints", "demo/web"]);
    assert_eq!(e["clusters"][0]["resolved"], false, "{e}");
    assert_eq!(endpoint(&e, "demo/web-2").expect("web-2 listed")["health"], "healthy", "{e}");

    // web-2 fails five requests in a row (round robin over three): outlier detection ejects it.
    let url = format!("http://{VIP}/");
    c.probe("client", &["http", &url, "--count", "15", "--header", "x-fail-pods: web-2"], Duration::from_secs(30)).unwrap();
    let e = json(&c, NODE_A, &["endpoints", "web"]);
    let web2 = endpoint(&e, "demo/web-2").expect("web-2 listed");
    assert_eq!(web2["health"], "ejected", "{e}");
    assert!(web2["ejection_remaining_ms"].as_u64().is_some_and(|ms| ms > 30_000), "{e}");
    assert_eq!(endpoint(&e, "demo/web-1").unwrap()["health"], "healthy", "{e}");
    let table = ok(&c, NODE_A, &["endpoints", "demo/web"]);
    let line = table.lines().find(|l| l.contains("demo/web-2")).unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("ejected"), "{table}");

    let r = ok(&c, NODE_A, &["routes", "demo/web"]);
    assert!(r.contains("header[x-canary] = \"true\""), "{r}");
    assert!(r.contains("ROUND_ROBIN") && r.contains("5 consecutive 5xx"), "{r}");
    let r = json(&c, NODE_A, &["routes"]);
    assert_eq!(r["services"][0]["http"].as_array().map(Vec::len), Some(2), "{r}");

    // Certificates of node-a's workloads (client and web), from the running CA.
    let certs = json(&c, NODE_A, &["certs"]);
    assert_eq!(certs["mode"], "mtls", "{certs}");
    assert_eq!(certs["ca"]["reachable"], true, "{certs}");
    let ids: Vec<&str> = certs["certificates"].as_array().unwrap().iter().filter_map(|c| c["identity"].as_str()).collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/demo/sa/client", "spiffe://cluster.local/ns/demo/sa/web"], "{certs}");
    assert!(certs["certificates"].as_array().unwrap().iter().all(|c| c["state"] == "valid" && c["serial"].is_string()), "{certs}");
    assert!(ok(&c, NODE_A, &["certs"]).contains("sa/client"));

    // The captured pod, with the id of the cgroup its processes run in, and the VIP in the map.
    let bpf = json(&c, NODE_A, &["bpf"]);
    let cgroup_id = std::fs::metadata(&c.pod("client").cgroup).unwrap().ino();
    let enrolled = bpf["enrolled_pods"].as_array().unwrap().iter().find(|p| p["pod"] == "demo/client").unwrap_or_else(|| panic!("{bpf}"));
    assert!(enrolled["cgroup_ids"].as_array().unwrap().contains(&cgroup_id.into()), "cgroup {cgroup_id}: {bpf}");
    assert_eq!(enrolled["in_kernel_map"], true, "{bpf}");
    assert!(bpf["programs"].as_array().unwrap().iter().all(|p| p["attached"] == true), "{bpf}");
    let vip = bpf["mesh_destinations"].as_array().unwrap().iter().find(|d| d["ip"] == VIP).unwrap_or_else(|| panic!("{bpf}"));
    assert_eq!(vip["kind"], "service-vip", "{bpf}");
    assert_eq!(vip["owner"], "demo/web", "{bpf}");
    assert!(bpf["counters"]["captured"].as_u64().unwrap() > 0, "{bpf}");
    let table = ok(&c, NODE_A, &["bpf"]);
    assert!(table.contains(&cgroup_id.to_string()) && table.contains(VIP), "{table}");

    // `top` sees the rate the client drives.
    c.spawn_in_pod("client", &probe, &["http", &url, "--rate", "50", "--count", "600", "--h2"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Two samples keep the run well inside the harness' 5 s limit per meshctl call.
    let out = ok(&c, NODE_A, &["-o", "json", "top", "--iterations", "2", "--interval", "1"]);
    let samples: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("top line not JSON ({e}): {l}"))).collect();
    assert_eq!(samples.len(), 2, "{out}");
    let rps: Vec<f64> = samples
        .iter()
        .map(|s| s["services"].as_array().into_iter().flatten().filter(|r| r["service"].as_str().is_some_and(|n| n.contains("web") || n.contains("all services"))).filter_map(|r| r["rps"].as_f64()).sum())
        .collect();
    let last = samples.last().unwrap();
    assert!(rps.iter().all(|r| (30.0..=70.0).contains(r)), "about 50 requests/s: {rps:?}\n{out}");
    if last["source"] == "metrics" {
        let row = last["services"].as_array().unwrap().iter().find(|r| r["service"].as_str().unwrap().contains("web")).unwrap();
        assert!(row["success_rate"].as_f64().is_some_and(|s| s > 0.99), "{row}");
        assert!(row["p99_ms"].as_f64().is_some(), "{row}");
    }
    let table = ok(&c, NODE_A, &["top", "--once"]);
    assert!(table.contains("RPS"), "{table}");

    // The rate traffic is in flight: its connection is listed.
    let mut conns = Value::Null;
    assert!(
        wait_until(Duration::from_secs(3), || {
            conns = json(&c, NODE_A, &["connections"]);
            conns["connections"].as_array().is_some_and(|l| !l.is_empty())
        }),
        "live connections while traffic runs: {conns}"
    );

    // Log level at runtime.
    assert_eq!(ok(&c, NODE_A, &["log-level"]).trim(), "info");
    assert_eq!(ok(&c, NODE_A, &["log-level", "debug"]).trim(), "debug");
    assert_eq!(json(&c, NODE_A, &["log-level"])["level"], "debug");
    let bad = c.meshctl(NODE_A, &["log-level", "very-loud=x=y"]).unwrap();
    assert!(!bad.status.success(), "{}", text(&bad));
    ok(&c, NODE_A, &["log-level", "info"]);

    // JSON (and YAML) for every command.
    for args in [
        &["status"][..], &["workloads"], &["services"], &["endpoints", "demo/web"], &["routes"], &["certs"], &["connections"],
        &["bpf"], &["log-level"], &["config", "dump"], &["check"], &["stats"], &["clusters"], &["ready"],
    ] {
        json(&c, NODE_A, args);
    }
    let yaml = ok(&c, NODE_A, &["-o", "yaml", "status"]);
    assert!(yaml.contains("node: node-a"), "{yaml}");
    let dump = ok(&c, NODE_A, &["config"]);
    assert!(dump.contains("demo/web"), "{dump}");

    // Local validation, no daemon involved.
    let bad_dir = c.config_dir.parent().unwrap().join("bad-config");
    std::fs::create_dir_all(&bad_dir).unwrap();
    std::fs::write(bad_dir.join("policy.yaml"), POLICY.replace("interval: 1s", "interval: ten")).unwrap();
    let out = c.meshctl(NODE_A, &["config", "validate", bad_dir.to_str().unwrap()]).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("trafficPolicy.outlierDetection.interval"), "{}", text(&out));
    ok(&c, NODE_A, &["config", "validate", c.config_dir.to_str().unwrap()]);

    // A rejected config change: the daemon keeps the last good one, `check` says so.
    c.write_config_file("broken.yaml", &POLICY.replace("interval: 1s", "interval: ten").replace("name: web\n", "name: web-broken\n")).unwrap();
    let out = c.meshctl(NODE_A, &["check"]).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("✘ config valid") && text(&out).contains("outlierDetection.interval"), "{}", text(&out));
    std::fs::remove_file(c.config_dir.join("broken.yaml")).unwrap();

    // The CA goes away: `check` fails on it with a hint.
    c.stop_ca().unwrap();
    let out = c.meshctl(NODE_A, &["check"]).unwrap();
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    let line = report.lines().position(|l| l.starts_with("✘ CA reachable")).unwrap_or_else(|| panic!("{report}"));
    assert!(report.lines().nth(line + 1).is_some_and(|h| h.contains("hint:") && h.contains("mesh-node ca")), "{report}");
    assert!(report.contains("✔ config valid"), "the config is fine again: {report}");

    // No daemon on node-b: a clear message naming the address and what to do.
    c.stop_proxy(NODE_B).unwrap();
    let out = c.meshctl(NODE_B, &["status"]).unwrap();
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("127.0.0.1:15000") && msg.contains("--node"), "{msg}");
    let out = c.meshctl(NODE_B, &["check"]).unwrap();
    assert!(!out.status.success() && text(&out).contains("✘ node proxy reachable"), "{}", text(&out));

    // Shell completions and the kubectl plugin name.
    let out = std::process::Command::new(bins::path("meshctl")).args(["completion", "bash"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("complete"), "{}", text(&out));
    let plugin = c.config_dir.parent().unwrap().join("kubectl-mesh");
    std::os::unix::fs::symlink(bins::path("meshctl"), &plugin).unwrap();
    let out = std::process::Command::new(&plugin).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: kubectl mesh"), "{}", text(&out));
}

/// `meshctl describe` for the seed's recall canary (deploy/examples/lemo-dev's DestinationRule
/// and VirtualService, unchanged): bff's requests to recall:50051 go by the VirtualService's
/// routes (canary by header, 90/10 otherwise) to subsets v1 and v2 of the DestinationRule found
/// in bff's own namespace, each with its endpoints and where every setting comes from.
#[test]
fn describe_explains_the_seed_canary() {
    let seed = |f: &str| std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lemo-dev").join(f)).unwrap();
    let spec = ClusterSpec::new(2)
        .namespace("lemo-dev", true)
        .pod("bff", "lemo-dev", NODE_A, "bff", 8080)
        .pod_labelled("recall-v1-a", "lemo-dev", NODE_A, "recall", &[("version", "v1")], "grpc", 50051)
        .pod_labelled("recall-v1-b", "lemo-dev", NODE_B, "recall", &[("version", "v1")], "grpc", 50051)
        .pod_labelled("recall-v2", "lemo-dev", NODE_B, "recall", &[("version", "v2")], "grpc", 50051);
    let c = SimCluster::start(spec).expect("simulated cluster");
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: recall, namespace: lemo-dev}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: recall}\n  ports:\n  - {name: grpc, port: 50051, targetPort: grpc, appProtocol: grpc}\n";
    c.apply_config("recall-service.yaml", service).unwrap();
    c.apply_config("destination-rules.yaml", &seed("destination-rules.yaml")).unwrap();
    c.apply_config("virtual-services.yaml", &seed("virtual-services.yaml")).unwrap();

    let table = ok(&c, NODE_A, &["describe", "lemo-dev/bff", "recall:50051"]);
    eprintln!("{table}");
    for want in [
        "VirtualService lemo-dev/recall",
        "x-canary",
        "subset v1 90%",
        "subset v2 10%",
        "DestinationRule lemo-dev/recall (from the client namespace)",
        "Cluster outbound|50051|v1|recall.lemo-dev.svc.cluster.local",
        "Cluster outbound|50051|v2|recall.lemo-dev.svc.cluster.local",
        "lemo-dev/recall-v1-a",
        "lemo-dev/recall-v1-b",
        "lemo-dev/recall-v2",
    ] {
        assert!(table.contains(want), "describe lacks {want:?}:\n{table}");
    }
    let v = json(&c, NODE_A, &["describe", "lemo-dev/bff", "recall:50051"]);
    assert_eq!(v["source"]["identity"], "spiffe://cluster.local/ns/lemo-dev/sa/bff");
    assert_eq!(v["destination_rule"]["origin"], "client namespace");
    let routes = v["http_routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{v:#}");
    // The canary route sets no retries: Istio's default applies; the default route sets its own.
    assert_eq!(routes[0]["effective_retries"]["origin"], "Istio default");
    assert_eq!(routes[0]["effective_retries"]["attempts"], 2);
    assert_eq!(routes[1]["effective_retries"]["origin"], "VirtualService lemo-dev/recall");
    assert_eq!(routes[1]["effective_retries"]["attempts"], 3);
    let weights: Vec<(String, u64)> = routes[1]["route"].as_array().unwrap().iter().map(|d| (d["subset"].as_str().unwrap().to_string(), d["weight"].as_u64().unwrap())).collect();
    assert_eq!(weights, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
    let clusters = v["clusters"].as_array().unwrap();
    let pods = |subset: &str| -> Vec<String> {
        let c = clusters.iter().find(|c| c["subset"] == subset).unwrap_or_else(|| panic!("no {subset} cluster: {v:#}"));
        assert_eq!(c["policy"]["outlier_detection"]["origin"], "DestinationRule lemo-dev/recall");
        let mut p: Vec<String> = c["endpoints"].as_array().unwrap().iter().map(|e| e["pod"].as_str().unwrap().to_string()).collect();
        p.sort();
        p
    };
    assert_eq!(pods("v1"), ["lemo-dev/recall-v1-a", "lemo-dev/recall-v1-b"]);
    assert_eq!(pods("v2"), ["lemo-dev/recall-v2"]);
    // Asking about something that is not there says what is wrong.
    let out = c.meshctl(NODE_A, &["describe", "lemo-dev/bff", "nothing:1"]).unwrap();
    assert!(!out.status.success() && text(&out).contains("no Service nothing"), "{}", text(&out));
}
