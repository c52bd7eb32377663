//! HTTP plumbing of the admin API: bodies, JSON and error replies, query strings.
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

pub fn respond(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = code;
    res
}

pub fn json(v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    let mut res = respond(StatusCode::OK, body);
    res.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    res
}

/// `{"error": ...}` so clients can always parse the body.
pub fn error(code: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let mut res = json(serde_json::json!({"error": message.into()}));
    *res.status_mut() = code;
    res
}

/// The percent-decoded value of `name` in a query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(query_param("service=demo%2Fweb&x=1", "service").as_deref(), Some("demo/web"));
        assert_eq!(query_param("level=mesh_node%3Ddebug%2Cinfo", "level").as_deref(), Some("mesh_node=debug,info"));
        assert_eq!(query_param("a=%zz", "a").as_deref(), Some("%zz"));
        assert_eq!(query_param("a=1", "b"), None);
    }
}
