//! SVG charts of the overhead benchmark: plain SVG text, so the README can show them and no
//! plotting dependency is needed.
use std::fmt::Write as _;

use serde_json::Value;

const MODES: [(&str, &str, &str); 3] = [("no_mesh", "no mesh", "#9e9e9e"), ("sidecars", "sidecars (Envoy per pod)", "#d95f02"), ("mesh", "mesh (proxy per node)", "#1b9e77")];
pub(crate) const FONT: &str = "font-family=\"Helvetica,Arial,sans-serif\"";

fn num(v: &Value) -> f64 {
    v.as_f64().filter(|x| x.is_finite()).unwrap_or(0.0)
}

pub(crate) fn header(w: u32, h: u32, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\" {FONT}>{}</text>\n",
        w / 2,
        escape(title)
    )
}

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `max`: 1, 2 or 5 times a power of ten.
pub(crate) fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|v| *v >= max).unwrap_or(10.0 * p)
}

/// Three bar groups side by side at steady load: memory as the nodes pay it (MiB), the proxies'
/// own CPU and the whole node's CPU (vCPU); one bar per mode at the median over repeats, a
/// whisker from min to max, the median written on each bar.
pub fn resource_bars(report: &Value) -> String {
    let (w, h) = (1120u32, 340u32);
    let mut s = header(w, h, "Resources at 1000 service requests/s (steady), median of repeats with min-max");
    let panels = [
        ("Memory: per-node accounting (MiB)", "steady_node_mib", 1usize),
        ("CPU: proxies' own (vCPU)", "steady_proxy_vcpu", 3usize),
        ("CPU: whole node, /proc/stat (vCPU)", "steady_node_vcpu", 3usize),
    ];
    let (top, bottom) = (60.0, 280.0);
    for (i, (title, key, digits)) in panels.iter().enumerate() {
        let x0 = 40.0 + i as f64 * 360.0;
        let stat = |m: &str, k: &str| num(&report["modes"][m]["stats"][*key][k]);
        let values: Vec<(f64, f64, f64)> = MODES.iter().map(|(m, _, _)| (stat(m, "median"), stat(m, "min"), stat(m, "max"))).collect();
        let max = nice_max(values.iter().map(|v| v.2.max(v.0)).fold(0.0, f64::max));
        let _ = writeln!(s, "<text x=\"{}\" y=\"48\" text-anchor=\"middle\" font-size=\"13\" {FONT}>{}</text>", x0 + 160.0, escape(title));
        let _ = writeln!(s, "<line x1=\"{x0}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#333\"/>", x0 + 320.0);
        for (j, ((_, label, color), (v, lo, hi))) in MODES.iter().zip(&values).enumerate() {
            let bw = 80.0;
            let x = x0 + 20.0 + j as f64 * 100.0;
            let y = |v: f64| bottom - (bottom - top) * v / max;
            let bh = bottom - y(*v);
            let _ = writeln!(s, "<rect x=\"{x}\" y=\"{:.1}\" width=\"{bw}\" height=\"{bh:.1}\" fill=\"{color}\"/>", y(*v));
            if hi > lo {
                let cx = x + bw / 2.0;
                let _ = writeln!(s, "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"#222\" stroke-width=\"1.5\"/>", y(*lo), y(*hi));
                for e in [lo, hi] {
                    let _ = writeln!(s, "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#222\" stroke-width=\"1.5\"/>", cx - 8.0, y(*e), cx + 8.0, y(*e));
                }
            }
            let label_y = y(v.max(*hi)) - 5.0;
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{label_y:.1}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>{v:.digits$}</text>", x + bw / 2.0);
            let short = label.split(" (").next().unwrap_or(label);
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>{}</text>", x + bw / 2.0, bottom + 18.0, escape(short));
        }
    }
    let procs = |m: &str| num(&report["modes"][m]["stats"]["mesh_processes"]["median"]);
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#555\" {FONT}>sidecars: {:.0} Envoy processes; mesh: {:.0} processes (2 node proxies + the CA). Memory: private memory plus each binary's shared pages once per node. Node CPU: the whole VM.</text>",
        w / 2,
        h - 12,
        procs("sidecars"),
        procs("mesh")
    );
    s.push_str("</svg>\n");
    s
}

