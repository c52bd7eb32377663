//! Trace context in HTTP headers: W3C `traceparent` (and `tracestate`, passed through), B3
//! multi-header (`x-b3-*`) and B3 single-header (`b3`), read from the request and written back
//! with the proxy's own span as the parent of the next hop.
use std::fmt::Write as _;

use http::{HeaderMap, HeaderValue};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None`: the caller deferred the decision (B3 without a sampling state).
    pub sampled: Option<bool>,
}

/// Which header formats the request carried, so the next hop gets the same ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Formats {
    pub b3_multi: bool,
    pub b3_single: bool,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out).filter(|o| o.iter().any(|b| *b != 0))
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// B3 trace ids may be 64-bit; W3C's are 128-bit, left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        32 => hex_to::<16>(s),
        16 => hex_to::<8>(s).map(|low| {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }),
        _ => None,
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn traceparent(v: &str) -> Option<SpanContext> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" {
        return None;
    }
    let trace_id = hex_to::<16>(parts.next()?)?;
    let span_id = hex_to::<8>(parts.next()?)?;
    let flags = u8::from_str_radix(parts.next()?.get(..2)?, 16).ok()?;
    Some(SpanContext { trace_id, span_id, sampled: Some(flags & 1 == 1) })
}

fn b3_sampled(v: &str) -> Option<bool> {
    match v {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_single(v: &str) -> Option<SpanContext> {
    let mut parts = v.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_to::<8>(parts.next()?)?;
    let sampled = parts.next().and_then(b3_sampled);
    Some(SpanContext { trace_id, span_id, sampled })
}

fn b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let trace_id = b3_trace_id(header(headers, "x-b3-traceid")?)?;
    let span_id = hex_to::<8>(header(headers, "x-b3-spanid")?)?;
    let debug = header(headers, "x-b3-flags") == Some("1");
    let sampled = if debug { Some(true) } else { header(headers, "x-b3-sampled").and_then(b3_sampled) };
    Some(SpanContext { trace_id, span_id, sampled })
}

/// The caller's span, preferring W3C over B3, and the formats present.
pub fn extract(headers: &HeaderMap) -> (Option<SpanContext>, Formats) {
    let formats = Formats { b3_multi: headers.contains_key("x-b3-traceid"), b3_single: headers.contains_key("b3") };
    let parent = header(headers, "traceparent")
        .and_then(traceparent)
        .or_else(|| header(headers, "b3").and_then(b3_single))
        .or_else(|| b3_multi(headers));
    (parent, formats)
}

/// Writes `ctx` as the next hop's parent, in W3C form always and in the B3 forms the request
/// came with. `parent` is the span `ctx` is a child of (for B3's parent id).
pub fn inject(headers: &mut HeaderMap, ctx: &SpanContext, parent: Option<&SpanContext>, formats: Formats) {
    let sampled = ctx.sampled.unwrap_or(false);
    let (trace, span) = (hex(&ctx.trace_id), hex(&ctx.span_id));
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    set(headers, "traceparent", format!("00-{trace}-{span}-{}", if sampled { "01" } else { "00" }));
    if formats.b3_multi {
        set(headers, "x-b3-traceid", trace.clone());
        set(headers, "x-b3-spanid", span.clone());
        set(headers, "x-b3-sampled", if sampled { "1" } else { "0" }.into());
        match parent {
            Some(p) => set(headers, "x-b3-parentspanid", hex(&p.span_id)),
            None => {
                headers.remove("x-b3-parentspanid");
            }
        }
    }
    if formats.b3_single {
        let mut v = format!("{trace}-{span}-{}", if sampled { "1" } else { "0" });
        if let Some(p) = parent {
            v.push('-');
            v.push_str(&hex(&p.span_id));
        }
        set(headers, "b3", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_w3c_and_b3() {
        let (ctx, _) = extract(&map(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]));
        let ctx = ctx.unwrap();
        assert_eq!(hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&ctx.span_id), "00f067aa0ba902b7");
        assert_eq!(ctx.sampled, Some(true));

        let (ctx, f) = extract(&map(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-sampled", "0")]));
        let ctx = ctx.unwrap();
        assert_eq!(hex(&ctx.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(ctx.sampled, Some(false));
        assert!(f.b3_multi && !f.b3_single);

        let (ctx, f) = extract(&map(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")]));
        assert_eq!(ctx.unwrap().sampled, Some(true));
        assert!(f.b3_single);

        assert_eq!(extract(&map(&[("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")])).0, None);
        assert_eq!(extract(&map(&[("traceparent", "garbage")])).0, None);
    }

    #[test]
    fn writes_the_formats_the_request_had() {
        let parent = SpanContext { trace_id: [1; 16], span_id: [2; 8], sampled: Some(true) };
        let child = SpanContext { trace_id: [1; 16], span_id: [3; 8], sampled: Some(true) };
        let mut h = map(&[("x-b3-traceid", "x"), ("b3", "x")]);
        inject(&mut h, &child, Some(&parent), Formats { b3_multi: true, b3_single: true });
        assert_eq!(h["traceparent"], "00-01010101010101010101010101010101-0303030303030303-01");
        assert_eq!(h["x-b3-spanid"], "0303030303030303");
        assert_eq!(h["x-b3-parentspanid"], "0202020202020202");
        assert_eq!(h["b3"], "01010101010101010101010101010101-0303030303030303-1-0202020202020202");
    }
}
