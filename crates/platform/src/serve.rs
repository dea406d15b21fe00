//! Runs a function: load its configuration, wrap its router in the shared
//! layers, and serve it on Vercel (default), on AWS Lambda (`lambda`
//! feature), or on a local port (the dev server and tests).
//!
//! On Vercel we use the official `vercel_runtime` server but not its
//! `VercelLayer`: that layer treats every `application/json` response as a
//! stream, so hyper writes the headers and the body separately, and since
//! the runtime's listener does not set `TCP_NODELAY`, every keep-alive JSON
//! response stalls ~40 ms on Nagle + delayed ACK (measured: ~700 req/s,
//! p50 44 ms). [`VercelAdapter`] buffers complete bodies and hands hyper one
//! `Full` body, which it writes together with the headers; only
//! `text/event-stream` keeps the runtime's streaming path.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use http_body_util::{BodyExt, Limited};
use tokio::sync::OnceCell;

use crate::config::{CoreConfig, DbConfig, Loader};
use crate::http::{ApiError, MAX_BODY_BYTES};

/// A deployable function: its name, the paths it serves, and how to build
/// its router from configuration (`None` when configuration is missing; the
/// problems are recorded in the loader).
#[derive(Clone, Copy)]
pub struct Function {
    pub name: &'static str,
    pub paths: &'static [&'static str],
    pub build: fn(&mut Loader, &Resources) -> Option<Router>,
    /// The rate limits of SPEC §4 this function's routes get (applied by
    /// [`build`] and [`compose`], never by the route itself).
    pub limits: Limits,
}

/// A function's rate-limit declaration. Every function must declare one; a
/// test fails otherwise.
#[derive(Clone, Copy, Debug)]
pub enum Limits {
    /// Public routes: per client IP.
    Public,
    /// Authenticated reads and profile edits: per user.
    Authenticated,
    /// Money operations (tip, enrol, call request): burst, API, and the
    /// money limit of the caller's trust level — fail closed.
    Money,
    /// Token purchases: burst, purchases, API — fail closed.
    Purchase,
    /// Signed callers (Stripe, the access-token hook, QStash, Vercel Cron):
    /// the route verifies first, then charges its source's budget — or, for
    /// a bad signature, the client IP's `unsigned` budget
    /// ([`crate::ratelimit::SignatureGate`], ADR 0011).
    Signed(crate::ratelimit::SignedSource),
    /// No limiter at all, with the reason (liveness must do no I/O).
    Exempt(&'static str),
}

impl Limits {
    pub fn policies(self) -> &'static [crate::ratelimit::Policy] {
        use crate::ratelimit::policies::routes;
        match self {
            Limits::Public => routes::PUBLIC,
            Limits::Authenticated => routes::AUTHENTICATED,
            Limits::Money => routes::MONEY,
            Limits::Purchase => routes::PURCHASE,
            Limits::Signed(source) => source.policies(),
            Limits::Exempt(_) => &[],
        }
    }
}

/// Process-wide resources shared by every router built in this process
/// (one function on Vercel; every function in the dev server): one pool,
/// one HTTP client.
#[derive(Clone, Default)]
pub struct Resources {
    pool: Arc<OnceCell<(sqlx::PgPool, crate::db::PoolMode)>>,
    http: Arc<std::sync::OnceLock<reqwest::Client>>,
    verifier: Arc<std::sync::OnceLock<Arc<crate::auth::Verifier>>>,
    limiter: Arc<std::sync::OnceLock<Arc<crate::ratelimit::RateLimiter>>>,
    pub clock: crate::time::Clock,
}

impl Resources {
    /// The process's pool, created (lazily connecting) on first use.
    pub fn db(&self, cfg: &DbConfig) -> Option<sqlx::PgPool> {
        if let Some((pool, _)) = self.pool.get() {
            return Some(pool.clone());
        }
        let pool = crate::db::connect_lazy(cfg).ok()?;
        let _ = self.pool.set((pool, cfg.pool_mode));
        self.pool.get().map(|(pool, _)| pool.clone())
    }

    /// How the process's pool reaches Postgres (session when there is none
    /// yet): code that runs statements outside a request transaction asks
    /// (`db::begin_pinned`).
    pub fn pool_mode(&self) -> crate::db::PoolMode {
        self.pool
            .get()
            .map_or(crate::db::PoolMode::Session, |(_, mode)| *mode)
    }

