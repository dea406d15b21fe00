//! Shared test support: a fresh migrated database and every function of
//! [`stagepass_routes::FUNCTIONS`] composed into one in-process app, wrapped
//! in the same layers a deployed function uses.
//!
//! Each test file uses a subset of these helpers.
//!
//! Tests using a database run on the multi-thread runtime
//! (`#[tokio::test(flavor = "multi_thread")]`): dropping a `TestDb` blocks
//! while it closes its pools, and the pools return connections through
//! tasks spawned on the test's runtime, which a current-thread runtime
//! blocked in that drop could never run.
#![allow(dead_code)]

pub mod classes;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::Value;
use stagepass_platform::auth::testing::{mint_hs256, mint_hs256_claims, standard_claims};
use stagepass_platform::config::Loader;
use stagepass_platform::serve::{Resources, compose};
use stagepass_platform::testing::TestDb;
use tower::ServiceExt as _;
use uuid::Uuid;

/// Unused host: HS256 tokens never need the JWKS.
pub const SUPABASE_URL: &str = "http://127.0.0.1:9";
/// `{SUPABASE_URL}/auth/v1`, the issuer the verifier expects.
pub const ISSUER: &str = "http://127.0.0.1:9/auth/v1";
pub const JWT_SECRET: &str = "stagepass-routes-tests-jwt-secret-0123456789";
/// Standard Webhooks secret: base64 of `stagepass-test-hook-secret-32by!`.
pub const HOOK_SECRET: &str = "v1,whsec_c3RhZ2VwYXNzLXRlc3QtaG9vay1zZWNyZXQtMzJieSE=";
/// A different, valid secret (base64 of `another-wrong-hook-secret-32byte`).
pub const WRONG_HOOK_SECRET: &str = "v1,whsec_YW5vdGhlci13cm9uZy1ob29rLXNlY3JldC0zMmJ5dGU=";
pub const ALLOWED_ORIGIN: &str = "https://app.stagepass.test";
pub const ORIGIN_PATTERN: &str = "https://stagepass-*-team.vercel.app";

