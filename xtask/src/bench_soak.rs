//! `cargo xtask bench scale --soak-minutes N`: the seed's services and load (the overhead bench's
//! cluster: seven services on two nodes, the seed's policies, 1000 service requests a second) for
//! N minutes, one minute at a time. Per minute: each node proxy's RSS and PSS and open
//! descriptors at the minute's end, and the minute's p99 and success rate. Verdict: flat when
//! the least-squares slope of each proxy's RSS over the last two thirds of the minutes stays
//! under [`SLOPE_MAX_MIB_PER_MIN`] (and the descriptors do not grow by more than
//! [`FD_GROWTH_MAX`]).
use std::{fmt::Write as _, path::Path, time::Instant};

use mesh_e2e::SimCluster;
use serde_json::{Value, json};

use crate::{
    bench_abuse::node_proxy_pid,
    bench_account::proc_mem,
    bench_overhead::{self, APP_PORT, FANOUT, Mode, SERVICE_RPS},
    bench_scale::fds,
    bench_scale_chart::{COLORS, Chart, Series, line_chart},
    bench_util::{ms, ok_count, write_json},
};

/// 0.1 MiB a minute is 6 MiB an hour.
pub const SLOPE_MAX_MIB_PER_MIN: f64 = 0.1;
pub const FD_GROWTH_MAX: f64 = 16.0;

pub fn run(minutes: u64) -> anyhow::Result<Value> {
    eprintln!("bench scale: soak, the seed's services at {SERVICE_RPS} service rps for {minutes} min...");
    let c = SimCluster::start(bench_overhead::spec(Mode::Mesh))?;
    bench_overhead::start_apps(&c, Mode::Mesh)?;
    c.apply_config("policies.yaml", &bench_overhead::policies())?;
    let pids: Vec<u32> = (0..2).filter_map(|i| node_proxy_pid(&c, i)).collect();
    anyhow::ensure!(pids.len() == 2, "both node proxies should run");
    let url = format!("http://{}:{APP_PORT}/", c.pod("bff").ip);
    let rate = SERVICE_RPS / FANOUT;
    bench_overhead::load(&c, &url, rate, 2, &[])?;
    let started = Instant::now();
    let mut rows = Vec::new();
    for minute in 1..=minutes {
        let r = bench_overhead::load(&c, &url, rate, 60, &[])?;
        let requests = r["requests"].as_u64().unwrap_or(0);
        let mem: Vec<Value> = pids
            .iter()
            .map(|p| {
                let m = proc_mem(*p).unwrap_or_default();
                json!({"rss_mib": m.rss_kib as f64 / 1024.0, "pss_mib": m.pss_kib as f64 / 1024.0})
            })
            .collect();
        let row = json!({
            "minute": minute, "elapsed_s": started.elapsed().as_secs_f64(),
            "memory": mem, "fds": pids.iter().map(|p| fds(*p)).collect::<Vec<_>>(),
            "p99_ms": ms(&r, "p99_us"), "p50_ms": ms(&r, "p50_us"),
            "requests": requests, "success_rate": ok_count(&r) as f64 / requests.max(1) as f64, "late_starts": r["late_starts"],
        });
        eprintln!("  minute {minute}: {row}");
        rows.push(row);
    }
    Ok(verdict(rows, minutes))
}

/// `cargo xtask bench soak`: the soak without the rest of `scale`, printed and written to
/// `soak.json` and `scale-soak.svg` (the chart the README shows).
pub fn run_alone(out_dir: &Path, minutes: u64) -> anyhow::Result<()> {
    let soak = run(minutes)?;
    print_table(&soak);
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("scale-soak.svg"), chart(&soak))?;
    write_json(&out_dir.join("soak.json"), &soak)
}

/// Least-squares slope of y over x.
pub fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { f64::NAN } else { sxy / sxx }
}

fn verdict(rows: Vec<Value>, minutes: u64) -> Value {
    // The last two thirds: the first third is warm-up (pools, caches, allocator arenas).
    let skip = rows.len() / 3;
    let tail = &rows[skip..];
    let series = |node: usize, key: &str| -> Vec<(f64, f64)> { tail.iter().map(|r| (r["minute"].as_f64().unwrap_or(0.0), r["memory"][node][key].as_f64().unwrap_or(0.0))).collect() };
    let slopes: Vec<f64> = (0..2).map(|i| slope(&series(i, "rss_mib"))).collect();
    let fd_growth: Vec<f64> = (0..2)
        .map(|i| {
            let f = |r: Option<&Value>| r.and_then(|r| r["fds"][i].as_f64()).unwrap_or(0.0);
            f(tail.last()) - f(tail.first())
        })
        .collect();
    let flat = slopes.iter().all(|s| s.is_finite() && s.abs() <= SLOPE_MAX_MIB_PER_MIN) && fd_growth.iter().all(|g| *g <= FD_GROWTH_MAX);
    json!({
        "minutes": minutes, "service_rps": SERVICE_RPS, "rows": rows,
        "window_minutes": tail.iter().filter_map(|r| r["minute"].as_u64()).collect::<Vec<_>>(),
        "rss_slope_mib_per_min": slopes, "fd_growth": fd_growth,
        "slope_max_mib_per_min": SLOPE_MAX_MIB_PER_MIN, "fd_growth_max": FD_GROWTH_MAX, "flat": flat,
    })
}

