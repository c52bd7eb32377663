//! gRPC as Envoy's router sees it: which requests are gRPC, the `grpc-status` of a response, and
//! the HTTP status that status stands for when outlier detection judges the host.
use http::{HeaderMap, header};

pub const CANCELLED: u8 = 1;
pub const DEADLINE_EXCEEDED: u8 = 4;
pub const RESOURCE_EXHAUSTED: u8 = 8;
pub const INTERNAL: u8 = 13;
pub const UNAVAILABLE: u8 = 14;

/// Envoy's `grpc_request_`: the request's content type is `application/grpc[+proto|;...]`.
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-status` in response headers or trailers. A value that is not a known code reads as
/// `u8::MAX` (Envoy's `InvalidCode`, which it maps to 500).
pub fn status(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get("grpc-status")?;
    Some(std::str::from_utf8(v.as_bytes()).ok().and_then(|s| s.trim().parse::<u8>().ok()).filter(|c| *c <= 16).unwrap_or(u8::MAX))
}

/// Envoy's `Grpc::Utility::grpcToHttpStatus` (after Google's API error mapping): the HTTP status
/// outlier detection counts for a gRPC response.
pub fn to_http_status(code: u8) -> u16 {
    match code {
        0 => 200, // OK
        1 => 499, // CANCELLED: client closed request
        2 => 500, // UNKNOWN
        3 => 400, // INVALID_ARGUMENT
        4 => 504, // DEADLINE_EXCEEDED
        5 => 404, // NOT_FOUND
        6 => 409, // ALREADY_EXISTS
        7 => 403, // PERMISSION_DENIED
        8 => 429, // RESOURCE_EXHAUSTED
        9 => 400, // FAILED_PRECONDITION
        10 => 409, // ABORTED
        11 => 400, // OUT_OF_RANGE
        12 => 501, // UNIMPLEMENTED
        13 => 500, // INTERNAL
        14 => 503, // UNAVAILABLE
        15 => 500, // DATA_LOSS
        16 => 401, // UNAUTHENTICATED
        _ => 500, // an invalid code
    }
}

/// What outlier detection is told about a response when its headers arrive: the HTTP status,
/// or for a gRPC request the status its `grpc-status` maps to (a trailers-only response, which is
/// how servers answer an immediate error). `None`: a gRPC response that started without a
/// status; its trailers decide (see [`after_trailers`]).
pub fn outlier_status_at_headers(grpc_request: bool, status: u16, headers: &HeaderMap, end_stream: bool) -> Option<u16> {
    if !grpc_request {
        return Some(status);
    }
    match self::status(headers) {
        Some(code) => Some(to_http_status(code)),
        // Envoy defers judging a non-5xx gRPC response without a status to its trailers.
        None if status < 500 && !end_stream => None,
        None => Some(status),
    }
}

/// The status a deferred gRPC response is judged by once its trailers arrive: the mapped
/// `grpc-status`, or the headers' status when the trailers carry none.
pub fn after_trailers(header_status: u16, trailers: &HeaderMap) -> u16 {
    self::status(trailers).map_or(header_status, to_http_status)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn envoy_grpc_to_http_table() {
        let expected = [200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401];
        for (code, http) in expected.iter().enumerate() {
            assert_eq!(to_http_status(code as u8), *http, "grpc-status {code}");
        }
        assert_eq!(to_http_status(17), 500);
        assert_eq!(to_http_status(u8::MAX), 500);
    }

    #[test]
    fn grpc_status_parsing() {
        assert_eq!(status(&headers(&[("grpc-status", "14")])), Some(UNAVAILABLE));
        assert_eq!(status(&headers(&[("grpc-status", "0")])), Some(0));
        assert_eq!(status(&headers(&[("grpc-status", "99")])), Some(u8::MAX));
        assert_eq!(status(&headers(&[("grpc-status", "oops")])), Some(u8::MAX));
        assert_eq!(status(&headers(&[])), None);
    }

    #[test]
    fn only_grpc_requests_are_mapped() {
        assert!(is_grpc_request(&headers(&[("content-type", "application/grpc")])));
        assert!(is_grpc_request(&headers(&[("content-type", "application/grpc+proto")])));
        assert!(!is_grpc_request(&headers(&[("content-type", "application/json")])));
        let internal = headers(&[("grpc-status", "13")]);
        // Trailers-only INTERNAL: a 500 for outlier detection, whatever the HTTP status says.
        assert_eq!(outlier_status_at_headers(true, 200, &internal, true), Some(500));
        assert_eq!(outlier_status_at_headers(true, 200, &headers(&[("grpc-status", "14")]), true), Some(503));
        assert_eq!(outlier_status_at_headers(true, 200, &headers(&[("grpc-status", "0")]), true), Some(200));
        // Not a gRPC request: its HTTP status, as Envoy.
        assert_eq!(outlier_status_at_headers(false, 200, &internal, true), Some(200));
        // A streamed gRPC response: judged by its trailers.
        assert_eq!(outlier_status_at_headers(true, 200, &headers(&[]), false), None);
        assert_eq!(after_trailers(200, &internal), 500);
        assert_eq!(after_trailers(200, &headers(&[("grpc-status", "4")])), 504);
        assert_eq!(after_trailers(200, &headers(&[])), 200);
        // An HTTP error from a gRPC server or a proxy in between: judged as sent.
        assert_eq!(outlier_status_at_headers(true, 503, &headers(&[]), false), Some(503));
        assert_eq!(outlier_status_at_headers(true, 200, &headers(&[]), true), Some(200));
    }
}