/// End-to-end latency CDF at steady load, one line per mode (x: ms, log scale; y: quantile).
pub fn latency_cdf(report: &Value) -> String {
    let (w, h) = (760u32, 420u32);
    let mut s = header(w, h, "End-to-end latency at steady load (bff request, 7 service calls; median run, from scheduled start)");
    let (left, right, top, bottom) = (70.0, 560.0, 40.0, 370.0);
    let curves: Vec<Vec<(f64, f64)>> = MODES
        .iter()
        .map(|(m, _, _)| {
            report["modes"][m]["steady"]["cdf_ms"].as_array().map_or(Vec::new(), |a| a.iter().map(|p| (num(&p[0]), num(&p[1]).max(0.001))).collect())
        })
        .collect();
    let all: Vec<f64> = curves.iter().flatten().map(|p| p.1).collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.iter().cloned().fold(0.0, f64::max).max(lo * 10.0);
    let (lmin, lmax) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
    let x = |ms: f64| left + (right - left) * (ms.max(lmin).log10() - lmin.log10()) / (lmax.log10() - lmin.log10());
    let y = |q: f64| bottom - (bottom - top) * q;
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>", right - left, bottom - top);
    let mut decade = lmin;
    while decade <= lmax * 1.0001 {
        let xv = x(decade);
        let _ = writeln!(s, "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>");
        let _ = writeln!(s, "<text x=\"{xv:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" {FONT}>{}</text>", bottom + 16.0, trim_num(decade));
        decade *= 10.0;
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
        let yv = y(q);
        let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{yv:.1}\" x2=\"{right}\" y2=\"{yv:.1}\" stroke=\"#eee\"/>");
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" {FONT}>{q}</text>", left - 6.0, yv + 4.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>latency (ms, log scale)</text>", (left + right) / 2.0, bottom + 36.0);
    let _ = writeln!(s, "<text x=\"18\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 18 {})\" {FONT}>fraction of requests</text>", (top + bottom) / 2.0, (top + bottom) / 2.0);
    for (k, ((_, label, color), pts)) in MODES.iter().zip(&curves).enumerate() {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(q, ms)| format!("{:.1},{:.1}", x(*ms), y(*q))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\" points=\"{}\"/>", path.join(" "));
        let ly = top + 20.0 + k as f64 * 22.0;
        let _ = writeln!(s, "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"3\"/>", right + 15.0, right + 40.0);
        let p99 = report["modes"][MODES[k].0]["steady"]["p99_ms"].as_f64().unwrap_or(0.0);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" font-size=\"12\" {FONT}>{} (p99 {p99:.2} ms)</text>", right + 46.0, ly + 4.0, escape(label.split(" (").next().unwrap_or(label)));
    }
    s.push_str("</svg>\n");
    s
}

fn trim_num(v: f64) -> String {
    if v >= 1.0 { format!("{v:.0}") } else { format!("{v}") }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn charts_carry_every_mode_and_value() {
        let cdf = json!([[0.0, 1.0], [0.5, 2.0], [0.99, 5.0], [1.0, 9.0]]);
        let st = |mem: f64, proxy: f64, node: f64, n: f64| {
            json!({
                "steady_node_mib": {"median": mem, "min": mem * 0.9, "max": mem * 1.1, "n": 3},
                "steady_proxy_vcpu": {"median": proxy, "min": proxy, "max": proxy, "n": 3},
                "steady_node_vcpu": {"median": node, "min": node * 0.9, "max": node * 1.2, "n": 3},
                "mesh_processes": {"median": n, "min": n, "max": n, "n": 3},
            })
        };
        let r = json!({"modes": {
            "no_mesh": {"stats": st(0.0, 0.0, 0.9, 0.0), "steady": {"cdf_ms": cdf, "p99_ms": 5.0}},
            "sidecars": {"stats": st(512.5, 0.75, 1.5, 10.0), "steady": {"cdf_ms": cdf, "p99_ms": 7.0}},
            "mesh": {"stats": st(30.25, 0.2, 1.1, 3.0), "steady": {"cdf_ms": cdf, "p99_ms": 6.0}},
        }});
        let bars = super::resource_bars(&r);
        assert!(bars.starts_with("<svg") && bars.trim_end().ends_with("</svg>"));
        assert!(bars.contains(">512.5<") && bars.contains(">30.2<") && bars.contains(">0.750<") && bars.contains(">1.500<"), "{bars}");
        assert!(bars.contains("10 Envoy processes") && bars.contains("3 processes"));
        let cdf = super::latency_cdf(&r);
        assert_eq!(cdf.matches("<polyline").count(), 3);
        assert!(cdf.contains("p99 7.00 ms"));
    }

    #[test]
    fn nice_axis() {
        assert_eq!(super::nice_max(0.0), 1.0);
        assert_eq!(super::nice_max(430.0), 500.0);
        assert_eq!(super::nice_max(0.13), 0.2);
    }
}
