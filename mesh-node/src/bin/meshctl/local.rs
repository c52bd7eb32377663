//! Commands that need no daemon.
use std::{path::Path, process::ExitCode};

use mesh_node::config::Cluster;
use serde_json::json;

use crate::Format;

/// `config validate DIR`: the same checks the daemon applies before a config goes live.
pub fn validate(dir: &Path, format: Format) -> anyhow::Result<ExitCode> {
    let (doc, ok) = match Cluster::load_dir(dir) {
        Ok(c) => (
            json!({"dir": dir, "valid": true, "nodes": c.nodes().count(), "pods": c.pods().count(), "services": c.services().count(), "problems": [],
                "warnings": c.warnings().iter().map(ToString::to_string).collect::<Vec<_>>()}),
            true,
        ),
        Err(e) => (json!({"dir": dir, "valid": false, "problems": e.problems()}), false),
    };
    match format {
        Format::Table if ok => {
            // Applied, but more restrictively than written: said, without failing.
            for w in doc["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", w.as_str().unwrap_or_default());
            }
            println!("{}: ok ({} nodes, {} pods, {} services)", dir.display(), doc["nodes"], doc["pods"], doc["services"]);
        }
        Format::Table => {
            let problems = doc["problems"].as_array().cloned().unwrap_or_default();
            eprintln!("{}: {} problem(s):", dir.display(), problems.len());
            for p in problems {
                eprintln!("  {}", p.as_str().unwrap_or_default());
            }
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&doc)?),
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
