//! The live view: what the bff clients saw in the last second (calls/s, failures, p99, which
//! recall pod answered) and what the node proxies use. On a terminal it is a few lines under
//! the narration, redrawn in place; otherwise one plain line per client and second.
use std::{
    io::{IsTerminal as _, Write as _},
    time::Instant,
};

use super::{
    load::{Load, Window},
    resources::Sampler,
    topology::RECALL,
};

pub struct View {
    tty: bool,
    /// Lines of the live area on screen now (tty only).
    drawn: usize,
    last_draw: Option<Instant>,
    /// Per client: the time of the last window printed (plain output).
    printed: Vec<(String, Instant)>,
}

impl View {
    pub fn new() -> Self {
        Self { tty: std::io::stdout().is_terminal(), drawn: 0, last_draw: None, printed: Vec::new() }
    }

    /// Narration: printed above the live area (which is redrawn below it at the next frame).
    pub fn say(&mut self, text: &str) {
        self.clear();
        println!("{text}");
    }

    /// Removes the live area from the screen.
    pub fn clear(&mut self) {
        if self.tty && self.drawn > 0 {
            print!("\x1b[{}A\x1b[J", self.drawn);
            let _ = std::io::stdout().flush();
            self.drawn = 0;
        }
    }

    pub fn frame(&mut self, t: f64, loads: &[&Load], sampler: &Sampler) {
        if self.tty {
            if self.last_draw.is_some_and(|at| at.elapsed().as_millis() < 250) {
                return;
            }
            let mut lines = vec![format!("── live, t={t:>3.0}s ─────────────────────────────────────────────────────────")];
            for load in loads {
                let (calls, pods) = client_lines(load, load.latest().as_ref());
                lines.extend([calls, format!("   {pods}")]);
            }
            lines.push(sampler.line());
            self.clear();
            // A line wider than the terminal would wrap, and the redraw would miscount lines.
            let width = terminal_width().saturating_sub(1).max(20);
            for l in &lines {
                println!("{}", l.chars().take(width).collect::<String>());
            }
            let _ = std::io::stdout().flush();
            self.drawn = lines.len();
            self.last_draw = Some(Instant::now());
            return;
        }
        for load in loads {
            let Some(w) = load.latest() else { continue };
            let Some(at) = w.at else { continue };
            match self.printed.iter_mut().find(|(l, _)| *l == load.label) {
                Some((_, seen)) if *seen == at => continue,
                Some((_, seen)) => *seen = at,
                None => self.printed.push((load.label.clone(), at)),
            }
            println!("  [{t:>3.0}s] {}", client_line(load, Some(&w)));
        }
    }
}

/// Columns of the terminal on stdout (80 when it cannot be told).
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize it is given.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 { ws.ws_col as usize } else { 80 }
}

/// `bff-0 (seed routes)   80 calls/s  failed   0  p99   31.2 ms` and
/// `recall-0 v1  31%  recall-1 v1  33%  recall-2 v2  10%  recall-3 v1  26%`: who answered.
fn client_lines(load: &Load, w: Option<&Window>) -> (String, String) {
    let Some(w) = w else { return (format!("{:<28} (starting)", load.label), String::new()) };
    let answered: u64 = w.by_pod.values().sum();
    let pods: Vec<String> = RECALL
        .iter()
        .map(|(pod, _, v)| {
            let pct = if answered == 0 { 0.0 } else { w.pod(pod) as f64 * 100.0 / answered as f64 };
            format!("{pod} {v} {pct:>3.0}%")
        })
        .collect();
    (format!("{:<28} {:>4} calls/s  failed {:>3}  p99 {:>6.1} ms", load.label, w.calls, w.failed, w.p99_ms), pods.join("  "))
}

/// Both on one line, for plain output.
fn client_line(load: &Load, w: Option<&Window>) -> String {
    let (calls, pods) = client_lines(load, w);
    format!("{calls} | {pods}")
}
