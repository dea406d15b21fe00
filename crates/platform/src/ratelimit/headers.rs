//! `RateLimit-Policy` and `RateLimit` response headers
//! (draft-ietf-httpapi-ratelimit-headers, the 2025 revisions), and the
//! client IP the `public` policy is keyed by.
//!
//! Both headers are Structured Field lists whose items are the policy name
//! as a String with parameters:
//!
//! ```text
//! RateLimit-Policy: "burst";q=2;w=1, "money";q=5;w=60
//! RateLimit: "burst";r=1;t=1, "money";r=3;t=42
//! ```
//!
//! `q` is the quota, `w` the window in whole seconds (a token bucket's
//! refill interval), `r` what is left and `t` the seconds until more quota
//! is available. A request answered from the deny cache lists only the
//! blocking policies in `RateLimit`; one that failed open lists none.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::policy::Policy;
use super::{Decision, UNAVAILABLE_RETRY_AFTER_SECONDS};

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// An sf-string: the name in quotes, `"` and `\` escaped.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control())
    {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The `RateLimit-Policy` value for `policies`, `None` when there are none.
pub fn policy_header(policies: &[Policy]) -> Option<HeaderValue> {
    if policies.is_empty() {
        return None;
    }
    let items: Vec<String> = policies
        .iter()
        .map(|p| {
            // `w` must be a whole, non-zero number of seconds.
            let window_seconds = p.window_ms().div_ceil(1000).max(1);
            format!("{};q={};w={window_seconds}", sf_string(p.name), p.quota())
        })
        .collect();
    HeaderValue::from_str(&items.join(", ")).ok()
}

/// The `RateLimit` value for a decision, `None` when it has no states.
pub fn limit_header(decision: &Decision) -> Option<HeaderValue> {
    if decision.limits.is_empty() {
        return None;
    }
    let items: Vec<String> = decision
        .limits
        .iter()
        .map(|l| {
            format!(
                "{};r={};t={}",
                sf_string(l.policy.name),
                l.remaining,
                l.seconds_until_reset(decision.now_ms)
            )
        })
        .collect();
    HeaderValue::from_str(&items.join(", ")).ok()
}

/// Writes both headers for `decision` (and `Retry-After` on a refusal).
pub fn apply(headers: &mut HeaderMap, decision: &Decision) {
    if let Some(v) = policy_header(&decision.policies) {
        headers.insert(RATELIMIT_POLICY, v);
    }
    if let Some(v) = limit_header(decision) {
        headers.insert(RATELIMIT, v);
    }
    if let Some(seconds) = decision.retry_after_seconds() {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
}

/// Writes the headers of a 503 from an unavailable limiter.
pub fn apply_unavailable(headers: &mut HeaderMap, policies: &[Policy]) {
    if let Some(v) = policy_header(policies) {
        headers.insert(RATELIMIT_POLICY, v);
    }
    headers.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECONDS),
    );
}

/// Where the client's IP address comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The Lambda event's request context when there is one (`lambda`
    /// feature), Vercel's headers when the request came through the Vercel
    /// runtime (a Vercel [`crate::runtime::Platform`]), else the connection.
    #[default]
    Auto,
    /// Always Vercel's headers (tests of a Vercel deployment).
    Vercel,
    /// Always the TCP peer (the dev server, tests).
    Connection,
}

/// The client's IP address.
///
/// Behind Vercel the TCP peer is Vercel's proxy. Vercel *overwrites*
/// `X-Forwarded-For` with the client's address (a client cannot prepend a
/// forged one) and also sets `X-Vercel-Forwarded-For` and `X-Real-IP`; we
/// read `X-Vercel-Forwarded-For`, then `X-Real-IP`, then the first entry of
/// `X-Forwarded-For`. Anywhere else these headers are whatever the client
/// sent, so they are ignored and the connection's address is used.
///
/// AWS Lambda (the `lambda` feature): API Gateway *appends* to
/// `X-Forwarded-For` (the first entry is the client's claim), so the source
/// IP of the event's request context is used instead; see
/// [`crate::runtime::lambda_client_ip`].
pub fn client_ip(parts: &Parts, source: ClientIpSource) -> Option<IpAddr> {
    let behind_vercel = match source {
        ClientIpSource::Auto => {
            #[cfg(feature = "lambda")]
            if let Some(ip) = crate::runtime::lambda_client_ip(parts) {
                // A Lambda event: only its request context counts.
                return ip;
            }
            parts
                .extensions
                .get::<crate::runtime::Platform>()
                .is_some_and(crate::runtime::Platform::is_vercel)
        }
        ClientIpSource::Vercel => true,
        ClientIpSource::Connection => false,
    };
    if behind_vercel {
        return ["x-vercel-forwarded-for", "x-real-ip", "x-forwarded-for"]
            .iter()
            .find_map(|name| first_ip(&parts.headers, name));
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

fn first_ip(headers: &HeaderMap, name: &str) -> Option<IpAddr> {
    let value = headers.get(name)?.to_str().ok()?;
    value.split(',').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::policies::{AUTHENTICATED_API, BURST, MONEY_BASIC};
    use crate::ratelimit::{LimitState, Via};

    #[test]
    fn policy_header_follows_the_draft() {
        let v = policy_header(&[BURST, MONEY_BASIC, AUTHENTICATED_API]).unwrap();
        assert_eq!(v, r#""burst";q=2;w=1, "money";q=5;w=60, "api";q=300;w=60"#);
        assert!(policy_header(&[]).is_none());
    }

    #[test]
    fn limit_header_gives_remaining_and_seconds_to_reset() {
        let d = Decision {
            allowed: false,
            policies: vec![BURST, MONEY_BASIC],
            limits: vec![
                LimitState::new(BURST, true, 1, 10_400),
                LimitState::new(MONEY_BASIC, false, -2, 52_000),
            ],
            via: Via::Upstash,
            now_ms: 10_000,
        };
        assert_eq!(
            limit_header(&d).unwrap(),
            r#""burst";r=1;t=1, "money";r=0;t=42"#
        );
        let mut h = HeaderMap::new();
        apply(&mut h, &d);
        assert_eq!(h[http::header::RETRY_AFTER], "42");
        assert_eq!(h[RATELIMIT_POLICY], r#""burst";q=2;w=1, "money";q=5;w=60"#);
    }

    fn parts(headers: &[(&str, &str)], peer: Option<&str>) -> Parts {
        let mut req = http::Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        if let Some(peer) = peer {
            parts
                .extensions
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        }
        parts
    }

    #[test]
    fn forwarded_headers_count_only_behind_vercel() {
        let p = parts(
            &[
                ("x-forwarded-for", "198.51.100.7, 10.0.0.1"),
                ("x-real-ip", "198.51.100.8"),
            ],
            Some("10.0.0.2:5000"),
        );
        assert_eq!(
            client_ip(&p, ClientIpSource::Auto),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            client_ip(&p, ClientIpSource::Vercel),
            Some("198.51.100.8".parse().unwrap())
        );
        let xff = parts(&[("x-forwarded-for", "198.51.100.7, 10.0.0.1")], None);
        assert_eq!(
            client_ip(&xff, ClientIpSource::Vercel),
            Some("198.51.100.7".parse().unwrap())
        );
        let vercel = parts(
            &[
                ("x-vercel-forwarded-for", "2001:db8::1"),
                ("x-real-ip", "198.51.100.8"),
            ],
            None,
        );
        assert_eq!(
            client_ip(&vercel, ClientIpSource::Vercel),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(client_ip(&vercel, ClientIpSource::Connection), None);
    }
}
