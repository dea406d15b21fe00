//! Signed callers: verify first, then charge the budget the verification
//! earned (ADR 0011).
//!
//! The rate-limit layer of a signed route ([`super::RateLimitLayer::signed`])
//! decides nothing before the handler runs: it puts a [`SignatureGate`]
//! into the request's extensions, and the route — which owns the secret —
//! verifies the raw request and hands the result to
//! [`SignatureGate::admit`]:
//!
//! ```ignore
//! let event = gate.admit(webhook::verify_event(&body, sig, secret, now, 300)).await?;
//! ```
//!
//! - verified → one decision on the source's own budget
//!   ([`SignedSource::policy`]); a forged flood never touches it;
//! - not verified → one decision on the client IP's
//!   [`super::policies::UNSIGNED`] budget, then the verification's own
//!   401 — or 429 once that IP has spent its budget (later refusals come
//!   from the deny cache, with no round trip at all).
//!
//! Still one decision (at most one round trip) per request. The layer writes
//! the `RateLimit-Policy` / `RateLimit` headers of that decision after the
//! handler returns.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use http::HeaderMap;
use http::request::Parts;

use super::policies::{SignedSource, UNSIGNED};
use super::policy::{Identity, Policy};
use super::{Decision, RateLimiter, applicable_policies, headers};
use crate::http::ApiError;

/// What the gate decided, for the layer's response headers.
#[derive(Debug, Clone)]
enum Outcome {
    Decided(Decision),
    /// The limiter could not be asked and a policy fails closed (503).
    Unavailable(Vec<Policy>),
}

#[derive(Debug)]
struct Gate {
    limiter: Arc<RateLimiter>,
    source: SignedSource,
    ip: Option<IpAddr>,
    outcome: Mutex<Option<Outcome>>,
}

/// The admission of one request to a signed route. An extractor that never
/// fails: without a rate-limit layer (`RATE_LIMITS=off`) it only passes the
/// verification's result through.
#[derive(Debug, Clone, Default)]
pub struct SignatureGate(Option<Arc<Gate>>);

impl SignatureGate {
    pub(crate) fn new(
        limiter: Arc<RateLimiter>,
        source: SignedSource,
        ip: Option<IpAddr>,
    ) -> SignatureGate {
        SignatureGate(Some(Arc::new(Gate {
            limiter,
            source,
            ip,
            outcome: Mutex::new(None),
        })))
    }

    /// Charges the budget `verified` earned and returns it, or the 429 (or
    /// 503) that refuses it. Call once per request, after verifying and
    /// before doing anything else.
    pub async fn admit<T>(&self, verified: Result<T, ApiError>) -> Result<T, ApiError> {
        let Some(gate) = &self.0 else {
            return verified;
        };
        let (policy, identity) = match &verified {
            Ok(_) => (
                gate.source.policy(),
                Identity {
                    source: Some(gate.source.name()),
                    ..Identity::default()
                },
            ),
            Err(_) => (
                UNSIGNED,
                Identity {
                    ip: gate.ip,
                    ..Identity::default()
                },
            ),
        };
        let policies = [policy];
        let now = gate.limiter.now();
        match gate.limiter.decide(&policies, &identity, now).await {
            Ok(decision) => {
                let refusal = decision.error();
                gate.record(Outcome::Decided(decision));
                match refusal {
                    Some(too_many) => Err(too_many),
                    None => verified,
                }
            }
            Err(unavailable) => {
                gate.record(Outcome::Unavailable(applicable_policies(
                    &policies, &identity,
                )));
                Err(unavailable)
            }
        }
    }

    /// Whether [`SignatureGate::admit`] ran (tests, the layer's check).
    pub fn admitted(&self) -> bool {
        self.0.as_ref().is_none_or(|g| {
            g.outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        })
    }

    /// Writes the headers of the decision made, if any.
    pub(crate) fn apply_headers(&self, headers: &mut HeaderMap) {
        let Some(gate) = &self.0 else { return };
        let outcome = gate
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match outcome {
            Some(Outcome::Decided(d)) => headers::apply(headers, &d),
            Some(Outcome::Unavailable(policies)) => headers::apply_unavailable(headers, &policies),
            None => {}
        }
    }
}

impl Gate {
    fn record(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SignatureGate {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<SignatureGate>()
            .cloned()
            // No rate-limit layer (`RATE_LIMITS=off`): the documented
            // pass-through gate.
            .unwrap_or_default())
    }
}