    /// Uses an existing pool, direct or through a session pooler (tests, the
    /// dev server).
    pub fn with_pool(pool: sqlx::PgPool) -> Self {
        Self::with_pool_in(pool, crate::db::PoolMode::Session)
    }

    /// Uses an existing pool that reaches Postgres as `mode` says (tests
    /// through a transaction pooler).
    pub fn with_pool_in(pool: sqlx::PgPool, mode: crate::db::PoolMode) -> Self {
        let r = Resources::default();
        let _ = r.pool.set((pool, mode));
        r
    }

    /// The process's token verifier (one JWKS cache per process).
    pub fn verifier(&self, cfg: &crate::config::AuthConfig) -> Arc<crate::auth::Verifier> {
        self.verifier
            .get_or_init(|| Arc::new(crate::auth::Verifier::new(cfg, self.http())))
            .clone()
    }

    /// The process's rate limiter (one deny cache per process): Upstash
    /// when configured, in-process outside production otherwise.
    pub fn rate_limiter(
        &self,
        upstash: Option<&crate::config::UpstashConfig>,
        env: crate::config::AppEnv,
    ) -> Arc<crate::ratelimit::RateLimiter> {
        self.limiter
            .get_or_init(|| {
                Arc::new(
                    crate::ratelimit::RateLimiter::from_config(upstash, env, self.http())
                        .with_clock(self.clock.clone()),
                )
            })
            .clone()
    }

    /// The process's outbound HTTP client: bounded timeouts, connection reuse
    /// across invocations of a warm function.
    pub fn http(&self) -> reqwest::Client {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(3))
                    .timeout(std::time::Duration::from_secs(10))
                    .pool_idle_timeout(std::time::Duration::from_secs(50))
                    .build()
                    .unwrap_or_default()
            })
            .clone()
    }
}

/// Loads configuration for `function` and returns its router wrapped in the
/// shared layers, or every configuration problem at once.
pub fn build(
    function: &Function,
    loader: &mut Loader,
    resources: &Resources,
) -> Option<(Router, CoreConfig)> {
    let core = CoreConfig::load(loader);
    let router = (function.build)(loader, resources);
    let router = with_limits(function, router?, loader, resources)?;
    Some((router, core))
}

/// Wraps a function's router in its declared rate limits: all of a
/// request's limits in one round trip (`ratelimit::layer`).
fn with_limits(
    function: &Function,
    router: Router,
    l: &mut Loader,
    r: &Resources,
) -> Option<Router> {
    use crate::config::{AuthConfig, UpstashConfig, rate_limits_enabled};
    if matches!(function.limits, Limits::Exempt(_)) || !rate_limits_enabled(l) {
        return Some(router);
    }
    let upstash = UpstashConfig::load(l);
    let limiter = r.rate_limiter(upstash.as_ref(), l.app_env());
    let mut layer = crate::ratelimit::layer(limiter, function.limits.policies());
    match function.limits {
        Limits::Signed(source) => layer = layer.signed(source),
        Limits::Public => {}
        Limits::Authenticated | Limits::Purchase | Limits::Money => {
            let auth = AuthConfig::load(l)?;
            layer = layer.with_verifier(r.verifier(&auth));
        }
        Limits::Exempt(_) => {}
    }
    if matches!(function.limits, Limits::Money) {
        let pool = r.db(&DbConfig::load(l)?)?;
        layer = layer.with_trust(Arc::new(DbTrust(pool, r.pool_mode())));
    }
    Some(router.layer(layer))
}

/// Trust levels from Postgres (`app.trust_level`, derived from account
/// facts; SPEC §4). One round trip in session mode; in a transaction of its
/// own through a transaction pooler (`db::begin_pinned`).
struct DbTrust(sqlx::PgPool, crate::db::PoolMode);

