//! The runtime's per-request handle: work scheduled "after the response"
//! (Vercel's `wait_until`, Lambda's deferred work, a local task). A leaf
//! module: it knows no other module of this crate, so the rate limiter and
//! telemetry can read the handle without depending on `serve` (which
//! depends on them). `serve` re-exports everything here.

use std::future::Future;
use std::sync::Arc;

/// The platform's per-request handle, put into request extensions so layers
/// and handlers can schedule work after the response (`wait_until`).
#[derive(Clone)]
pub struct Platform(PlatformKind);

#[derive(Clone)]
enum PlatformKind {
    /// Vercel's `AppState`: the instance stays alive until the work ends.
    Vercel(vercel_runtime::AppState),
    /// Work collected during the request and awaited by the adapter before
    /// it hands the response back (AWS Lambda freezes the process as soon
    /// as the handler returns, so nothing may run "after" the response).
    Deferred(Deferred),
}

impl Platform {
    /// The handle of a request that came through the Vercel runtime.
    pub fn vercel(state: vercel_runtime::AppState) -> Self {
        Platform(PlatformKind::Vercel(state))
    }

    /// A handle whose work the caller awaits with [`Deferred::run`].
    pub fn deferred(work: Deferred) -> Self {
        Platform(PlatformKind::Deferred(work))
    }

    /// Whether the request came through the Vercel runtime (its forwarded
    /// headers can then be trusted for the client IP).
    pub fn is_vercel(&self) -> bool {
        matches!(self.0, PlatformKind::Vercel(_))
    }

    pub fn wait_until<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.0 {
            PlatformKind::Vercel(state) => state.wait_until(future),
            PlatformKind::Deferred(work) => work.push(future),
        }
    }
}

/// Work a request scheduled "after the response", run before the response
/// is returned ([`Platform::deferred`]).
#[derive(Clone, Default)]
pub struct Deferred(Arc<std::sync::Mutex<Vec<futures_util::future::BoxFuture<'static, ()>>>>);

impl Deferred {
    fn push<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if let Ok(mut queue) = self.0.lock() {
            queue.push(Box::pin(future));
        }
    }

    /// Runs the queued work concurrently, including work queued while it
    /// runs, for at most `budget`. `false` when the budget ran out: what
    /// was still running is dropped. Everything scheduled this way may be
    /// abandoned (the outbox's rows wait for the `deliver-outbox` cron; a
    /// Sentry flush loses at most the events of this request).
    pub async fn run(&self, budget: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let batch = match self.0.lock() {
                Ok(mut queue) => std::mem::take(&mut *queue),
                Err(_) => return false,
            };
            if batch.is_empty() {
                return true;
            }
            let all = futures_util::future::join_all(batch);
            if tokio::time::timeout_at(deadline, all).await.is_err() {
                tracing::warn!(
                    budget_ms = budget.as_millis() as u64,
                    "after-response work did not finish in time; abandoned"
                );
                return false;
            }
        }
    }
}

/// Runs `work` after the response has been sent: through Vercel's
/// `wait_until` (the instance stays alive until it finishes), on Lambda
/// before the response is returned (see [`Deferred`]), elsewhere (local) as
/// a background task.
pub fn after_response<F>(platform: Option<&Platform>, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match platform {
        Some(p) => p.wait_until(work),
        None => {
            tokio::spawn(work);
        }
    }
}

/// The request's [`Platform`] handle if it has one (on Vercel): an
/// extractor that never fails.
#[derive(Clone, Default)]
pub struct PlatformHandle(pub Option<Platform>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PlatformHandle {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(PlatformHandle(parts.extensions.get::<Platform>().cloned()))
    }
}

impl PlatformHandle {
    /// [`after_response`] with this request's handle.
    pub fn after_response<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        after_response(self.0.as_ref(), work);
    }
}

/// The client IP of a request that came from a Lambda event (`None`
/// when it did not; `Some(None)` when the event does not say):
///
/// - HTTP API (v2): `requestContext.http.sourceIp`;
/// - REST API (v1): `requestContext.identity.sourceIp`;
/// - ALB: the *last* `X-Forwarded-For` entry, the one the load balancer
///   appended (every entry before it is whatever the client sent).
///
/// API Gateway's `X-Forwarded-For` is never read: it appends to the
/// client's header, so its first entry is a claim.
///
/// (`lambda` feature; also `serve::lambda::client_ip`.) Here, not in
/// `serve`, so the rate limiter reads it without depending on `serve`.
#[cfg(feature = "lambda")]
pub fn lambda_client_ip(parts: &http::request::Parts) -> Option<Option<std::net::IpAddr>> {
    use lambda_http::request::RequestContext;
    let context = parts.extensions.get::<RequestContext>()?;
    let raw = match context {
        RequestContext::ApiGatewayV2(c) => c.http.source_ip.clone(),
        RequestContext::ApiGatewayV1(c) => c.identity.source_ip.clone(),
        RequestContext::Alb(_) => parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(|v| v.trim().to_owned()),
        // Event kinds this build does not enable (WebSocket, Lattice).
        #[allow(unreachable_patterns)]
        _ => None,
    };
    Some(raw.and_then(|ip| ip.parse().ok()))
}
