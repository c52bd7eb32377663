//! Header rules: VirtualService `headers` operations and the hop-by-hop headers a proxy must
//! not forward.
use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::HeaderOperations;

/// Applies Istio's `set` (replace), `add` (append) and `remove` operations.
pub fn apply(ops: &HeaderOperations, headers: &mut HeaderMap) {
    for (name, value) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) {
            headers.append(n, v);
        }
    }
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
}

/// Removes connection-specific headers (RFC 9110 7.6.1), keeping an upgrade's own headers when
/// the request or response is an upgrade being passed through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    // Names made once (not parsed from strings on every request and response).
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    for name in [KEEP_ALIVE, PROXY_CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
}

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_add_remove_as_istio() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        let ops = HeaderOperations {
            set: [("x-a".to_string(), "2".to_string())].into(),
            add: [("x-b".to_string(), "3".to_string()), ("x-a".to_string(), "4".to_string())].into(),
            remove: vec!["x-gone".into()],
        };
        apply(&ops, &mut h);
        let a: Vec<_> = h.get_all("x-a").iter().collect();
        assert_eq!(a, ["2", "4"]);
        assert_eq!(h["x-b"], "3");
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_unless_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-private, upgrade".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        let mut upgrade = h.clone();
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("connection") && !h.contains_key("x-private") && !h.contains_key("upgrade"));
        assert_eq!(h["te"], "trailers");
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade["upgrade"], "websocket");
        assert!(upgrade.contains_key("connection"));
    }
}
