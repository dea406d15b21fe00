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
pub use crate::runtime::{Deferred, Platform, PlatformHandle, after_response};

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
    /// Payout requests: burst, payouts (3 / h), API, and the money limit of
    /// the caller's trust level — fail closed.
    PayoutRequest,
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
            Limits::PayoutRequest => routes::PAYOUT_REQUEST,
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
    pool: Arc<OnceCell<sqlx::PgPool>>,
    http: Arc<std::sync::OnceLock<reqwest::Client>>,
    verifier: Arc<std::sync::OnceLock<Arc<crate::auth::Verifier>>>,
    limiter: Arc<std::sync::OnceLock<Arc<crate::ratelimit::RateLimiter>>>,
    flags: Arc<std::sync::OnceLock<Arc<crate::flags::FlagCache>>>,
    pub clock: crate::time::Clock,
}

impl Resources {
    /// The process's pool, created (lazily connecting) on first use.
    pub fn db(&self, cfg: &DbConfig) -> Option<sqlx::PgPool> {
        if let Some(pool) = self.pool.get() {
            return Some(pool.clone());
        }
        let pool = crate::db::connect_lazy(cfg).ok()?;
        let _ = self.pool.set(pool);
        self.pool.get().cloned()
    }

    /// Uses an existing pool, direct or through a pooler (tests, the dev
    /// server). Nothing depends on the pool mode outside its connect
    /// options: single statements are one flight through a transaction
    /// pooler (vendor/sqlx-postgres/STAGEPASS-PATCH.md).
    pub fn with_pool(pool: sqlx::PgPool) -> Self {
        let r = Resources::default();
        let _ = r.pool.set(pool);
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

    /// The process's feature flag cache (one per process, so one per
    /// function instance), on the process's pool and clock.
    pub fn flags(
        &self,
        pool: &sqlx::PgPool,
        config: crate::flags::FlagsConfig,
    ) -> Arc<crate::flags::FlagCache> {
        self.flags
            .get_or_init(|| {
                let source = crate::flags::DbSource { pool: pool.clone() };
                Arc::new(crate::flags::FlagCache::new(
                    Box::new(source),
                    self.clock.clone(),
                    config,
                ))
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
                    // Fails only if the TLS backend cannot start, at cold
                    // start (every `build` asks for the client): no outbound
                    // call could work, and `Client::default()` would have no
                    // timeouts, so a hung peer would hold requests forever.
                    .expect("the outbound HTTP client (TLS backend) cannot be built")
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
        Limits::Authenticated | Limits::Purchase | Limits::Money | Limits::PayoutRequest => {
            let auth = AuthConfig::load(l)?;
            layer = layer.with_verifier(r.verifier(&auth));
        }
        Limits::Exempt(_) => {}
    }
    if matches!(function.limits, Limits::Money | Limits::PayoutRequest) {
        let pool = r.db(&DbConfig::load(l)?)?;
        layer = layer.with_trust(Arc::new(DbTrust(pool)));
    }
    Some(router.layer(layer))
}

/// Trust levels from Postgres (`app.trust_level`, derived from account
/// facts; SPEC §4). One round trip: a cached statement in session mode, one
/// flight through a transaction pooler (vendor/sqlx-postgres/STAGEPASS-PATCH.md).
struct DbTrust(sqlx::PgPool);

impl crate::ratelimit::TrustSource for DbTrust {
    fn trust_level(
        &self,
        user: uuid::Uuid,
    ) -> futures_util::future::BoxFuture<'_, Result<crate::ratelimit::TrustLevel, ApiError>> {
        Box::pin(async move {
            let level: Option<String> = sqlx::query_scalar("select app.trust_level($1)")
                .bind(user)
                .fetch_one(&self.0)
                .await?;
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
    lambda_http::run(lambda::LambdaAdapter::new(app)).await
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
            parts.extensions.insert(Platform::vercel(state));
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
                async move { ApiError::Unavailable(crate::http::codes::NOT_CONFIGURED, detail) }
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

/// The event an EventBridge schedule sends to a cron function on Lambda: an
/// API Gateway HTTP API (v2) request `GET path` with `Authorization:
/// <authorization>`. A schedule cannot call the HTTP API with a header, so
/// it invokes the function directly with this payload (the rule's
/// constant input) and the request takes the same way as any other, cron
/// secret check included. `stagepass lambda template` writes it with
/// `Bearer ${CronSecret}` for CloudFormation to substitute.
pub fn schedule_event(path: &str, authorization: &str) -> serde_json::Value {
    serde_json::json!({
        "version": "2.0",
        "routeKey": format!("GET {path}"),
        "rawPath": path,
        "rawQueryString": "",
        "headers": {
            "authorization": authorization,
            "user-agent": "amazon-eventbridge-scheduler",
        },
        "requestContext": {
            // No domain name: an empty one would make `lambda_http` read the
            // path's first segment as the host.
            "requestId": "eventbridge", "routeKey": format!("GET {path}"),
            "stage": "$default", "timeEpoch": 0,
            "http": {
                "method": "GET", "path": path, "protocol": "HTTP/1.1",
                "sourceIp": "", "userAgent": "amazon-eventbridge-scheduler",
            },
        },
        "isBase64Encoded": false,
    })
}

/// The AWS Lambda target (`lambda` feature): the same stacked router behind
/// `lambda_http`, with after-response work awaited before the response is
/// handed back and the client IP taken from the event's request context.
#[cfg(feature = "lambda")]
pub mod lambda {
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use axum::Router;
    use futures_util::future::BoxFuture;

    use super::{Deferred, Platform};
    use crate::http::MAX_BODY_BYTES;

    /// How long a request's after-response work (outbox kick, Sentry flush)
    /// may hold its response back on Lambda. Lambda freezes the process as
    /// soon as the handler returns, so that work runs before; past this
    /// budget it is abandoned (the outbox's `deliver-outbox` cron retries).
    pub const AFTER_RESPONSE_BUDGET: Duration = Duration::from_secs(5);

    /// `lambda_http`'s handler: the router, plus the work its request
    /// scheduled with [`super::after_response`], awaited before returning.
    #[derive(Clone)]
    pub struct LambdaAdapter {
        router: Router,
        budget: Duration,
    }

    impl LambdaAdapter {
        pub fn new(router: Router) -> Self {
            LambdaAdapter {
                router,
                budget: AFTER_RESPONSE_BUDGET,
            }
        }

        /// A different budget for after-response work (tests).
        pub fn with_budget(mut self, budget: Duration) -> Self {
            self.budget = budget;
            self
        }
    }

    impl tower::Service<lambda_http::Request> for LambdaAdapter {
        type Response = axum::response::Response;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: lambda_http::Request) -> Self::Future {
            let router = self.router.clone();
            let budget = self.budget;
            Box::pin(async move {
                let (mut parts, body) = req.into_parts();
                let bytes = match body {
                    lambda_http::Body::Empty => bytes::Bytes::new(),
                    lambda_http::Body::Text(text) => bytes::Bytes::from(text),
                    lambda_http::Body::Binary(data) => bytes::Bytes::from(data),
                    other => bytes::Bytes::copy_from_slice(other.as_ref()),
                };
                // The event holds the whole body already (API Gateway allows
                // up to 10 MB); the same limit as on Vercel applies.
                let bytes = if bytes.len() > MAX_BODY_BYTES {
                    parts.extensions.insert(crate::http::guard::BodyTooLarge);
                    bytes::Bytes::new()
                } else {
                    bytes
                };
                let work = Deferred::default();
                parts.extensions.insert(Platform::deferred(work.clone()));
                let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
                let response = match tower::ServiceExt::oneshot(router, req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                work.run(budget).await;
                Ok(response)
            })
        }
    }

    pub use crate::runtime::lambda_client_ip as client_ip;
}

/// The Lambda target: API Gateway events go through the same adapter
/// `serve::run` gives `lambda_http::run`, into the same stacked router.
#[cfg(all(test, feature = "lambda"))]
mod lambda_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use lambda_http::lambda_runtime::{Context, LambdaEvent};
    use lambda_http::request::LambdaRequest;
    use tower::ServiceExt;

    use super::PlatformHandle;
    use super::lambda::LambdaAdapter;
    use crate::ratelimit::{Algorithm, FailMode, KeyKind, Policy, RateLimiter};

    /// An HTTP API (v2) event as API Gateway sends it.
    fn event(path: &str, source_ip: &str, headers: serde_json::Value) -> serde_json::Value {
        let mut all =
            serde_json::json!({"host": "api.example.com", "origin": "https://stagepass.app"});
        for (k, v) in headers.as_object().into_iter().flatten() {
            all[k] = v.clone();
        }
        serde_json::json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": "",
            "headers": all,
            "requestContext": {
                "accountId": "123456789012", "apiId": "api", "domainName": "api.example.com",
                "domainPrefix": "api", "requestId": "req-1", "routeKey": "$default",
                "stage": "$default", "time": "27/Nov/2026:00:00:00 +0000", "timeEpoch": 0,
                "http": {"method": "GET", "path": path, "protocol": "HTTP/1.1",
                         "sourceIp": source_ip, "userAgent": "test"}
            },
            "isBase64Encoded": false
        })
    }

    fn stacked(router: axum::Router) -> axum::Router {
        let mut loader =
            crate::config::Loader::from_map([("ALLOWED_ORIGINS", "https://stagepass.app")]);
        let core = crate::config::CoreConfig::load(&mut loader);
        crate::http::stack(router, &core)
    }

    async fn send(adapter: LambdaAdapter, event: serde_json::Value) -> serde_json::Value {
        let request: LambdaRequest = serde_json::from_value(event).expect("a Lambda event");
        let response = lambda_http::Adapter::from(adapter)
            .oneshot(LambdaEvent::new(request, Context::default()))
            .await
            .expect("response");
        serde_json::to_value(&response).expect("serialise")
    }

    async fn call(path: &str) -> serde_json::Value {
        let router = axum::Router::new().route(
            "/api/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        );
        let event = event(path, "203.0.113.9", serde_json::json!({}));
        send(LambdaAdapter::new(stacked(router)), event).await
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

    /// A route that schedules slow work after its response, the way the
    /// outbox kick does (`PlatformHandle::after_response`).
    fn with_after_response_work(done: Arc<AtomicBool>, takes: Duration) -> axum::Router {
        axum::Router::new().route(
            "/api/work",
            axum::routing::get(move |platform: PlatformHandle| {
                let done = done.clone();
                async move {
                    platform.after_response(async move {
                        tokio::time::sleep(takes).await;
                        done.store(true, Ordering::SeqCst);
                    });
                    "accepted"
                }
            }),
        )
    }

    #[tokio::test]
    async fn after_response_work_has_finished_when_lambda_gets_the_response() {
        let done = Arc::new(AtomicBool::new(false));
        let app = stacked(with_after_response_work(
            done.clone(),
            Duration::from_millis(200),
        ));
        let response = send(
            LambdaAdapter::new(app),
            event("/api/work", "203.0.113.9", serde_json::json!({})),
        )
        .await;
        assert_eq!(response["statusCode"], 200, "{response}");
        // The process may be frozen from here on: the work must be done.
        assert!(
            done.load(Ordering::SeqCst),
            "after-response work still pending"
        );
    }

    #[tokio::test]
    async fn after_response_work_is_bounded_by_its_budget() {
        let done = Arc::new(AtomicBool::new(false));
        let app = stacked(with_after_response_work(
            done.clone(),
            Duration::from_secs(30),
        ));
        let started = Instant::now();
        let response = send(
            LambdaAdapter::new(app).with_budget(Duration::from_millis(100)),
            event("/api/work", "203.0.113.9", serde_json::json!({})),
        )
        .await;
        assert_eq!(response["statusCode"], 200, "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(!done.load(Ordering::SeqCst));
    }

    const TWO_PER_MINUTE_BY_IP: &[Policy] = &[Policy {
        name: "public",
        algorithm: Algorithm::SlidingWindow {
            limit: 2,
            window_ms: 60_000,
        },
        key: KeyKind::ClientIp,
        fail: FailMode::Open,
    }];

    #[tokio::test]
    async fn per_ip_limits_key_on_the_api_gateway_source_ip_not_x_forwarded_for() {
        let router = axum::Router::new()
            .route("/api/public", axum::routing::get(|| async { "hi" }))
            .layer(crate::ratelimit::layer(
                Arc::new(RateLimiter::local()),
                TWO_PER_MINUTE_BY_IP,
            ));
        let adapter = LambdaAdapter::new(stacked(router));
        // One client rotating forged X-Forwarded-For values: API Gateway
        // appends the real address, but the first entry is the client's.
        for (i, expected) in [(1, 200), (2, 200), (3, 429), (4, 429)] {
            let forged = serde_json::json!({"x-forwarded-for": format!("198.51.100.{i}")});
            let r = send(adapter.clone(), event("/api/public", "203.0.113.9", forged)).await;
            assert_eq!(r["statusCode"], expected, "request {i}: {r}");
        }
        // Another client (another source IP) has its own budget.
        let other = send(
            adapter.clone(),
            event("/api/public", "203.0.113.10", serde_json::json!({})),
        )
        .await;
        assert_eq!(other["statusCode"], 200, "{other}");
    }

    fn client_ip_of(event: serde_json::Value) -> Option<std::net::IpAddr> {
        let request = lambda_http::request::from_str(&event.to_string()).expect("an event");
        let (parts, _) = request.into_parts();
        crate::ratelimit::client_ip(&parts, crate::ratelimit::ClientIpSource::Auto)
    }

    #[test]
    fn client_ip_comes_from_the_request_context_of_each_event_kind() {
        let spoof = serde_json::json!({"x-forwarded-for": "198.51.100.1"});
        assert_eq!(
            client_ip_of(event("/x", "2001:db8::7", spoof.clone())),
            Some("2001:db8::7".parse().unwrap())
        );
        // No source IP in the context: no IP at all, never the header.
        assert_eq!(client_ip_of(event("/x", "", spoof.clone())), None);
        let rest = serde_json::json!({
            "resource": "/x", "path": "/x", "httpMethod": "GET",
            "headers": {"X-Forwarded-For": "198.51.100.1, 203.0.113.5"},
            "multiValueHeaders": {"X-Forwarded-For": ["198.51.100.1, 203.0.113.5"]},
            "queryStringParameters": null, "multiValueQueryStringParameters": null,
            "pathParameters": null, "stageVariables": null,
            "requestContext": {
                "accountId": "123456789012", "resourceId": "r", "stage": "prod",
                "requestId": "req-2", "httpMethod": "GET", "path": "/prod/x",
                "resourcePath": "/x", "apiId": "api",
                "identity": {"sourceIp": "203.0.113.5", "userAgent": "test"}
            },
            "body": null, "isBase64Encoded": false
        });
        assert_eq!(client_ip_of(rest), Some("203.0.113.5".parse().unwrap()));
        let alb = serde_json::json!({
            "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/t/1"}},
            "httpMethod": "GET", "path": "/x", "queryStringParameters": {},
            "headers": {"x-forwarded-for": "198.51.100.1, 203.0.113.6", "host": "alb"},
            "body": "", "isBase64Encoded": false
        });
        assert_eq!(client_ip_of(alb), Some("203.0.113.6".parse().unwrap()));
    }

    /// The payload `stagepass lambda template` gives each cron schedule,
    /// once CloudFormation has substituted the secret, reaches the cron
    /// route through the Lambda adapter and passes (or fails) its check.
    #[tokio::test]
    async fn a_schedule_event_carries_the_cron_secret_to_the_route() {
        let secret: crate::config::Secret = "cron-secret-0123456789".to_owned().into();
        let router = axum::Router::new().route(
            "/api/cron/cleanup",
            axum::routing::get(move |headers: http::HeaderMap| {
                let secret = secret.clone();
                async move { crate::cron::authorize(&headers, &secret).map(|()| "ran") }
            }),
        );
        let adapter = LambdaAdapter::new(stacked(router));
        let template = serde_json::to_string(&super::schedule_event(
            "/api/cron/cleanup",
            "Bearer ${CronSecret}",
        ))
        .expect("json");
        for (secret, status) in [
            ("cron-secret-0123456789", 200),
            ("wrong-secret-000000000", 401),
        ] {
            let input: serde_json::Value =
                serde_json::from_str(&template.replace("${CronSecret}", secret)).expect("json");
            let r = send(adapter.clone(), input).await;
            assert_eq!(r["statusCode"], status, "{r}");
        }
    }

    /// The event holds the whole body; the limit every function has on
    /// Vercel applies here too (413 problem, the handler never runs).
    #[tokio::test]
    async fn oversized_bodies_are_refused_as_on_vercel() {
        let router = axum::Router::new().route(
            "/api/echo",
            axum::routing::post(|body: String| async move { body.len().to_string() }),
        );
        let adapter = LambdaAdapter::new(stacked(router));
        for (size, status) in [(1024, 200), (crate::http::MAX_BODY_BYTES + 1, 413)] {
            let mut e = event("/api/echo", "203.0.113.9", serde_json::json!({}));
            e["requestContext"]["http"]["method"] = "POST".into();
            e["body"] = "x".repeat(size).into();
            let r = send(adapter.clone(), e).await;
            assert_eq!(r["statusCode"], status, "{size}: {}", r["body"]);
        }
    }
}
