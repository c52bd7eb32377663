//! `/config_errors`: the objects Kubernetes discovery holds back (invalid, so the model is
//! built with their last good version or without them), each with its problems and since
//! when. Without this they are only in the log, and an edit that "did nothing" looks like a
//! proxy bug.
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::discovery::{HeldBack, HeldBackView};

/// Source `files`: file mode rejects a whole directory change instead (see `/config_status`).
pub fn config_errors(view: Option<&HeldBackView>, now: SystemTime) -> Value {
    let Some(view) = view else {
        return json!({
            "source": "files",
            "held_back": [],
            "note": "file mode applies a directory change whole or not at all: see /config_status",
        });
    };
    let held_back = view.current();
    json!({
        "source": "kubernetes",
        "rejections_total": view.rejections_total(),
        "held_back": held_back.iter().map(|h| object(h, now)).collect::<Vec<_>>(),
    })
}

/// The live config's warnings: objects applied in a more restrictive reading than written
/// (an AuthorizationPolicy rule with HTTP attributes), in both modes.
pub fn warnings(cluster: &crate::config::Cluster) -> Value {
    cluster
        .warnings()
        .iter()
        .map(|p| json!({"object": p.object, "field": p.field, "message": p.message, "line": p.to_string()}))
        .collect()
}

/// The live config's objects of kinds the mesh does not apply, in both modes: each is
/// "not applied by mesh (kind X)"; `changes_routing` ones (ServiceEntry, Sidecar) route mesh
/// traffic in Istio, so traffic here goes otherwise.
pub fn not_applied(cluster: &crate::config::Cluster) -> Value {
    cluster
        .unapplied()
        .iter()
        .map(|u| {
            json!({
                "kind": u.kind, "api_version": u.api_version,
                "namespace": (!u.namespace.is_empty()).then_some(u.namespace.as_str()), "name": u.name,
                "changes_routing": u.changes_routing, "message": u.message(), "line": format!("{}: {}", u.object(), u.message()),
            })
        })
        .collect()
}

fn object(h: &HeldBack, now: SystemTime) -> Value {
    let r = &h.rejected;
    // `Kind namespace/name`, or `Kind name` for cluster-scoped kinds.
    let (kind, name) = r.object.split_once(' ').unwrap_or(("", r.object.as_str()));
    let (namespace, name) = match name.split_once('/') {
        Some((ns, n)) => (Some(ns), n),
        None => (None, name),
    };
    json!({
        "kind": kind,
        "namespace": namespace,
        "name": name,
        "outcome": if r.kept_previous { "kept-previous" } else if r.fail_closed { "fail-closed" } else { "left-out" },
        "problems": r.problems.iter().map(|p| json!({"field": p.field, "message": p.message})).collect::<Vec<_>>(),
        "since_unix": h.since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs(),
        "seconds_ago": now.duration_since(h.since).unwrap_or(Duration::ZERO).as_secs(),
        "message": r.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Problem, RejectedObject};

    fn problem(field: Option<&str>, message: &str) -> Problem {
        Problem { file: String::new(), location: None, object: None, field: field.map(Into::into), message: message.into() }
    }

    #[test]
    fn held_back_objects_are_listed_with_kind_name_field_and_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let view = HeldBackView::fixed(
            vec![
                HeldBack {
                    rejected: RejectedObject {
                        object: "DestinationRule demo/echo".into(),
                        problems: vec![problem(Some("trafficPolicy.outlierDetection.interval"), "\"ten\" is not a duration")],
                        kept_previous: true,
                        fail_closed: false,
                    },
                    since: now - Duration::from_secs(90),
                },
                HeldBack {
                    rejected: RejectedObject { object: "Node node-x".into(), problems: vec![problem(None, "no InternalIP")], kept_previous: false, fail_closed: false },
                    since: now,
                },
            ],
            3,
        );
        let v = config_errors(Some(&view), now);
        assert_eq!(v["source"], "kubernetes");
        assert_eq!(v["rejections_total"], 3);
        let list = v["held_back"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{v:#}");
        let dr = &list[0];
        assert_eq!((dr["kind"].as_str(), dr["namespace"].as_str(), dr["name"].as_str()), (Some("DestinationRule"), Some("demo"), Some("echo")));
        assert_eq!(dr["outcome"], "kept-previous");
        assert_eq!(dr["problems"][0]["field"], "trafficPolicy.outlierDetection.interval");
        assert_eq!(dr["problems"][0]["message"], "\"ten\" is not a duration");
        assert_eq!(dr["seconds_ago"], 90);
        assert_eq!(dr["since_unix"], 1_000_000 - 90);
        let node = &list[1];
        assert_eq!((node["kind"].as_str(), node["namespace"].as_str(), node["name"].as_str()), (Some("Node"), None, Some("node-x")));
        assert_eq!(node["outcome"], "left-out");
        assert_eq!(node["problems"][0]["field"], Value::Null);
    }

    #[test]
    fn file_mode_has_nothing_held_back() {
        let v = config_errors(None, SystemTime::now());
        assert_eq!(v["source"], "files");
        assert_eq!(v["held_back"], json!([]));
    }
}
