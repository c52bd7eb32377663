//! Envoy's response flags: why a request ended the way it did, for access logs and metrics.
use std::fmt;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

macro_rules! flags {
    ($($name:ident = $bit:expr, $code:literal, $doc:literal;)*) => {
        impl ResponseFlags {
            $(#[doc = $doc] pub const $name: ResponseFlags = ResponseFlags(1 << $bit);)*
            const ALL: &'static [(ResponseFlags, &'static str)] = &[$((Self::$name, $code),)*];
        }
    };
}

flags! {
    NO_HEALTHY_UPSTREAM = 0, "UH", "No healthy upstream host (all ejected, or none).";
    UPSTREAM_CONNECT_FAILURE = 1, "UF", "Upstream connection failure.";
    UPSTREAM_OVERFLOW = 2, "UO", "Circuit breaker (connection pool limit) overflow.";
    RETRY_LIMIT_EXCEEDED = 3, "URX", "Retries exhausted (or upstream connection attempts).";
    UPSTREAM_TIMEOUT = 4, "UT", "Upstream request timeout.";
    NO_ROUTE = 5, "NR", "No route or no cluster for the request.";
    DELAY_INJECTED = 6, "DI", "Request delayed by fault injection.";
    FAULT_INJECTED = 7, "FI", "Request aborted by fault injection.";
    UPSTREAM_RESET = 8, "UR", "Upstream reset the connection mid-request.";
    DOWNSTREAM_DISCONNECT = 9, "DC", "Downstream closed before the response completed.";
    RATE_LIMITED = 10, "RL", "Refused by the local rate limit (`mesh.io/rate-limit`).";
    CONCURRENCY_LIMITED = 11, "CL", "Shed by the adaptive concurrency limit (`mesh.io/adaptive-concurrency`); the mesh's own code, not Envoy's.";
}

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);

    pub fn insert(&mut self, other: ResponseFlags) {
        self.0 |= other.0;
    }

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Each flag set, by Envoy's short code.
    pub fn codes(self) -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().filter(move |(f, _)| self.contains(*f)).map(|(_, c)| *c)
    }
}

impl fmt::Display for ResponseFlags {
    /// As in Envoy's access log: comma-separated codes, or "-" when none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let codes: Vec<_> = self.codes().collect();
        f.write_str(&codes.join(","))
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_envoy() {
        let mut f = ResponseFlags::NONE;
        assert_eq!(f.to_string(), "-");
        f.insert(ResponseFlags::UPSTREAM_CONNECT_FAILURE);
        f.insert(ResponseFlags::RETRY_LIMIT_EXCEEDED);
        assert_eq!(f.to_string(), "UF,URX");
        assert!(f.contains(ResponseFlags::RETRY_LIMIT_EXCEEDED));
        assert!(!f.contains(ResponseFlags::NO_ROUTE));
    }
}
