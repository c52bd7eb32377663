//! `meshctl check`: verifies the node in the spirit of `linkerd check`. Every check passes,
//! warns or fails with a hint on what to do; any failure makes the exit status non-zero.
use serde::Serialize;
use serde_json::Value;

use crate::client::Admin;

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, outcome: Outcome::Pass, detail: detail.into(), hint: None }
}

fn warn(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { name, outcome: Outcome::Warn, detail: detail.into(), hint: Some(hint.into()) }
}

fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { name, outcome: Outcome::Fail, detail: detail.into(), hint: Some(hint.into()) }
}

pub async fn run(admin: &Admin) -> Vec<Check> {
    let status = match admin.get("/status").await {
        Ok(s) => s,
        // Nothing else can be checked without the daemon.
        Err(e) => return vec![fail("node proxy reachable", format!("{e:#}").lines().next().unwrap_or_default().to_owned(), hint_of(&e))],
    };
    let mut checks = vec![pass("node proxy reachable", format!("admin API at {} (node {})", admin.addr, status["node"].as_str().unwrap_or("?")))];
    checks.push(if status["ready"] == true {
        pass("node proxy ready", "serving captured connections")
    } else {
        fail("node proxy ready", "not ready yet", "the daemon becomes ready once its listeners are up and this node's certificates are fetched (at most 15s); see its log")
    });
    checks.extend(capture(&status["capture"]));
    checks.push(listeners(&status["listeners"]));
    checks.extend(certificates(&status["certificates"]));
    checks.push(config(&status["config"]));
    checks.extend(not_applied(&status["config"]));
    checks
}

fn hint_of(e: &anyhow::Error) -> String {
    match e.downcast_ref::<crate::client::Unreachable>() {
        Some(_) => "start mesh-node on this node, or point meshctl at its admin API with --node HOST:PORT (through kubectl port-forward if remote)".into(),
        None => "the admin API answered but not as expected: is meshctl the same version as mesh-node?".into(),
    }
}

fn capture(c: &Value) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(match c["cgroup2_mount"].as_str() {
        Some(mount) => pass("cgroup v2 mounted", format!("at {mount}")),
        None => fail(
            "cgroup v2 mounted",
            c["cgroup2_error"].as_str().unwrap_or("not found").to_owned(),
            "the capture attaches to cgroup v2: boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup)",
        ),
    });
    let (attached, total) = (c["programs_attached"].as_u64().unwrap_or(0), c["programs"].as_u64().unwrap_or(0));
    out.push(if total > 0 && attached == total {
        pass("eBPF programs attached", format!("{attached}/{total} attached to {}", c["cgroup"].as_str().unwrap_or("?")))
    } else {
        fail(
            "eBPF programs attached",
            format!("{attached}/{total} attached"),
            "the kernel must support cgroup/connect4, sock_ops and bpf_link (5.7+), and mesh-node needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN; see `meshctl bpf` and `bpftool cgroup tree`",
        )
    });
    let (found, configured) = (c["enrolled_pods_found"].as_u64().unwrap_or(0), c["enrolled_pods_configured"].as_u64().unwrap_or(0));
    out.push(if configured == 0 {
        pass("pods enrolled", "no mesh pods are scheduled on this node")
    } else if found >= configured {
        pass("pods enrolled", format!("{found}/{configured} mesh pods on this node have their cgroup enrolled"))
    } else {
        fail(
            "pods enrolled",
            format!("only {found}/{configured} mesh pods on this node have a cgroup the capture found"),
            format!(
                "pod cgroups are looked up by pod UID under {}: check --cgroup points at the node's pod cgroup (kubepods) and compare `meshctl bpf` with `meshctl workloads --local`",
                c["cgroup"].as_str().unwrap_or("?")
            ),
        )
    });
    out
}

fn listeners(l: &Value) -> Check {
    let down: Vec<String> = l
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["listening"] != true)
        .map(|x| format!("{} {}", x["role"].as_str().unwrap_or("?"), x["address"].as_str().unwrap_or("?")))
        .collect();
    let all: Vec<String> = l.as_array().into_iter().flatten().map(|x| x["role"].as_str().unwrap_or("?").to_owned()).collect();
    if down.is_empty() {
        pass("listeners up", all.join(", "))
    } else {
        fail("listeners up", format!("not listening: {}", down.join(", ")), "another process may hold the port, or the daemon is shutting down; see the daemon's log")
    }
}