pub fn print_table(s: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("\nscale: soak, the seed's 7 services at {} service rps for {} min (per minute, at its end)", s["service_rps"], s["minutes"]);
    println!("{:>6} {:>19} {:>19} {:>11} {:>9} {:>9}", "minute", "node-a RSS/PSS MiB", "node-b RSS/PSS MiB", "fds a / b", "p99 ms", "success");
    for r in s["rows"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:>9.1}/{:<9.1} {:>9.1}/{:<9.1} {:>5}/{:<5} {:>9.2} {:>8.3}%",
            r["minute"].as_u64().unwrap_or(0),
            f(&r["memory"][0]["rss_mib"]),
            f(&r["memory"][0]["pss_mib"]),
            f(&r["memory"][1]["rss_mib"]),
            f(&r["memory"][1]["pss_mib"]),
            r["fds"][0].as_u64().unwrap_or(0),
            r["fds"][1].as_u64().unwrap_or(0),
            f(&r["p99_ms"]),
            f(&r["success_rate"]) * 100.0
        );
    }
    let mut line = String::new();
    for (i, n) in ["a", "b"].iter().enumerate() {
        let _ = write!(line, "node-{n} {:+.3} MiB/min, fds {:+.0}; ", f(&s["rss_slope_mib_per_min"][i]), f(&s["fd_growth"][i]));
    }
    println!(
        "RSS slope over minutes {:?}: {line}flat (|slope| <= {SLOPE_MAX_MIB_PER_MIN} MiB/min, fds +{FD_GROWTH_MAX} at most): {}",
        s["window_minutes"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).unwrap_or_default(),
        if s["flat"].as_bool().unwrap_or(false) { "FLAT" } else { "NOT FLAT" }
    );
}

pub fn chart(s: &Value) -> String {
    let rows = s["rows"].as_array().cloned().unwrap_or_default();
    let pts = |f: &dyn Fn(&Value) -> f64| rows.iter().map(|r| (r["minute"].as_f64().unwrap_or(0.0), f(r))).collect::<Vec<_>>();
    let series = vec![
        Series { label: "node-a RSS MiB".into(), color: COLORS[0], points: pts(&|r| r["memory"][0]["rss_mib"].as_f64().unwrap_or(f64::NAN)) },
        Series { label: "node-b RSS MiB".into(), color: COLORS[2], points: pts(&|r| r["memory"][1]["rss_mib"].as_f64().unwrap_or(f64::NAN)) },
        Series { label: "p99 ms".into(), color: COLORS[1], points: pts(&|r| r["p99_ms"].as_f64().unwrap_or(f64::NAN)) },
        Series { label: "fds node-a / 10".into(), color: COLORS[3], points: pts(&|r| r["fds"][0].as_f64().unwrap_or(f64::NAN) / 10.0) },
    ];
    let note = format!(
        "The seed's 7 services, 1000 service rps. RSS slope over the last 2/3: {:+.3} / {:+.3} MiB/min (flat: <= {SLOPE_MAX_MIB_PER_MIN})",
        s["rss_slope_mib_per_min"][0].as_f64().unwrap_or(f64::NAN),
        s["rss_slope_mib_per_min"][1].as_f64().unwrap_or(f64::NAN)
    );
    line_chart(&Chart { title: "Soak: node proxies' RSS, descriptors and p99 per minute", x_label: "minute", y_label: "MiB / ms / fds÷10", log_x: false, note: &note }, &series)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn slope_and_verdict() {
        assert!((super::slope(&[(1.0, 10.0), (2.0, 10.5), (3.0, 11.0)]) - 0.5).abs() < 1e-9);
        assert!(super::slope(&[(1.0, 1.0)]).is_nan());
        let row = |m: u64, rss: f64| json!({"minute": m, "memory": [{"rss_mib": rss}, {"rss_mib": 20.0}], "fds": [40, 40]});
        let flat = super::verdict((1..=6).map(|m| row(m, 30.0 + if m == 1 { 5.0 } else { 0.01 * m as f64 })).collect(), 6);
        assert_eq!(flat["flat"], true, "{flat}");
        let growing = super::verdict((1..=6).map(|m| row(m, 30.0 + m as f64)).collect(), 6);
        assert_eq!(growing["flat"], false);
    }
}
