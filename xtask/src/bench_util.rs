//! What the benchmark parts share: running `mesh-probe`/`h2load` in pods and reading their
//! reports, and sampling proxy CPU time and memory from /proc.
use std::{fs, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use mesh_e2e::SimCluster;
use serde_json::{Value, json};

/// Runs `mesh-probe` in a pod and parses its one-line JSON report.
pub fn probe_json(c: &SimCluster, pod: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Value> {
    let out = c.probe(pod, args, timeout)?;
    serde_json::from_str(out.trim()).with_context(|| format!("mesh-probe {} printed no JSON: {out}", args.join(" ")))
}

/// A report's latency field (`p50_us`, ...) in milliseconds.
pub fn ms(v: &Value, key_us: &str) -> f64 {
    v[key_us].as_f64().unwrap_or(0.0) / 1000.0
}

/// 2xx answers in an `http` report.
pub fn ok_count(v: &Value) -> u64 {
    v["by_status"].as_object().map_or(0, |m| m.iter().filter(|(k, _)| k.starts_with('2')).map(|(_, n)| n.as_u64().unwrap_or(0)).sum())
}

pub fn clk_tck() -> f64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of the processes (all their threads), in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let mut ticks = 0u64;
    for pid in pids {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the command name (which may contain spaces) start at field 3 (state).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(14) + field(15);
    }
    ticks as f64 / clk_tck()
}

/// VmRSS of one process in MiB (0 if it is gone).
pub fn rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs h2load in a pod for `seconds` (after a 1 s warm-up) and returns what it measured:
/// {"ok_rps", "rps", "succeeded", "failed", "errored", "status_2xx", "seconds"}.
pub fn h2load(c: &SimCluster, pod: &str, args: &[&str], seconds: u64) -> anyhow::Result<Value> {
    let dur = format!("{seconds}s");
    let mut full: Vec<&str> = vec!["-D", &dur, "--warm-up-time", "1s"];
    full.extend_from_slice(args);
    let out = c.run_in_pod(pod, Path::new("h2load"), &full, Duration::from_secs(seconds + 60))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("h2load {} in {pod}: {}\n{text}{}", full.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    }
    parse_h2load(&text).with_context(|| format!("unexpected h2load output:\n{text}"))
}

fn parse_h2load(text: &str) -> Option<Value> {
    // "finished in 5.00s, 23456.20 req/s, 27.34MB/s"
    let finished = text.lines().find(|l| l.starts_with("finished in"))?;
    let mut parts = finished.trim_start_matches("finished in ").split(',');
    let secs = parse_duration(parts.next()?.trim())?;
    let rps: f64 = parts.next()?.trim().strip_suffix(" req/s")?.parse().ok()?;
    // "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let count = |what: &str| -> u64 {
        requests.trim_start_matches("requests:").split(',').find_map(|p| p.trim().strip_suffix(what).and_then(|n| n.trim().parse().ok())).unwrap_or(0)
    };
    let done = count(" done");
    // "status codes: N 2xx, N 3xx, N 4xx, N 5xx"
    let codes = text.lines().find(|l| l.starts_with("status codes:"))?;
    let s2xx: u64 = codes.trim_start_matches("status codes:").split(',').find_map(|p| p.trim().strip_suffix(" 2xx").and_then(|n| n.trim().parse().ok())).unwrap_or(0);
    Some(json!({
        "seconds": secs,
        "rps": rps,
        // With --warm-up-time, "finished in" includes the warm-up while the counts and req/s
        // cover only the measured window: scale h2load's own rate by the 2xx share.
        "ok_rps": if done > 0 { rps * s2xx as f64 / done as f64 } else { s2xx as f64 / secs.max(1e-9) },
        "succeeded": count(" succeeded"),
        "failed": count(" failed"),
        "errored": count(" errored"),
        "status_2xx": s2xx,
    }))
}

fn parse_duration(s: &str) -> Option<f64> {
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(v) = s.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1e6);
    }
    s.strip_suffix('s')?.parse().ok()
}

/// Runs `f` with the Envoy binary (installed if missing) and a scratch directory for its
/// configs and certificates, removed afterwards whether `f` succeeded or not.
pub fn with_envoy_workdir<T>(name: &str, f: impl FnOnce(&Path, &Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let envoy = crate::setup::envoy()?;
    let work = std::env::temp_dir().join(format!("mesh-bench-{name}-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = f(&envoy, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

/// A path as the `&str` a command line takes (the benches' temp paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

pub fn write_json(path: &Path, report: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_h2load() {
        let text = "finished in 5.00s, 23456.20 req/s, 27.34MB/s\nrequests: 117281 total, 117281 started, 117281 done, 117280 succeeded, 1 failed, 0 errored, 0 timeout\nstatus codes: 117280 2xx, 0 3xx, 0 4xx, 1 5xx\n";
        let v = super::parse_h2load(text).unwrap();
        assert_eq!(v["succeeded"], 117280);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["status_2xx"], 117280);
        assert!((v["ok_rps"].as_f64().unwrap() - 23456.0).abs() < 1.0);
    }

    #[test]
    fn ok_rps_excludes_the_warm_up() {
        // -D 5s --warm-up-time 1s: "finished in" counts the warm-up second, the counts do not.
        let text = "finished in 6.03s, 15653.60 req/s, 17.62MB/s\nrequests: 78268 total, 78284 started, 78268 done, 78268 succeeded, 0 failed, 0 errored, 0 timeout\nstatus codes: 78268 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let v = super::parse_h2load(text).unwrap();
        assert!((v["ok_rps"].as_f64().unwrap() - 15653.6).abs() < 0.5);
    }
}

/// The users' policies for one Service (the seed's DestinationRule and VirtualService): outlier
/// detection 5 errors / 5s / 30s / 50% with Istio's default balancer made explicit, and retries
/// 2 x 1s on 5xx,reset,connect-failure. Used by every bench that applies "the policies".
pub fn seed_policies(host: &str, namespace: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {host}
  namespace: {namespace}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 5s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {host}
  namespace: {namespace}
spec:
  hosts: [{host}]
  http:
  - retries:
      attempts: 2
      retryOn: 5xx,reset,connect-failure
      perTryTimeout: 1s
    route:
    - destination: {{host: {host}}}
---
"#
    )
}