/// The full test environment for a database URL.
pub fn test_env(database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("APP_ENV", "test".to_owned()),
        ("SUPABASE_URL", SUPABASE_URL.to_owned()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("AUTH_HOOK_SECRET", HOOK_SECRET.to_owned()),
        ("ALLOWED_ORIGINS", ALLOWED_ORIGIN.to_owned()),
        ("ALLOWED_ORIGIN_PATTERN", ORIGIN_PATTERN.to_owned()),
        ("STRIPE_SECRET_KEY", STRIPE_SECRET_KEY.to_owned()),
        ("STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET.to_owned()),
        (
            "STRIPE_CONNECT_WEBHOOK_SECRET",
            STRIPE_CONNECT_WEBHOOK_SECRET.to_owned(),
        ),
        ("APP_BASE_URL", APP_BASE_URL.to_owned()),
        // Nothing listens here; tests that talk to Stripe start localstripe
        // and use `TestApp::with_env`.
        ("STRIPE_API_BASE", "http://127.0.0.1:9".to_owned()),
        ("CRON_SECRET", CRON_SECRET.to_owned()),
        ("PUBLIC_BASE_URL", PUBLIC_BASE_URL.to_owned()),
        // Ably and QStash cannot run here: nothing listens at these bases
        // (delivery fails and is retried later); tests of realtime and jobs
        // point them at a recording fake with `TestApp::with_env`.
        ("ABLY_API_KEY", ABLY_API_KEY.to_owned()),
        ("ABLY_API_BASE", "http://127.0.0.1:9".to_owned()),
        ("QSTASH_TOKEN", QSTASH_TOKEN.to_owned()),
        ("QSTASH_CURRENT_SIGNING_KEY", QSTASH_CURRENT_KEY.to_owned()),
        ("QSTASH_NEXT_SIGNING_KEY", QSTASH_NEXT_KEY.to_owned()),
        ("QSTASH_URL", "http://127.0.0.1:9".to_owned()),
        ("AGORA_APP_ID", AGORA_APP_ID.to_owned()),
        ("AGORA_APP_CERTIFICATE", AGORA_APP_CERTIFICATE.to_owned()),
        (
            "AGORA_NOTIFICATION_SECRET",
            AGORA_NOTIFICATION_SECRET.to_owned(),
        ),
    ]
}

/// Agora's own test inputs (reference §1.2): tokens are checked by
/// decoding them with this certificate.
pub const AGORA_APP_ID: &str = "970CA35de60c44645bbae8a215061b33";
pub const AGORA_APP_CERTIFICATE: &str = "5CFd2fd1755d40ecb72977518be15d3b";

pub const AGORA_NOTIFICATION_SECRET: &str = "agora-ncs-secret-for-tests-0123";

pub const PUBLIC_BASE_URL: &str = "https://api.stagepass.test";
/// `name:secret`; the secret signs realtime tokens.
pub const ABLY_API_KEY: &str = "testapp.testkey:ably-test-secret";
pub const ABLY_SECRET: &str = "ably-test-secret";
pub const QSTASH_TOKEN: &str = "qstash-test-token";
pub const QSTASH_CURRENT_KEY: &str = "sig_current_test_signing_key";
pub const QSTASH_NEXT_KEY: &str = "sig_next_test_signing_key";

pub const STRIPE_SECRET_KEY: &str = "sk_test_stagepass_routes_tests";
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_stagepass_routes_tests_secret";
pub const STRIPE_CONNECT_WEBHOOK_SECRET: &str = "whsec_stagepass_routes_tests_connect";
pub const APP_BASE_URL: &str = "https://app.stagepass.test";
pub const CRON_SECRET: &str = "cron-secret-for-tests-0123456789";

pub fn loader(env: &[(&'static str, String)]) -> Loader {
    Loader::from_map(env.iter().cloned())
}

/// A signed-in test user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// The database and the composed app.
pub struct TestApp {
    pub db: TestDb,
    pub router: Router,
    pub resources: Resources,
}

impl TestApp {
    pub async fn new() -> TestApp {
        Self::with_env(&[]).await
    }

    /// Rate limits off: for tests of the ledger that send many money
    /// requests per second as one user (the limits have their own tests).
    pub async fn unlimited() -> TestApp {
        Self::with_env(&[("RATE_LIMITS", "off".to_owned())]).await
    }

    /// The test environment with some variables replaced or added.
    pub async fn with_env(overrides: &[(&'static str, String)]) -> TestApp {
        Self::on(TestDb::new().await, overrides).await
    }

    /// On a database exactly as migrations leave it (no test clock:
    /// `app.now()` is the wall clock, as in production; ADR 0014).
    pub async fn production() -> TestApp {
        Self::on(TestDb::production().await, &[]).await
    }

    async fn on(db: TestDb, overrides: &[(&'static str, String)]) -> TestApp {
        let mut env = test_env(&db.app_url());
        for (k, v) in overrides {
            env.retain(|(name, _)| name != k);
            env.push((k, v.clone()));
        }
        let mut resources = Resources::with_pool(db.app_pool.clone());
        // One time for the app and the database: `db.advance_clock` moves both.
        resources.clock = db.clock.clone();
        let (router, failures) = compose(stagepass_routes::FUNCTIONS, || loader(&env), &resources);
        assert!(
            failures.is_empty(),
            "every function must build with the test environment: {:?}",
            failures
                .iter()
                .map(|(name, e)| format!("{name}: {e}"))
                .collect::<Vec<_>>()
        );
        TestApp {
            db,
            router,
            resources,
        }
    }

    /// Sends a request through the whole stack, in process.
    pub async fn send(&self, req: Request<Body>) -> TestResponse {
        send(&self.router, req).await
    }

    pub fn request(&self, method: Method, path: &str) -> Req<'_> {
        Req {
            app: &self.router,
            builder: Request::builder().method(method).uri(path),
            body: Body::empty(),
        }
    }

    pub fn get(&self, path: &str) -> Req<'_> {
        self.request(Method::GET, path)
    }

    pub fn patch(&self, path: &str) -> Req<'_> {
        self.request(Method::PATCH, path)
    }

    pub fn put(&self, path: &str) -> Req<'_> {
        self.request(Method::PUT, path)
    }

    pub fn post(&self, path: &str) -> Req<'_> {
        self.request(Method::POST, path)
    }

    /// A token for a brand-new user id (not yet in the database).
    pub fn new_user(&self) -> User {
        let id = Uuid::new_v4();
        let email = format!("u{}@example.test", id.simple());
        User {
            id,
            token: token_for(id, Some(&email)),
            email,
        }
    }

    /// A new user who has been seen once (`GET /api/v1/me`), so their row exists.
    pub async fn signed_in_user(&self) -> User {
        let user = self.new_user();
        let r = self.get("/api/v1/me").bearer(&user.token).send().await;
        assert_eq!(r.status, StatusCode::OK, "first sight failed: {}", r.text());
        user
    }

    /// Sets a role as the operator would (superuser, `app.operator_set_role`);
    /// creates the user row when missing.
    pub async fn set_role(&self, id: Uuid, role: &str) {
        sqlx::query("select app.operator_set_role($1, $2, 'tests', 'fixture')")
            .bind(id)
            .bind(role)
            .execute(&self.db.admin_pool)
            .await
            .expect("operator_set_role");
    }

    /// An admin user (seen once, then promoted by the operator).
    pub async fn admin(&self) -> User {
        let user = self.signed_in_user().await;
        self.set_role(user.id, "admin").await;
        user
    }

    /// The role stored for a user, read as superuser.
    pub async fn role_of(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar("select role from app.users where id = $1")
            .bind(id)
            .fetch_optional(&self.db.admin_pool)
            .await
            .expect("read role")
    }

    /// Number of audit rows about `user_id`.
    pub async fn role_change_count(&self, user_id: Uuid) -> i64 {
        sqlx::query_scalar("select count(*) from app.role_changes where user_id = $1")
            .bind(user_id)
            .fetch_one(&self.db.admin_pool)
            .await
            .expect("count role_changes")
    }

    pub async fn total_role_changes(&self) -> i64 {
        sqlx::query_scalar("select count(*) from app.role_changes")
            .fetch_one(&self.db.admin_pool)
            .await
            .expect("count role_changes")
    }
}

/// An HS256 access token as Supabase issues it, for `sub` = `id`.
pub fn token_for(id: Uuid, email: Option<&str>) -> String {
    mint_hs256(JWT_SECRET, ISSUER, id, email, 3600)
}

/// Standard claims for `id`, to be edited before [`sign_claims`].
pub fn claims_for(id: Uuid, email: Option<&str>, ttl_seconds: i64) -> Value {
    standard_claims(ISSUER, id, email, ttl_seconds)
}

pub fn sign_claims(claims: &Value) -> String {
    mint_hs256_claims(JWT_SECRET, claims)
}

/// A request being built.
pub struct Req<'a> {
    app: &'a Router,
    builder: http::request::Builder,
    body: Body,
}

impl Req<'_> {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// The TCP peer (what the dev server's `ConnectInfo` gives): the client
    /// IP of per-IP limits, which in-process requests otherwise lack.
    pub fn peer(mut self, peer: &str) -> Self {
        let addr: std::net::SocketAddr = peer.parse().expect("ip:port");
        self.builder = self.builder.extension(axum::extract::ConnectInfo(addr));
        self
    }

    pub fn origin(self, origin: &str) -> Self {
        self.header("origin", origin)
    }

    /// A JSON body with `Content-Type: application/json`.
    pub fn json(self, body: &Value) -> Self {
        self.raw_body("application/json", serde_json::to_vec(body).expect("JSON"))
    }

    pub fn raw_body(mut self, content_type: &str, body: impl Into<Bytes>) -> Self {
        self.builder = self.builder.header(header::CONTENT_TYPE, content_type);
        self.body = Body::from(body.into());
        self
    }

    pub async fn send(self) -> TestResponse {
        let req = self.builder.body(self.body).expect("valid request");
        send(self.app, req).await
    }
}