fn certificates(c: &Value) -> Vec<Check> {
    if c["mode"] == "plaintext" {
        let hint = "start mesh-node with --ca-address, --ca-root and --node-token-file for mutual TLS between nodes";
        return vec![warn("CA reachable", "no CA configured: tunnels are plaintext", hint)];
    }
    let ca = &c["ca"];
    let addr = ca["address"].as_str().unwrap_or("?");
    let mut out = vec![if ca["reachable"] == true {
        pass("CA reachable", format!("{addr} accepts connections from this node"))
    } else {
        fail(
            "CA reachable",
            ca["error"].as_str().unwrap_or("unreachable").to_owned(),
            format!("certificates cannot be renewed: check that `mesh-node ca` runs and listens on {addr} and that this node can reach it; current certificates keep working until they expire"),
        )
    }];
    let (count, missing, near) = (c["count"].as_u64().unwrap_or(0), c["missing"].as_u64().unwrap_or(0), c["near_expiry"].as_u64().unwrap_or(0));
    let left = c["min_seconds_left"].as_u64().map(crate::views::human_secs).unwrap_or("-".into());
    out.push(if missing > 0 {
        fail("certificates valid", format!("{missing} of {count} workload certificates missing"), "the CA refused or was unreachable when they were requested: see `meshctl certs` and the daemon's log")
    } else if near > 0 {
        warn(
            "certificates valid",
            format!("{near} of {count} certificates have less than 20% of their lifetime left (shortest: {left})"),
            "renewal at half-life has been failing: check the CA (`meshctl certs`)",
        )
    } else if count == 0 {
        pass("certificates valid", "no mesh workloads on this node")
    } else {
        pass("certificates valid", format!("{count} certificates, shortest has {left} left"))
    });
    out
}

