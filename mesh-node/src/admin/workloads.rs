//! `/workloads`: every pod of the cluster, with what the mesh makes of it.
use serde_json::{Value, json};

use super::AdminState;
use crate::identity::Identity;

pub fn workloads(state: &AdminState) -> Value {
    let cluster = state.proxy.cluster();
    let trust_domain = &state.proxy.connector.trust_domain;
    let capture = state.capture_state.lock().unwrap_or_else(|e| e.into_inner()).enrolled.clone();
    let pods: Vec<Value> = cluster
        .pods()
        .map(|pod| {
            let key = format!("{}/{}", pod.namespace, pod.name);
            let label = |k: &str| pod.labels.get(k).cloned();
            json!({
                "namespace": pod.namespace,
                "name": pod.name,
                "ip": pod.ip,
                "node": pod.node,
                "local": pod.node == state.node,
                "identity": Identity::new(trust_domain.as_str(), &pod.namespace, &pod.service_account).to_string(),
                "enrolled": cluster.is_enrolled(pod),
                // Cgroups the capture found for this pod: empty for an enrolled local pod means
                // its processes are not (yet) where the capture looks.
                "cgroup_ids": capture.get(&key).cloned().unwrap_or_default(),
                "app": label("app").or_else(|| label("app.kubernetes.io/name")),
                "version": label("version").or_else(|| label("app.kubernetes.io/version")),
            })
        })
        .collect();
    json!({"node": state.node, "workloads": pods})
}
