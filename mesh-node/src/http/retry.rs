//! When a failed attempt is retried (Envoy's `retry_on` semantics as Istio configures them),
//! and how long to wait before the next try.
use std::{sync::LazyLock, time::Duration};

use http::StatusCode;

use crate::config::{HttpRetry, RetryOn};

/// What one attempt ended with, as far as retries care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A response's headers arrived: its status and, for gRPC trailers-only responses,
    /// `grpc-status`. As in Envoy, gRPC conditions are judged on the headers only: a status in
    /// trailers after a streamed body comes when the response is already the client's.
    Response { status: u16, grpc: Option<u8> },
    ConnectFailure,
    /// The upstream refused the stream before processing it (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// The connection was reset or closed before a response.
    Reset,
    /// The per-try timeout fired (Envoy treats it as a 504 from upstream).
    PerTryTimeout,
}

use super::grpc::{CANCELLED as GRPC_CANCELLED, DEADLINE_EXCEEDED as GRPC_DEADLINE_EXCEEDED, INTERNAL as GRPC_INTERNAL, RESOURCE_EXHAUSTED as GRPC_RESOURCE_EXHAUSTED, UNAVAILABLE as GRPC_UNAVAILABLE};

/// Istio's default retries, built once: a request borrows its policy instead of copying it.
static ISTIO_DEFAULT: LazyLock<HttpRetry> = LazyLock::new(HttpRetry::istio_default);

pub struct RetryPolicy<'a> {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    conditions: &'a [RetryOn],
}

impl<'a> RetryPolicy<'a> {
    /// The route's `retries`, or Istio's default when the route has none. As Istio's pilot:
    /// a `retries` block without `retryOn` keeps the default conditions (and so their retriable
    /// status 503); one with `retryOn` retries exactly the conditions and statuses it lists.
    pub fn from_route(retries: Option<&'a HttpRetry>) -> Self {
        let r = retries.unwrap_or(&ISTIO_DEFAULT);
        let conditions = if r.retry_on.is_empty() { &ISTIO_DEFAULT.retry_on } else { &r.retry_on };
        Self { attempts: r.attempts, per_try_timeout: r.per_try_timeout, conditions }
    }

    fn on(&self, c: RetryOn) -> bool {
        self.conditions.contains(&c)
    }

    pub fn should_retry(&self, attempt: Attempt) -> bool {
        use RetryOn::*;
        match attempt {
            Attempt::Response { status, grpc } => {
                let grpc_retry = grpc.is_some_and(|code| {
                    (code == GRPC_CANCELLED && self.on(Cancelled))
                        || (code == GRPC_DEADLINE_EXCEEDED && self.on(DeadlineExceeded))
                        || (code == GRPC_RESOURCE_EXHAUSTED && self.on(ResourceExhausted))
                        || (code == GRPC_INTERNAL && self.on(Internal))
                        || (code == GRPC_UNAVAILABLE && self.on(Unavailable))
                });
                grpc_retry
                    || (status >= 500 && self.on(FiveXx))
                    || (matches!(status, 502..=504) && self.on(GatewayError))
                    || (status == 409 && self.on(Retriable4xx))
                    || self.on(Status(status))
            }
            // Envoy: 5xx and gateway-error include connect failures; reset includes them too.
            Attempt::ConnectFailure => self.on(ConnectFailure) || self.on(FiveXx) || self.on(GatewayError) || self.on(Reset),
            Attempt::RefusedStream => self.on(RefusedStream) || self.on(FiveXx) || self.on(Reset),
            Attempt::Reset => self.on(Reset) || self.on(FiveXx),
            Attempt::PerTryTimeout => {
                self.on(FiveXx) || self.on(GatewayError) || self.on(Reset) || self.on(Status(StatusCode::GATEWAY_TIMEOUT.as_u16()))
            }
        }
    }
}

