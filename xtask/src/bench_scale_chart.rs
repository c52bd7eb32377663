//! Line charts for `bench scale`: one or more series of (x, y) points on shared axes, x linear or
//! log scale. Plain SVG text, like the overhead bench's charts.
use std::fmt::Write as _;

use crate::bench_chart::{FONT, escape, header, nice_max};

pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub log_x: bool,
    pub note: &'a str,
}

pub const COLORS: [&str; 4] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];

pub fn line_chart(c: &Chart, series: &[Series]) -> String {
    let (w, h) = (760u32, 400u32);
    let mut s = header(w, h, c.title);
    let (left, right, top, bottom) = (70.0, 540.0, 40.0, 330.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    let ymax = nice_max(pts.iter().map(|p| p.1).fold(0.0, f64::max));
    let (xmin, xmax) = if c.log_x {
        let lo = pts.iter().map(|p| p.0).filter(|x| *x > 0.0).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.0).fold(1.0, f64::max);
        let lo = if lo.is_finite() { 10f64.powf(lo.log10().floor()) } else { 1.0 };
        (lo, 10f64.powf(hi.log10().ceil()).max(lo * 10.0))
    } else {
        (pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).min(0.0), nice_max(pts.iter().map(|p| p.0).fold(0.0, f64::max)))
    };
    let x = |v: f64| {
        if c.log_x {
            left + (right - left) * (v.max(xmin).log10() - xmin.log10()) / (xmax.log10() - xmin.log10())
        } else {
            left + (right - left) * (v - xmin) / (xmax - xmin).max(1e-9)
        }
    };
    let y = |v: f64| bottom - (bottom - top) * v / ymax;
    let _ = writeln!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>", right - left, bottom - top);
    let ticks: Vec<f64> = if c.log_x {
        std::iter::successors(Some(xmin), |t| Some(t * 10.0)).take_while(|t| *t <= xmax * 1.0001).collect()
    } else {
        (0..=5).map(|i| xmin + (xmax - xmin) * i as f64 / 5.0).collect()
    };
    for t in ticks {
        let xv = x(t);
        let _ = writeln!(s, "<line x1=\"{xv:.1}\" y1=\"{top}\" x2=\"{xv:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/>");
        let _ = writeln!(s, "<text x=\"{xv:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" {FONT}>{}</text>", bottom + 16.0, short(t));
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let yv = y(v);
        let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{yv:.1}\" x2=\"{right}\" y2=\"{yv:.1}\" stroke=\"#eee\"/>");
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" {FONT}>{}</text>", left - 6.0, yv + 4.0, short(v));
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>{}</text>", (left + right) / 2.0, bottom + 34.0, escape(c.x_label));
    let mid = (top + bottom) / 2.0;
    let _ = writeln!(s, "<text x=\"18\" y=\"{mid}\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 18 {mid})\" {FONT}>{}</text>", escape(c.y_label));
    for (k, se) in series.iter().enumerate() {
        let p: Vec<String> = se.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2.5\" points=\"{}\"/>", se.color, p.join(" "));
        for xy in &p {
            let (a, b) = xy.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, "<circle cx=\"{a}\" cy=\"{b}\" r=\"3.5\" fill=\"{}\"/>", se.color);
        }
        let ly = top + 16.0 + k as f64 * 22.0;
        let _ = writeln!(s, "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/>", right + 12.0, right + 36.0, se.color);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" font-size=\"12\" {FONT}>{}</text>", right + 42.0, ly + 4.0, escape(&se.label));
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#555\" {FONT}>{}</text>", w / 2, h - 12, escape(c.note));
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series() {
        let c = Chart { title: "t", x_label: "pods", y_label: "MiB", log_x: true, note: "n" };
        let s = [
            Series { label: "rss".into(), color: COLORS[0], points: vec![(10.0, 20.0), (100.0, 22.0), (5000.0, 60.0)] },
            Series { label: "pss".into(), color: COLORS[1], points: vec![(10.0, 10.0), (5000.0, 40.0)] },
        ];
        let svg = line_chart(&c, &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">10k<") && svg.contains(">rss<"));
    }
}
