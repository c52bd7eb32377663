//! The HTTP server settings every listener of the daemon shares, so no connection can hold a
//! task without sending: a request's headers must arrive within [`HEADER_READ_TIMEOUT`] (a
//! slowloris client is dropped, and an idle HTTP/1 keep-alive connection with it), and HTTP/2
//! connections are pinged so a vanished peer is noticed.
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

/// From the first byte of a request (or the end of the previous one on a keep-alive
/// connection) to the end of its headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING every so often on an otherwise quiet connection, and how long the answer may take.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What an HTTP/1 connection may read ahead of the request it serves (hyper's default is
/// about 400 KiB): a client sending a body faster than the upstream takes it waits in its own
/// socket buffer, not in the proxy's memory.
pub const HTTP1_MAX_BUF: usize = 64 * 1024;

/// What one HTTP/2 stream may queue for sending beyond what the peer's window lets out (h2's
/// default is 1 MiB): a peer that stops reading holds this much of the proxy per stream, not more.
pub const H2_MAX_SEND_BUF: usize = 256 * 1024;

/// HTTP/1.1 only (admin, metrics, readiness).
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(HTTP1_MAX_BUF);
    b
}

/// HTTP/1.1 or HTTP/2 by the client's preface (the outbound L7 path).
pub fn auto() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(HTTP1_MAX_BUF);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    b
}

/// HTTP/2 only (the inbound tunnel port).
pub fn http2() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    b
}