pub async fn send(router: &Router, req: Request<Body>) -> TestResponse {
    let response = match router.clone().oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// One header's value (panics when it is not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header is not text"))
    }

    /// Every value of a header, joined with ", ".
    pub fn header_all(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("header is not text"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Asserts a problem response with this status and code whose
    /// `request_id` is the `Request-Id` header; returns the body.
    #[track_caller]
    pub fn assert_problem(&self, status: StatusCode, code: &str) -> Value {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "problem content type"
        );
        let body = self.json();
        assert_eq!(body["code"], code, "problem code; body: {body}");
        assert_eq!(body["status"], status.as_u16(), "problem status member");
        let request_id = self.header("request-id").expect("Request-Id header");
        assert_eq!(
            body["request_id"].as_str(),
            Some(request_id),
            "problem request_id must equal the Request-Id header"
        );
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: every 401 carries a challenge.
            let challenge = self
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("401 {code} without WWW-Authenticate"));
            assert!(
                challenge.ends_with(r#"realm="stagepass""#)
                    || challenge.contains(r#"realm="stagepass", error="#),
                "WWW-Authenticate {challenge:?}"
            );
        }
        body
    }

    /// The `field` of the first validation error.
    pub fn first_error_field(&self) -> String {
        let body = self.json();
        body["errors"][0]["field"]
            .as_str()
            .unwrap_or_else(|| panic!("no errors[0].field in {body}"))
            .to_owned()
    }
}

// ---- Ledger helpers for money tests (all as the superuser) ----

/// Credits `tokens` to a user's wallet the way a purchase does (a balanced
/// journal from Stripe clearing).
pub async fn fund(app: &TestApp, user: Uuid, tokens: i64) {
    sqlx::query(
        "select ledger.post('purchase', $1, \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $2)], \
           array[-$3::bigint, $3::bigint], null)",
    )
    .bind(format!("test-{}", Uuid::new_v4()))
    .bind(user)
    .bind(tokens)
    .execute(&app.db.admin_pool)
    .await
    .expect("fund");
}

/// A user's wallet balance.
pub async fn wallet(app: &TestApp, user: Uuid) -> i64 {
    sqlx::query_scalar(
        "select balance from ledger.balances where kind = 'wallet' and owner_id = $1 \
         and reference is null",
    )
    .bind(user)
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("wallet")
}

pub async fn journal_count(app: &TestApp, kind: &str) -> i64 {
    sqlx::query_scalar("select count(*) from ledger.journals where kind = $1")
        .bind(kind)
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("count")
}

/// SPEC §2 invariants 1–3 over the whole database.
pub async fn assert_ledger_clean(app: &TestApp) {
    let mut conn = app.db.admin_pool.acquire().await.expect("conn");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "ledger invariants violated: {report:?}");
}