impl crate::ratelimit::TrustSource for DbTrust {
    fn trust_level(
        &self,
        user: uuid::Uuid,
    ) -> futures_util::future::BoxFuture<'_, Result<crate::ratelimit::TrustLevel, ApiError>> {
        Box::pin(async move {
            let query = sqlx::query_scalar("select app.trust_level($1)").bind(user);
            let level: Option<String> = match crate::db::begin_pinned(&self.0, self.1).await? {
                Some(mut tx) => {
                    let level = query.fetch_one(&mut *tx).await?;
                    tx.commit().await?;
                    level
                }
                None => query.fetch_one(&self.0).await?,
            };
            Ok(crate::ratelimit::TrustLevel::parse(
                level.as_deref().unwrap_or("basic"),
            ))
        })
    }
}

/// The entry point of every `api/**/*.rs` binary.
pub fn run(function: Function) -> ExitCode {
    // One thread: a serverless instance has a fraction of a core, and a
    // current-thread runtime starts fastest. Entered before building, since
    // pools and clients bind to the runtime they are created in.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}: cannot start the runtime: {e}", function.name);
            return ExitCode::FAILURE;
        }
    };
    let _entered = runtime.enter();
    let mut loader = Loader::from_env();
    let resources = Resources::default();
    let built = build(&function, &mut loader, &resources);
    let warnings = match loader.finish() {
        Ok(w) => w,
        Err(errors) => {
            // Cold start with a broken environment: say everything at once
            // and exit; the platform reports the failed start.
            eprintln!("{}: {errors}", function.name);
            return ExitCode::from(2);
        }
    };
    let Some((router, core)) = built else {
        eprintln!("{}: configuration incomplete", function.name);
        return ExitCode::from(2);
    };
    crate::telemetry::init(function.name, &core);
    for w in warnings {
        tracing::warn!(function = function.name, "{w}");
    }
    let app = crate::http::stack(router, &core);
    match runtime.block_on(serve_platform(app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", function.name);
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "lambda"))]
async fn serve_platform(app: Router) -> Result<(), vercel_runtime::Error> {
    vercel_runtime::run(VercelAdapter { router: app }).await
}

#[cfg(feature = "lambda")]
async fn serve_platform(app: Router) -> Result<(), lambda_http::Error> {
    lambda_http::run(app).await
}

/// Serves `app` (already stacked) on a local listener with `TCP_NODELAY`
/// and a header read timeout (`crate::local`), until `shutdown` resolves.
/// Used by the dev server.
pub async fn serve_local(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::local::serve(listener, app, shutdown, crate::local::HEADER_READ_TIMEOUT).await
}

/// The platform's per-request handle (Vercel's `AppState`), put into request
/// extensions so layers can call `wait_until` (work after the response).
#[derive(Clone)]
pub struct Platform(vercel_runtime::AppState);

impl Platform {
    pub fn wait_until<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.wait_until(future);
    }
}

/// Runs `work` after the response has been sent: through Vercel's
/// `wait_until` (the instance stays alive until it finishes), elsewhere
/// (local, Lambda) as a background task.
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

/// Adapts an axum router to `vercel_runtime::run` (see the module docs for
/// why this replaces the stock `VercelLayer`).
#[derive(Clone)]
pub struct VercelAdapter {
    pub router: Router,
}

type AdapterFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    hyper::Response<vercel_runtime::ResponseBody>,
                    vercel_runtime::Error,
                >,
            > + Send,
    >,
>;

impl tower::Service<(vercel_runtime::AppState, vercel_runtime::Request)> for VercelAdapter {
    type Response = hyper::Response<vercel_runtime::ResponseBody>;
    type Error = vercel_runtime::Error;
    type Future = AdapterFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(
        &mut self,
        (state, req): (vercel_runtime::AppState, vercel_runtime::Request),
    ) -> Self::Future {
        let router = self.router.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    // Too large (or the client went away): the request rules
                    // layer answers 413 with the usual headers.
                    parts.extensions.insert(crate::http::guard::BodyTooLarge);
                    bytes::Bytes::new()
                }
            };
            parts.extensions.insert(Platform(state));
            let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
            let response = match tower::ServiceExt::oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(into_vercel_response(response).await)
        })
    }
}

/// Buffers a complete body so hyper sends headers and body in one write;
/// `text/event-stream` keeps streaming.
async fn into_vercel_response(
    response: axum::response::Response,
) -> hyper::Response<vercel_runtime::ResponseBody> {
    let is_event_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if is_event_stream {
        return match vercel_runtime::axum::StreamingUtils::process_response(response).await {
            Ok(r) => r,
            Err(_) => hyper::Response::new(vercel_runtime::ResponseBody::from("")),
        };
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };
    hyper::Response::from_parts(parts, vercel_runtime::ResponseBody::from(bytes))
}

