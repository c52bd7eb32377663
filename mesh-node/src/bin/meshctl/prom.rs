//! Just enough of the Prometheus text format to read the node's Istio metrics: samples with
//! labels, no metadata.
use std::collections::BTreeMap;

pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => line.split_once(' ')?,
    };
    let (labels, rest) = if rest.starts_with('{') { parse_labels(rest)? } else { (BTreeMap::new(), rest) };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.trim().to_owned(), labels, value })
}

/// `{a="x",b="y \"q\""}` -> labels and what follows the closing brace.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices().skip(1).peekable();
    loop {
        while chars.peek().is_some_and(|(_, c)| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let (i, c) = chars.next()?;
        if c == '}' {
            return Some((labels, &s[i + 1..]));
        }
        let mut key = String::from(c);
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key.trim().to_owned(), value);
    }
}

/// Prometheus' histogram_quantile over cumulative `(le, count)` buckets: linear within the
/// bucket the rank falls in.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                // Above the last finite bound: that bound is the best answer there is.
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 { (rank - prev.1) / in_bucket } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_timestamps() {
        let s = parse("# HELP x\nistio_requests_total{reporter=\"source\",path=\"a\\\"b,c\"} 42 1700000000\nup 1\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["path"], "a\"b,c");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].name, "up");
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        let b = [(10.0, 50.0), (20.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &b), Some(10.0));
        assert_eq!(quantile(0.99, &b), Some(19.8));
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
    }
}
