//! The users' shape on two simulated nodes, with the seed's policies applied unchanged.
//!
//! node-a: bff-0, recall-0 (v1), recall-3 (v1); node-b: bff-1, recall-1 (v1), recall-2 (v2).
//! Service `recall` (10.96.0.20, port `grpc` 50051) as in deploy/examples/lemo-dev. Every recall
//! pod runs `mesh-probe http-serve`, answering gRPC-framed `/grpc` calls with bounded capacity
//! (one at a time, 20 ms each: 50 calls/s a pod), so a burst can overrun it.
use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context as _, bail};
use mesh_e2e::{ClusterSpec, SimCluster, bins};

use super::Demo;

pub const NS: &str = "lemo-dev";
pub const VIP: &str = "10.96.0.20";
pub const PORT: u16 = 50051;
/// (pod, node, version)
pub const RECALL: [(&str, usize, &str); 4] = [("recall-0", 0, "v1"), ("recall-1", 1, "v1"), ("recall-2", 1, "v2"), ("recall-3", 0, "v1")];
pub const V1: [&str; 3] = ["recall-0", "recall-1", "recall-3"];
pub const V2: &str = "recall-2";
/// bff-0 on node-a calls through the seed's routes; bff-1 on node-b is the second client.
pub const BFF: [(&str, usize); 2] = [("bff-0", 0), ("bff-1", 1)];
/// Capacity of one recall pod: calls at once, and ms each.
pub const WORKERS: u32 = 1;
pub const SERVICE_MS: u32 = 20;
/// The header that selects the demo's route without retries (see [`virtual_service`]).
pub const NO_RETRIES: &str = "x-demo-retries: off";
/// The seed's policy files, applied under their own names.
const SEED_FILES: [&str; 4] = ["peer-authentication.yaml", "authorization-policy.yaml", "destination-rules.yaml", "virtual-services.yaml"];

fn spec() -> ClusterSpec {
    let mut spec = ClusterSpec::new(2).namespace(NS, true);
    for (pod, node) in BFF {
        spec = spec.pod(pod, NS, node, "bff", 8080);
    }
    for (pod, node, version) in RECALL {
        spec = spec.pod_labelled(pod, NS, node, "recall", &[("version", version)], "grpc", PORT);
    }
    spec.service_named("recall", NS, [10, 96, 0, 20], "recall", "grpc", PORT, PORT)
}

pub fn seed_dir() -> PathBuf {
    crate::workspace_root().join("deploy/examples/lemo-dev")
}

pub fn seed(file: &str) -> anyhow::Result<String> {
    let path = seed_dir().join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading the seed's {}", path.display()))
}

/// The seed's VirtualService with one route added in front, for the second client only: calls
/// carrying `x-demo-retries: off` go to v1 with retries disabled, so what a failing pod does to a
/// caller without the mesh's retries can be seen beside bff's.
pub fn virtual_service() -> anyhow::Result<String> {
    let vs = seed("virtual-services.yaml")?;
    let anchor = "  http:\n    - name: canary\n";
    if !vs.contains(anchor) {
        bail!("deploy/examples/lemo-dev/virtual-services.yaml changed: no `http:` list starting with the `canary` route to add the demo's route before");
    }
    let route = "  http:\n    - name: demo-no-retries\n      match:\n        - headers:\n            x-demo-retries:\n              exact: \"off\"\n      route:\n        - destination:\n            host: recall\n            subset: v1\n      timeout: 2s\n      retries:\n        attempts: 0\n    - name: canary\n";
    Ok(vs.replacen(anchor, route, 1))
}

/// The cluster up with the seed's policies, and the recall servers' process ids by pod.
pub fn start() -> anyhow::Result<(SimCluster, BTreeMap<String, u32>)> {
    let c = SimCluster::start(spec())?;
    let probe = bins::path("mesh-probe");
    let (workers, service_ms, port) = (WORKERS.to_string(), SERVICE_MS.to_string(), PORT.to_string());
    let mut pids = BTreeMap::new();
    for (pod, _, _) in RECALL {
        let args = ["http-serve", "--name", pod, "--port", &port, "--capacity", &workers, "--service-ms", &service_ms];
        pids.insert(pod.to_string(), c.serve_in_pod_pid(pod, &probe, &args, PORT)?);
    }
    for file in SEED_FILES {
        let yaml = if file == "virtual-services.yaml" { virtual_service()? } else { seed(file)? };
        c.apply_config(file, &yaml).with_context(|| format!("applying the seed's {file}"))?;
    }
    Ok((c, pids))
}

/// Sends `signal` to a recall pod's server (SIGUSR1: start failing, SIGUSR2: heal).
pub fn signal_server(d: &Demo, pod: &str, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = *d.servers.get(pod).with_context(|| format!("no server in {pod}"))?;
    // SAFETY: kill(2) on a child this process started and has not reaped.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
        bail!("signalling the server in {pod} (pid {pid}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn introduce(d: &mut Demo) {
    let c = &d.c;
    let mut s = String::from("\nThe cast (namespace lemo-dev, enrolled in the mesh; no sidecars):\n");
    for (i, node) in c.nodes.iter().enumerate() {
        let pods: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.spec.node == i)
            .map(|p| match p.spec.labels.get("version") {
                Some(v) => format!("{} {v} {}", p.spec.name, p.ip),
                None => format!("{} {}", p.spec.name, p.ip),
            })
            .collect();
        s.push_str(&format!("  {} ({}, proxy pid {}): {}\n", node.name, node.ip, c.proxy_pid(i).unwrap_or(0), pods.join(", ")));
    }
    s.push_str(&format!(
        "  Service recall {VIP}:{PORT} (grpc); each recall pod serves one call at a time, {SERVICE_MS} ms each\n  policies: {} from {} (unchanged; the VirtualService gets one extra route for calls with `{NO_RETRIES}`)",
        SEED_FILES.join(", "),
        seed_dir().display()
    ));
    d.view.say(&s);
}

#[cfg(test)]
mod tests {
    use serde_yaml::Value;

    #[test]
    fn the_no_retries_route_comes_first_and_the_seed_routes_stay() {
        let vs: Value = serde_yaml::from_str(&super::virtual_service().unwrap()).unwrap();
        let http = vs["spec"]["http"].as_sequence().unwrap();
        let names: Vec<&str> = http.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["demo-no-retries", "canary", "default"]);
        assert_eq!(http[0]["retries"]["attempts"], Value::from(0));
        assert_eq!(http[0]["match"][0]["headers"]["x-demo-retries"]["exact"], Value::from("off"));
        assert_eq!(http[0]["route"][0]["destination"]["subset"], Value::from("v1"));
        let seed: Value = serde_yaml::from_str(&super::seed("virtual-services.yaml").unwrap()).unwrap();
        assert_eq!(http[1..], seed["spec"]["http"].as_sequence().unwrap()[..], "the seed's routes unchanged");
        assert_eq!(super::NO_RETRIES, "x-demo-retries: off");
    }
}
