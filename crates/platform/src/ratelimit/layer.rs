//! The middleware that applies a route's policies.
//!
//! ```ignore
//! Router::new()
//!     .route("/api/v1/tips", post(tip))
//!     .layer(ratelimit::layer(limiter, policies::routes::MONEY)
//!         .with_verifier(verifier)
//!         .with_trust(trust_source))
//! ```
//!
//! Per request: who is calling (the [`AuthUser`] an earlier layer put in the
//! extensions, else the bearer token verified here; the verified user is
//! put into the extensions, so the handler's `AuthUser` does not verify it
//! again), the client IP ([`client_ip`]), and for money routes the caller's
//! trust level; then one [`RateLimiter::decide`] for all of it. Allowed
//! responses and 429s carry `RateLimit-Policy` and `RateLimit`; a 503 from
//! an unavailable limiter carries `Retry-After`.
//!
//! A present but invalid bearer token is refused here with the same 401 as
//! `MaybeAuthUser` would give; an absent one means an anonymous caller, to
//! whom only the IP-keyed policies apply.
//!
//! Signed routes ([`RateLimitLayer::signed`]) are the exception: nothing is
//! decided before the route has verified the signature; the layer only
//! hands the route a [`SignatureGate`] and writes the headers of the one
//! decision the gate made (see [`super::signed`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::request::Parts;
use tower::{Layer, Service};
use uuid::Uuid;

use super::headers::{self, ClientIpSource, client_ip};
use super::policies::{SignedSource, TrustLevel, money_policy};
use super::policy::{Identity, Policy};
use super::signed::SignatureGate;
use super::{RateLimiter, applicable_policies};
use crate::auth::{AuthUser, MaybeAuthUser, Verifier};
use crate::http::ApiError;

/// Where a user's trust level comes from (the money path implements this
/// over Postgres with [`TrustLevel::derive`]).
pub trait TrustSource: Send + Sync {
    fn trust_level(&self, user: Uuid) -> BoxFuture<'_, Result<TrustLevel, ApiError>>;
}

/// Applies `policies` to every request of the routes it wraps.
pub fn layer(limiter: Arc<RateLimiter>, policies: &'static [Policy]) -> RateLimitLayer {
    RateLimitLayer {
        config: Arc::new(Config {
            limiter,
            policies,
            verifier: None,
            trust: None,
            signed: None,
            ip_source: ClientIpSource::Auto,
        }),
    }
}

struct Config {
    limiter: Arc<RateLimiter>,
    policies: &'static [Policy],
    verifier: Option<Arc<Verifier>>,
    trust: Option<Arc<dyn TrustSource>>,
    signed: Option<SignedSource>,
    ip_source: ClientIpSource,
}

/// See [`layer`].
#[derive(Clone)]
pub struct RateLimitLayer {
    config: Arc<Config>,
}

impl RateLimitLayer {
    fn edit(self, f: impl FnOnce(&mut Config)) -> RateLimitLayer {
        let mut config = Config {
            limiter: self.config.limiter.clone(),
            policies: self.config.policies,
            verifier: self.config.verifier.clone(),
            trust: self.config.trust.clone(),
            signed: self.config.signed,
            ip_source: self.config.ip_source,
        };
        f(&mut config);
        RateLimitLayer {
            config: Arc::new(config),
        }
    }

    /// Verifies bearer tokens when no earlier layer did.
    pub fn with_verifier(self, verifier: Arc<Verifier>) -> RateLimitLayer {
        self.edit(|c| c.verifier = Some(verifier))
    }

    /// Adds the money limit of the caller's trust level (authenticated
    /// callers only). A failed lookup counts as `basic`, the strictest.
    /// The route's own policies must then not list a `money` policy (the
    /// first one listed would win).
    pub fn with_trust(self, trust: Arc<dyn TrustSource>) -> RateLimitLayer {
        self.edit(|c| c.trust = Some(trust))
    }

    /// Makes this the layer of a route signed by `source`: the route
    /// verifies first and charges a budget through the [`SignatureGate`]
    /// (the source's own, or the client IP's `unsigned`); the layer's own
    /// policies are replaced by `source`'s.
    pub fn signed(self, source: SignedSource) -> RateLimitLayer {
        self.edit(|c| {
            c.signed = Some(source);
            c.policies = source.policies();
        })
    }

    pub fn with_client_ip(self, ip_source: ClientIpSource) -> RateLimitLayer {
        self.edit(|c| c.ip_source = ip_source)
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// See [`layer`].
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Service<Request> for RateLimitService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move { Ok(config.handle(req, inner).await) })
    }
}

impl Config {
    async fn handle<S>(&self, req: Request, mut inner: S) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        let (mut parts, body) = req.into_parts();
        if let Some(source) = self.signed {
            return self.handle_signed(source, parts, body, inner).await;
        }
        let user = match self.user(&mut parts).await {
            Ok(u) => u,
            Err(e) => return e.into_response(),
        };
        let policies = self.policies_for(user).await;
        let identity = Identity {
            user,
            ip: client_ip(&parts, self.ip_source),
            source: None,
        };
        let now = self.limiter.now();
        let decision = match self.limiter.decide(&policies, &identity, now).await {
            Ok(d) => d,
            Err(e) => {
                let mut response = e.into_response();
                let applied = applicable_policies(&policies, &identity);
                headers::apply_unavailable(response.headers_mut(), &applied);
                return response;
            }
        };
        let mut response = match decision.error() {
            Some(refusal) => refusal.into_response(),
            None => match inner.call(Request::from_parts(parts, body)).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
        };
        headers::apply(response.headers_mut(), &decision);
        response
    }

    /// A signed route: the handler verifies and admits through the gate;
    /// the decision's headers are written here.
    async fn handle_signed<S>(
        &self,
        source: SignedSource,
        mut parts: Parts,
        body: axum::body::Body,
        mut inner: S,
    ) -> Response
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        let ip = client_ip(&parts, self.ip_source);
        let gate = SignatureGate::new(self.limiter.clone(), source, ip);
        parts.extensions.insert(gate.clone());
        let mut response = match inner.call(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if !gate.admitted() && response.status().is_success() {
            // A signed route that did work without verifying through the
            // gate would be unlimited; the routes' tests catch it, this
            // says so should one slip through.
            tracing::error!(
                source = source.name(),
                "signed route answered without admission"
            );
        }
        gate.apply_headers(response.headers_mut());
        response
    }

    /// The caller's user id: from an earlier layer, else from the token.
    async fn user(&self, parts: &mut Parts) -> Result<Option<Uuid>, ApiError> {
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(Some(user.id()));
        }
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let MaybeAuthUser(user) = MaybeAuthUser::from_request_parts(parts, verifier).await?;
        Ok(user.map(|u| u.id()))
    }

    /// The route's policies, plus the money limit of the caller's trust.
    async fn policies_for(&self, user: Option<Uuid>) -> Vec<Policy> {
        let mut policies = self.policies.to_vec();
        if let (Some(trust), Some(user)) = (&self.trust, user) {
            let level = trust.trust_level(user).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "trust level unavailable; using basic");
                TrustLevel::Basic
            });
            policies.push(money_policy(level));
        }
        policies
    }
}