fn config(c: &Value) -> Check {
    let dir = c["dir"].as_str().unwrap_or("?");
    let warnings: Vec<&str> = c["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let live = matches!(c["status"].as_str(), Some("live" | "in-sync" | "pending"));
    if live && let Some(first) = warnings.first() {
        return warn(
            "config valid",
            format!("applied, {} field(s) applied differently than written: {first}", warnings.len()),
            "a policy field the mesh cannot check at L4 (an HTTP attribute) makes an ALLOW rule match nothing and is ignored in a DENY rule; a VirtualService shadowed by an older one for the same host, or bound only to gateways, is not used for mesh traffic; PeerAuthentication DISABLE acts as PERMISSIVE. `meshctl status` or GET /config_errors lists each",
        );
    }
    match c["status"].as_str() {
        // Kubernetes mode: every object from the API server is applied.
        Some("live") => pass("config valid", format!("every object from the API server is applied (generation {})", c["generation"].as_str().unwrap_or("?"))),
        Some("held-back") => {
            let held: Vec<&Value> = c["held_back"].as_array().into_iter().flatten().collect();
            let first = held.first().and_then(|h| h["message"].as_str()).unwrap_or("");
            fail(
                "config valid",
                format!("{} object(s) held back: {first}", held.len()),
                "fix the object (kubectl edit); until then its last good version stays applied (or it is left out). `meshctl status` lists each, and GET /config_errors has the details",
            )
        }
        Some("in-sync") => pass("config valid", format!("{dir} is live (generation {})", c["generation"].as_str().unwrap_or("?"))),
        Some("pending") => pass("config valid", format!("{dir} changed and is valid; the daemon picks it up within its poll interval")),
        Some("rejected") => {
            let problems: Vec<&str> = c["problems"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            fail(
                "config valid",
                format!("{dir} has {} problem(s): {}", problems.len(), problems.first().copied().unwrap_or("")),
                format!("fix the file (`meshctl config validate {dir}` lists every problem); the last good config stays live until then"),
            )
        }
        _ => fail("config valid", c["problems"].to_string(), format!("the daemon cannot read {dir}")),
    }
}

/// Objects of kinds the mesh does not apply: a warning (clusters keep Gateways for their
/// ingress), a failure for ServiceEntry and Sidecar objects, which route mesh traffic in Istio.
fn not_applied(c: &Value) -> Option<Check> {
    let all: Vec<&Value> = c["not_applied"].as_array().into_iter().flatten().collect();
    let line = |v: &Value| v["line"].as_str().unwrap_or("?").to_owned();
    let routing: Vec<String> = all.iter().filter(|v| v["changes_routing"] == true).map(|v| line(v)).collect();
    if !routing.is_empty() {
        return Some(fail(
            "kinds applied",
            format!("{} object(s) that route mesh traffic in Istio are not applied: {}", routing.len(), routing.join("; ")),
            "mesh does not apply ServiceEntry or Sidecar: traffic to hosts a ServiceEntry adds goes out as plain connections, and a Sidecar's egress limits are not enforced. Route through Kubernetes Services instead (an ExternalName Service for an external host), or delete the object if it only served Istio sidecars; GET /config_errors lists each (not_applied)",
        ));
    }
    let first = all.first()?;
    Some(warn(
        "kinds applied",
        format!("{} object(s) of kinds mesh does not apply, e.g. {}", all.len(), line(first)),
        "Gateways, Gateway API routes, Telemetry, RequestAuthentication, EnvoyFilter, WasmPlugin, ... are for Istio's gateways and Envoy proxies: they have no effect on mesh traffic here. `mesh-node validate --strict` fails on them; GET /config_errors lists each (not_applied)",
    ))
}

pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = match c.outcome {
            Outcome::Pass => "✔",
            Outcome::Warn => "‼",
            Outcome::Fail => "✘",
        };
        out.push_str(&format!("{mark} {}: {}\n", c.name, c.detail));
        if let Some(hint) = &c.hint {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    out.push_str(&if failed == 0 { "\nStatus check results are ✔\n".to_owned() } else { format!("\n{failed} check(s) failed ✘\n") });
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn kubernetes_config_fails_the_check_while_objects_are_held_back() {
        let live = config(&json!({"source": "kubernetes", "status": "live", "generation": "00ab", "problems": [], "held_back": []}));
        assert!(live.outcome == Outcome::Pass, "{}", live.detail);
        let held = config(&json!({
            "source": "kubernetes", "status": "held-back", "generation": "00ab",
            "held_back": [{"kind": "DestinationRule", "namespace": "demo", "name": "echo",
                "message": "DestinationRule demo/echo rejected (keeping its last good version): trafficPolicy.outlierDetection.interval: \"ten\" is not a duration"}],
        }));
        assert!(held.outcome == Outcome::Fail);
        assert!(held.detail.starts_with("1 object(s) held back: DestinationRule demo/echo rejected"), "{}", held.detail);
        assert!(held.hint.as_deref().is_some_and(|h| h.contains("/config_errors")));
    }

    #[test]
    fn a_live_config_with_warnings_warns_and_held_back_objects_still_fail() {
        let line = "authz.yaml: AuthorizationPolicy demo/x: rules[0].to[0].operation.paths: not enforceable at L4";
        let w = config(&json!({"dir": "/c", "status": "in-sync", "generation": "01", "problems": [], "warnings": [line]}));
        assert!(w.outcome == Outcome::Warn, "{}", w.detail);
        assert!(w.detail.ends_with(line), "{}", w.detail);
        let held = config(&json!({"source": "kubernetes", "status": "held-back", "warnings": [line], "held_back": [{"message": "x"}]}));
        assert!(held.outcome == Outcome::Fail, "an error outranks a warning");
    }

    #[test]
    fn unapplied_kinds_warn_and_routing_kinds_fail_with_a_hint() {
        assert!(not_applied(&json!({"status": "live", "not_applied": []})).is_none(), "nothing to say");
        let gateway = json!({"kind": "Gateway", "changes_routing": false, "line": "Gateway istio-system/ingress: not applied by mesh (kind Gateway)"});
        let w = not_applied(&json!({"not_applied": [gateway.clone()]})).expect("a check");
        assert!(w.outcome == Outcome::Warn, "{}", w.detail);
        assert!(w.detail.contains("not applied by mesh (kind Gateway)"), "{}", w.detail);
        let se = json!({"kind": "ServiceEntry", "changes_routing": true, "line": "ServiceEntry demo/api: not applied by mesh (kind ServiceEntry): ..."});
        let f = not_applied(&json!({"not_applied": [gateway, se]})).expect("a check");
        assert!(f.outcome == Outcome::Fail, "{}", f.detail);
        assert!(f.detail.contains("ServiceEntry demo/api"), "{}", f.detail);
        assert!(f.hint.as_deref().is_some_and(|h| h.contains("ExternalName")), "{:?}", f.hint);
    }
}
