//! The value matchers of an AuthorizationPolicy source: Istio's `*` wildcards
//! for principals and namespaces, and IP blocks.

use std::fmt;
use std::net::IpAddr;

/// A principal or namespace pattern as Istio reads it: `*` alone, a leading
/// `*` (suffix match) or a trailing `*` (prefix match); anything else is exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wildcard {
    /// `*`: any non-empty value (for principals, "any authenticated peer").
    Any,
    Exact(String),
    /// `prefix*`
    Prefix(String),
    /// `*suffix`
    Suffix(String),
}

impl Wildcard {
    /// Reads a pattern, or says why it is not one. Istio would take a `*`
    /// elsewhere literally, which never matches a real identity, so it is
    /// refused rather than silently never matching.
    pub fn parse(text: &str) -> Result<Wildcard, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        let pattern = if text == "*" {
            Wildcard::Any
        } else if let Some(suffix) = text.strip_prefix('*') {
            Wildcard::Suffix(suffix.to_string())
        } else if let Some(prefix) = text.strip_suffix('*') {
            Wildcard::Prefix(prefix.to_string())
        } else {
            Wildcard::Exact(text.to_string())
        };
        let rest = match &pattern {
            Wildcard::Any => "",
            Wildcard::Exact(s) | Wildcard::Prefix(s) | Wildcard::Suffix(s) => s,
        };
        if rest.contains('*') {
            return Err(format!(
                "{text:?} has a * in the middle (only *, prefix* and *suffix are supported)"
            ));
        }
        Ok(pattern)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Wildcard::Any => !value.is_empty(),
            Wildcard::Exact(want) => value == want,
            Wildcard::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Wildcard::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

/// An address (`10.0.0.1`, a block of one) or CIDR (`10.0.0.0/8`). Host bits
/// may be set, as Istio and Envoy accept them; they are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpBlock {
    pub fn parse(text: &str) -> Option<IpBlock> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().ok()?;
        let width = width(addr);
        let prefix_len = match len {
            // u8 parsing alone would accept "+8"; CIDR lengths are plain digits.
            Some(len) if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => {
                len.parse::<u8>().ok().filter(|l| *l <= width)?
            }
            Some(_) => return None,
            None => width,
        };
        Some(IpBlock { addr, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let shift = u32::from(width(ip) - self.prefix_len);
        let net = |a: IpAddr| bits(a).checked_shr(shift).unwrap_or(0);
        net(self.addr) == net(ip)
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn width(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    #[test]
    fn wildcards() {
        let p = |s: &str| Wildcard::parse(s).expect("pattern");
        assert!(p("*").matches("cluster.local/ns/a/sa/b"));
        assert!(!p("*").matches(""));
        assert!(p("cluster.local/ns/a/*").matches("cluster.local/ns/a/sa/b"));
        assert!(!p("cluster.local/ns/a/*").matches("cluster.local/ns/ab/sa/b"));
        assert!(p("*/sa/b").matches("cluster.local/ns/a/sa/b"));
        assert!(!p("*/sa/b").matches("cluster.local/ns/a/sa/bc"));
        assert!(p("lemo-dev").matches("lemo-dev"));
        assert!(!p("lemo-dev").matches("lemo-dev2"));
        assert!(Wildcard::parse("a*b").is_err());
        assert!(Wildcard::parse("**").is_err());
        assert!(Wildcard::parse("").is_err());
    }

    #[test]
    fn ip_blocks() {
        let b = |s: &str| IpBlock::parse(s).expect("block");
        assert!(b("10.244.0.0/16").contains(ip("10.244.1.7")));
        assert!(!b("10.244.0.0/16").contains(ip("10.245.0.1")));
        assert!(b("10.244.0.10").contains(ip("10.244.0.10")));
        assert!(!b("10.244.0.10").contains(ip("10.244.0.11")));
        assert!(b("10.244.0.0/16").contains(ip("::ffff:10.244.3.3")));
        assert!(b("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(!b("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(b("::/0").contains(ip("2001:db8::1")));
        assert!(b("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(b("10.1.2.3/8").contains(ip("10.9.9.9")));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.300",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x",
            "::/129",
        ] {
            assert_eq!(IpBlock::parse(bad), None, "{bad}");
        }
    }
}
