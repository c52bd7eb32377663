//! Plain aligned tables, kubectl style: upper-case headers, two spaces between columns.
use std::fmt::Write as _;

pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(width(cell));
                }
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: Vec<&str>| {
            let last = cells.len().saturating_sub(1);
            for (i, cell) in cells.iter().enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    let _ = write!(out, "{cell}{}", " ".repeat(widths[i] - width(cell) + 2));
                }
            }
            out.push('\n');
        };
        line(&mut out, self.headers.clone());
        for row in &self.rows {
            line(&mut out, row.iter().map(String::as_str).collect());
        }
        out
    }
}

/// A JSON value as a table cell: strings bare, null as `-`, arrays joined with commas.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
