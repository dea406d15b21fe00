//! Policies are data: a name, an algorithm with its numbers, what the limit
//! is keyed by, and what happens when the limiter cannot be asked.

use std::net::IpAddr;

/// How a policy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// At most `limit` requests per `window_ms`, approximated like
    /// `@upstash/ratelimit`'s `slidingWindow(limit, window)`: the current
    /// fixed window's count plus the previous window's count weighted by
    /// the share of it still inside the sliding window.
    SlidingWindow { limit: u32, window_ms: u64 },
    /// `@upstash/ratelimit`'s `tokenBucket(refill, interval, max)`: a bucket
    /// of `max` tokens, refilled by `refill` every `interval_ms`; each
    /// request takes one. Allows short bursts up to `max`.
    TokenBucket {
        refill: u32,
        interval_ms: u64,
        max: u32,
    },
}

/// What a policy's counter is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The authenticated user (token `sub`).
    User,
    /// The client's IP address (IPv6 per /64, see [`ip_subject`]).
    ClientIp,
    /// A signed caller (`"stripe"`, `"qstash"`) whose signature verified
    /// ([`super::SignatureGate`]); never what an unverified request claims.
    Source,
}

/// What happens when the limiter's store cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Allow the request (logged, counted, reported). For reads.
    Open,
    /// Refuse with 503 `rate_limiter_unavailable`. For money.
    Closed,
}

/// One rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Names the limit in headers and 429 bodies, and is part of its
    /// Redis key: two policies with the same name and key share counters.
    pub name: &'static str,
    pub algorithm: Algorithm,
    pub key: KeyKind,
    pub fail: FailMode,
}

impl Policy {
    /// Requests allowed per window (`q` of the `RateLimit-Policy` header).
    pub const fn quota(&self) -> u32 {
        match self.algorithm {
            Algorithm::SlidingWindow { limit, .. } => limit,
            Algorithm::TokenBucket { max, .. } => max,
        }
    }

    /// The window in milliseconds (for a token bucket, its refill interval).
    pub const fn window_ms(&self) -> u64 {
        match self.algorithm {
            Algorithm::SlidingWindow { window_ms, .. } => window_ms,
            Algorithm::TokenBucket { interval_ms, .. } => interval_ms,
        }
    }
}

/// Who is asking: whatever of it is known. A policy whose key is unknown
/// for this request does not apply to it (an anonymous request is not
/// limited per user; the route's IP policy covers it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub user: Option<uuid::Uuid>,
    pub ip: Option<IpAddr>,
    pub source: Option<&'a str>,
}

impl Identity<'_> {
    /// The value `policy` is keyed by, if known.
    pub fn subject(&self, key: KeyKind) -> Option<String> {
        match key {
            KeyKind::User => self.user.map(|u| u.hyphenated().to_string()),
            KeyKind::ClientIp => self.ip.map(ip_subject),
            KeyKind::Source => self.source.filter(|s| !s.is_empty()).map(str::to_owned),
        }
    }
}

/// IPv4 addresses as they are; IPv6 by their /64 network, since one
/// subscriber usually holds a whole /64 and could rotate through it.
/// IPv4-mapped IPv6 addresses count as the IPv4 address.
pub fn ip_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let network = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{network}/64")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(ip_subject(a), "2001:db8:1:2::/64");
        assert_eq!(ip_subject(a), ip_subject(b));
        assert_eq!(ip_subject("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3");
        assert_eq!(ip_subject("10.1.2.3".parse().unwrap()), "10.1.2.3");
    }

    #[test]
    fn subjects_follow_the_key() {
        let id = Identity {
            user: Some(uuid::Uuid::nil()),
            ip: None,
            source: Some(""),
        };
        assert_eq!(
            id.subject(KeyKind::User).as_deref(),
            Some("00000000-0000-0000-0000-000000000000")
        );
        assert_eq!(id.subject(KeyKind::ClientIp), None);
        assert_eq!(id.subject(KeyKind::Source), None);
    }
}
