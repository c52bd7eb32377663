//! Which protocol a Service port speaks, chosen as Istio does: `appProtocol`, else the port
//! name's prefix (`http`, `http2`, `grpc`, `tcp`, ...), else sniffed from the first bytes.
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ServicePort;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2 or gRPC: proxied per request.
    Http,
    /// Opaque bytes: proxied per connection.
    Tcp,
    /// Unnamed or unknown: sniff the first bytes.
    Detect,
}

/// How long to wait for a client's first bytes before treating the connection as TCP (so
/// server-first protocols still work).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

pub fn for_port(port: &ServicePort) -> Protocol {
    if let Some(app) = &port.app_protocol {
        return by_name(app.strip_prefix("kubernetes.io/").unwrap_or(app));
    }
    match &port.name {
        Some(name) => by_name(name.split('-').next().unwrap_or(name)),
        None => Protocol::Detect,
    }
}

fn by_name(name: &str) -> Protocol {
    match name.to_ascii_lowercase().as_str() {
        "http" | "http2" | "grpc" | "grpc-web" | "h2c" | "ws" => Protocol::Http,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" | "wss" => Protocol::Tcp,
        _ => Protocol::Detect,
    }
}

const METHODS: &[&[u8]] = &[b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ", b"PRI "];

/// What the first bytes of a connection say: `Some(Http)` for an HTTP/1.x request line or the
/// HTTP/2 preface, `Some(Tcp)` for anything else, `None` while `seen` is a prefix of a method
/// (more bytes needed). Empty input is TCP.
pub fn classify(seen: &[u8]) -> Option<Protocol> {
    if seen.is_empty() {
        return Some(Protocol::Tcp);
    }
    if METHODS.iter().any(|m| seen.starts_with(m)) {
        return Some(Protocol::Http);
    }
    if !METHODS.iter().any(|m| m.starts_with(seen)) {
        return Some(Protocol::Tcp);
    }
    None
}

/// What a connection turned out to carry, as far as the proxy handles it differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http1,
    /// Prior-knowledge HTTP/2 (the preface first), as gRPC clients speak it.
    Http2,
    Tcp,
}

/// What a connection to a port of `protocol` carries, from its first bytes (looked at, never
/// taken): an HTTP port's preface tells HTTP/2 from HTTP/1.x, an unnamed port is sniffed, and a
/// TCP port is not looked at.
pub async fn wire(stream: &TcpStream, protocol: Protocol, timeout: Duration) -> Wire {
    match protocol {
        Protocol::Tcp => Wire::Tcp,
        Protocol::Detect => sniff(stream, timeout).await,
        Protocol::Http if is_http2_preface(stream, timeout).await => Wire::Http2,
        Protocol::Http => Wire::Http1,
    }
}

/// Looks at the first bytes without consuming them: an HTTP/1.x request line or the HTTP/2
/// connection preface means HTTP.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Wire {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 16];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Wire::Tcp,
        };
        if n == 0 {
            return Wire::Tcp;
        }
        match classify(&buf[..n]) {
            Some(Protocol::Http) if buf[..n].starts_with(b"PRI ") => return Wire::Http2,
            Some(Protocol::Http) => return Wire::Http1,
            Some(_) => return Wire::Tcp,
            // A prefix of a method: wait for more bytes (peek returns at once while data is
            // queued).
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        if tokio::time::Instant::now() >= deadline {
            return Wire::Tcp;
        }
    }
}

/// Whether an HTTP connection's first bytes are HTTP/2's preface (prior knowledge, as gRPC
/// clients send it) rather than an HTTP/1.x request line. Looks without taking them; `false`
/// if fewer than four bytes came within `timeout`.
async fn is_http2_preface(stream: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 4];
    matches!(tokio::time::timeout(timeout, stream.peek(&mut first)).await, Ok(Ok(4)) if &first == b"PRI ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TargetPort;

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port: 80,
            target_port: TargetPort::Number(80),
            protocol: "TCP".into(),
            app_protocol: app.map(str::to_owned),
        }
    }

    #[test]
    fn chosen_like_istio() {
        assert_eq!(for_port(&port(Some("http-web"), None)), Protocol::Http);
        assert_eq!(for_port(&port(Some("grpc"), None)), Protocol::Http);
        assert_eq!(for_port(&port(Some("http2"), None)), Protocol::Http);
        assert_eq!(for_port(&port(Some("tcp-db"), None)), Protocol::Tcp);
        assert_eq!(for_port(&port(Some("web"), None)), Protocol::Detect);
        assert_eq!(for_port(&port(None, None)), Protocol::Detect);
        assert_eq!(for_port(&port(Some("tcp"), Some("http"))), Protocol::Http);
        assert_eq!(for_port(&port(Some("web"), Some("kubernetes.io/h2c"))), Protocol::Http);
    }

    #[tokio::test]
    async fn sniffs_http1_http2_and_falls_back_to_tcp() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for (bytes, want) in [(&b"GET / HTTP/1.1\r\n"[..], Wire::Http1), (b"PRI * HTTP/2.0\r\n", Wire::Http2), (b"\x16\x03\x01\x02", Wire::Tcp), (b"", Wire::Tcp)] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            client.write_all(bytes).await.unwrap();
            assert_eq!(sniff(&server, Duration::from_millis(50)).await, want, "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn tells_the_http2_preface_from_an_http1_request() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for (bytes, want) in [(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], true), (b"POST / HTTP/1.1\r\n", false), (b"PR", false), (b"", false)] {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            client.write_all(bytes).await.unwrap();
            assert_eq!(is_http2_preface(&server, Duration::from_millis(50)).await, want, "{bytes:?}");
            // Nothing was taken: the server still reads every byte.
            let mut server = server;
            let mut all = vec![0u8; bytes.len()];
            tokio::io::AsyncReadExt::read_exact(&mut server, &mut all).await.unwrap();
            assert_eq!(all, bytes);
        }
    }
}