/// A router answering every path of `function` with 503 `not_configured`
/// (the dev server mounts it for functions whose settings are missing).
pub fn not_configured(function: &Function, missing: Vec<&'static str>) -> Router {
    let detail = format!(
        "{} is not configured here; missing or invalid: {}",
        function.name,
        missing.join(", ")
    );
    let mut router = Router::new();
    for path in function.paths {
        let detail = detail.clone();
        router = router.route(
            path,
            axum::routing::any(move || {
                let detail = detail.clone();
                async move { ApiError::Unavailable("not_configured", detail) }
            }),
        );
    }
    router
}

/// Every function's router in one, each built from a fresh loader (so each
/// reports its own problems), wrapped in the shared layers once. A function
/// whose configuration is incomplete answers 503 `not_configured`. Used by
/// the dev server and in-process tests.
pub fn compose(
    functions: &[Function],
    env: impl Fn() -> Loader,
    resources: &Resources,
) -> (Router, Vec<(&'static str, crate::config::ConfigErrors)>) {
    let mut loader = env();
    let core = CoreConfig::load(&mut loader);
    let mut router = Router::new();
    let mut failures = Vec::new();
    for function in functions {
        let mut loader = env();
        let built = (function.build)(&mut loader, resources)
            .and_then(|router| with_limits(function, router, &mut loader, resources));
        match (loader.finish(), built) {
            (Ok(_), Some(r)) => router = router.merge(r),
            (Err(errors), _) => {
                let vars = errors.0.iter().map(|p| p.variable).collect();
                router = router.merge(not_configured(function, vars));
                failures.push((function.name, errors));
            }
            (Ok(_), None) => {
                router = router.merge(not_configured(function, Vec::new()));
            }
        }
    }
    (crate::http::stack(router, &core), failures)
}

/// The Lambda target: an API Gateway HTTP API (v2) event goes through the
/// same adapter `lambda_http::run` uses, into the same stacked router.
#[cfg(all(test, feature = "lambda"))]
mod lambda_tests {
    use lambda_http::lambda_runtime::{Context, LambdaEvent};
    use lambda_http::request::LambdaRequest;
    use tower::ServiceExt;

    fn event(path: &str) -> LambdaRequest {
        serde_json::from_value(serde_json::json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": "",
            "headers": {"host": "api.example.com", "origin": "https://stagepass.app"},
            "requestContext": {
                "accountId": "123456789012", "apiId": "api", "domainName": "api.example.com",
                "domainPrefix": "api", "requestId": "req-1", "routeKey": "$default",
                "stage": "$default", "time": "27/Nov/2026:00:00:00 +0000", "timeEpoch": 0,
                "http": {"method": "GET", "path": path, "protocol": "HTTP/1.1",
                         "sourceIp": "127.0.0.1", "userAgent": "test"}
            },
            "isBase64Encoded": false
        }))
        .expect("an API Gateway v2 event")
    }

    async fn call(path: &str) -> serde_json::Value {
        let router = axum::Router::new().route(
            "/api/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        );
        let mut loader =
            crate::config::Loader::from_map([("ALLOWED_ORIGINS", "https://stagepass.app")]);
        let core = crate::config::CoreConfig::load(&mut loader);
        let app = crate::http::stack(router, &core);
        let adapter = lambda_http::Adapter::from(app);
        let response = adapter
            .oneshot(LambdaEvent::new(event(path), Context::default()))
            .await
            .expect("response");
        serde_json::to_value(&response).expect("serialise")
    }

    #[tokio::test]
    async fn api_gateway_events_reach_the_same_stack() {
        let ok = call("/api/health").await;
        assert_eq!(ok["statusCode"], 200, "{ok}");
        assert_eq!(ok["body"], r#"{"status":"ok"}"#);
        let headers = &ok["headers"];
        assert!(headers["request-id"].is_string(), "{ok}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://stagepass.app"
        );
        let missing = call("/api/nope").await;
        assert_eq!(missing["statusCode"], 404);
        assert_eq!(
            missing["headers"]["content-type"],
            "application/problem+json"
        );
    }
}