/// Envoy's backoff: exponential from 25 ms, capped at 250 ms, with full jitter.
pub fn backoff(retry: u32, roll: f64) -> Duration {
    const BASE: f64 = 0.025;
    const MAX: f64 = 0.25;
    let ceiling = (BASE * 2f64.powi(retry.saturating_sub(1).min(16) as i32)).min(MAX);
    Duration::from_secs_f64(ceiling * roll.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[RetryOn]) -> RetryPolicy<'static> {
        let retry = Box::leak(Box::new(HttpRetry { attempts: 2, per_try_timeout: None, retry_on: on.to_vec(), retry_remote_localities: false }));
        RetryPolicy::from_route(Some(retry))
    }

    #[test]
    fn istio_default_retries_503_connect_failures_and_grpc_unavailable_and_cancelled() {
        let p = RetryPolicy::from_route(None);
        assert_eq!(p.attempts, 2);
        assert!(p.should_retry(Attempt::ConnectFailure));
        assert!(p.should_retry(Attempt::RefusedStream));
        assert!(p.should_retry(Attempt::Response { status: 200, grpc: Some(14) }));
        assert!(p.should_retry(Attempt::Response { status: 200, grpc: Some(1) }));
        // retriable-status-codes with Istio's RetriableStatusCodes [503].
        assert!(p.should_retry(Attempt::Response { status: 503, grpc: None }));
        for status in [500, 502, 504, 429, 404, 200] {
            assert!(!p.should_retry(Attempt::Response { status, grpc: None }), "{status}");
        }
        for grpc in [0, 4, 8, 13] {
            assert!(!p.should_retry(Attempt::Response { status: 200, grpc: Some(grpc) }), "grpc-status {grpc}");
        }
        assert!(!p.should_retry(Attempt::Reset));
        assert!(!p.should_retry(Attempt::PerTryTimeout));
    }

    #[test]
    fn a_retries_block_without_retry_on_keeps_the_default_conditions() {
        let retry = Box::leak(Box::new(HttpRetry { attempts: 5, per_try_timeout: None, retry_on: vec![], retry_remote_localities: false }));
        let p = RetryPolicy::from_route(Some(retry));
        assert_eq!(p.attempts, 5);
        assert!(p.should_retry(Attempt::Response { status: 503, grpc: None }));
        // attempts: 0 disables retries (Istio sends no retry policy at all).
        let off = Box::leak(Box::new(HttpRetry { attempts: 0, per_try_timeout: None, retry_on: vec![], retry_remote_localities: false }));
        assert_eq!(RetryPolicy::from_route(Some(off)).attempts, 0);
        // An explicit retryOn replaces the default list, 503 included.
        let p = policy(&[RetryOn::ConnectFailure]);
        assert!(!p.should_retry(Attempt::Response { status: 503, grpc: None }));
        assert!(policy(&[RetryOn::Status(503)]).should_retry(Attempt::Response { status: 503, grpc: None }));
    }

    #[test]
    fn grpc_conditions_read_the_trailers_only_status() {
        let cases = [
            (RetryOn::Cancelled, 1),
            (RetryOn::DeadlineExceeded, 4),
            (RetryOn::ResourceExhausted, 8),
            (RetryOn::Internal, 13),
            (RetryOn::Unavailable, 14),
        ];
        for (cond, code) in cases {
            let p = policy(&[cond]);
            assert!(p.should_retry(Attempt::Response { status: 200, grpc: Some(code) }), "{cond} on {code}");
            for (_, other) in cases.iter().filter(|(_, c)| *c != code) {
                assert!(!p.should_retry(Attempt::Response { status: 200, grpc: Some(*other) }), "{cond} on {other}");
            }
            // A gRPC response that started without a status (the status comes in trailers).
            assert!(!p.should_retry(Attempt::Response { status: 200, grpc: None }), "{cond}");
            assert!(!p.should_retry(Attempt::Response { status: 200, grpc: Some(0) }), "{cond}");
        }
    }

    #[test]
    fn five_xx_and_gateway_error_and_status_codes() {
        let p = policy(&[RetryOn::FiveXx]);
        assert!(p.should_retry(Attempt::Response { status: 500, grpc: None }));
        assert!(p.should_retry(Attempt::Reset));
        assert!(p.should_retry(Attempt::PerTryTimeout));
        assert!(!p.should_retry(Attempt::Response { status: 404, grpc: None }));
        let g = policy(&[RetryOn::GatewayError]);
        assert!(!g.should_retry(Attempt::Response { status: 500, grpc: None }));
        assert!(g.should_retry(Attempt::Response { status: 503, grpc: None }));
        let s = policy(&[RetryOn::RetriableStatusCodes, RetryOn::Status(429)]);
        assert!(s.should_retry(Attempt::Response { status: 429, grpc: None }));
        assert!(!s.should_retry(Attempt::Response { status: 503, grpc: None }));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(10, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(3, 0.0), Duration::ZERO);
    }
}
