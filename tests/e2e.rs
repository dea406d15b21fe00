//! End-to-end tests: the compiled function binaries, started the way Vercel
//! starts them (`VERCEL_DEV_PORT`, the official `vercel_runtime` server),
//! spoken to over real HTTP, against a real Postgres database.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use support::{Function, env_for, mint};

#[tokio::test]
async fn health_answers_with_the_security_headers_and_the_runtime_ping() {
    let f = Function::start("health", &[]).await;
    let r = f.get("/api/health", None).await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["api-version"], "1");
    assert!(h.contains_key("request-id"));
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    // The runtime itself answers Vercel's ping.
    let ping = f.get("/_vercel/ping", None).await;
    assert_eq!(ping.status(), 200);
}

/// The stock `VercelLayer` streams JSON bodies as a separate write after the
/// headers; without `TCP_NODELAY` each keep-alive response then waits ~40 ms
/// for a delayed ACK. Our adapter sends one complete response per write, so
/// on one keep-alive connection every response arrives whole in the first
/// read — a structural check, not a timing assertion.
#[tokio::test]
async fn keep_alive_json_responses_arrive_in_one_piece() {
    let f = Function::start("health", &[]).await;
    let port = f.port;
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 16 * 1024];
        let started = std::time::Instant::now();
        for i in 0..50 {
            stream
                .write_all(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .expect("write");
            let n = stream.read(&mut buf).expect("read");
            let text = String::from_utf8_lossy(&buf[..n]);
            let (head, body) = text
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("request {i}: headers incomplete in first read: {text}"));
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().expect("length"))
                })
                .unwrap_or_else(|| panic!("request {i}: no content-length: {head}"));
            assert_eq!(
                body.len(),
                length,
                "request {i}: the body did not arrive with the headers (split write)"
            );
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        // Informational only (benchmarks prove speed): 50 requests on one
        // connection; a stalled adapter needs about 2 s here.
        eprintln!("50 keep-alive requests took {:?}", started.elapsed());
    })
    .await
    .expect("join");
}

#[tokio::test]
async fn me_creates_the_user_on_first_sight_and_requires_a_token() {
    let db = stagepass_platform::testing::TestDb::new().await;
    let env = env_for(&db);
    let f = Function::start("v1_me", &env).await;
    let user = uuid::Uuid::new_v4();
    let token = mint(user, Some("fan@example.com"));

    let r = f.get("/api/v1/me", Some(&token)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let me: Value = r.json().await.expect("json");
    assert_eq!(me["id"], user.to_string());
    assert_eq!(me["role"], "fan");
    assert_eq!(me["email"], "fan@example.com");

    let anonymous = f.get("/api/v1/me", None).await;
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = anonymous.json().await.expect("json");
    assert_eq!(problem["code"], "missing_token");

    let rows: i64 = sqlx::query_scalar("select count(*) from app.users")
        .fetch_one(&db.admin_pool)
        .await
        .expect("count");
    assert_eq!(rows, 1, "the 401 must not have created anything");
}

#[tokio::test]
async fn patch_me_through_the_binary_validates_and_updates() {
    let db = stagepass_platform::testing::TestDb::new().await;
    let f = Function::start("v1_me", &env_for(&db)).await;
    let token = mint(uuid::Uuid::new_v4(), None);
    let bad = f
        .send(
            reqwest::Method::PATCH,
            "/api/v1/me",
            Some(&token),
            Some(r#"{"handle":"ok_handle","role":"admin"}"#),
        )
        .await;
    assert_eq!(bad.status(), 400);
    let problem: Value = bad.json().await.expect("json");
    assert_eq!(problem["errors"][0]["field"], "role");

    let good = f
        .send(
            reqwest::Method::PATCH,
            "/api/v1/me",
            Some(&token),
            Some(r#"{"handle":"New_Handle"}"#),
        )
        .await;
    assert_eq!(good.status(), 200);
    let me: Value = good.json().await.expect("json");
    assert_eq!(me["handle"], "new_handle");
    assert_eq!(me["role"], "fan");
}

#[tokio::test]
async fn a_broken_environment_is_reported_whole_and_secrets_are_not_echoed() {
    let out = Function::run_to_exit(
        "v1_me",
        &[
            ("APP_ENV", "production"),
            ("SUPABASE_JWT_SECRET", "hunter2-too-short"),
            ("DATABASE_URL", "mysql://app:sup3rs3cret@db/x"),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "must exit 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for var in [
        "DATABASE_URL",
        "SUPABASE_URL",
        "SUPABASE_JWT_SECRET",
        "ALLOWED_ORIGINS",
    ] {
        assert!(stderr.contains(var), "{var} not reported: {stderr}");
    }
    assert!(!stderr.contains("hunter2"), "secret echoed: {stderr}");
    assert!(!stderr.contains("sup3rs3cret"), "secret echoed: {stderr}");
}

#[tokio::test]
async fn a_function_needs_only_its_own_settings() {
    // health uses no database and no Stripe: it starts with nothing set.
    let f = Function::start("health", &[("APP_ENV", "development")]).await;
    assert_eq!(f.get("/api/health", None).await.status(), 200);
}

#[tokio::test]
async fn readiness_is_503_when_the_database_is_down() {
    // Port 9 on loopback: nothing listens there.
    let f = Function::start(
        "health_ready",
        &[("DATABASE_URL", "postgres://stagepass_app@127.0.0.1:9/none")],
    )
    .await;
    let r = f.get("/api/health/ready", None).await;
    assert_eq!(r.status(), 503);
    let problem: Value = r.json().await.expect("json");
    assert_eq!(problem["code"], "database_unavailable");
}

/// A 5xx reaches a Sentry-compatible receiver (kent) with the request id and
/// the matched route, and without secrets. Skipped loudly only outside CI
/// when kent is not installed (`.ci/run` installs it).
#[tokio::test]
async fn server_errors_reach_sentry_with_request_id_and_without_secrets() {
    let Some(kent) = support::Kent::start().await else {
        return;
    };
    let f = Function::start(
        "health_ready",
        &[
            (
                "DATABASE_URL",
                "postgres://stagepass_app:pa55w0rd-secret@127.0.0.1:9/none",
            ),
            ("SENTRY_DSN", &kent.dsn()),
        ],
    )
    .await;
    let r = f.get("/api/health/ready", None).await;
    assert_eq!(r.status(), 503);
    let request_id = r.headers()["request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let events = kent.wait_for_events(1).await;
    let event = events
        .iter()
        .find(|e| e.to_string().contains(&request_id))
        .unwrap_or_else(|| panic!("no event with request id {request_id}: {events:?}"));
    let text = event.to_string();
    assert!(text.contains("/api/health/ready"), "route missing: {text}");
    assert!(!text.contains("pa55w0rd-secret"), "secret leaked: {text}");
}

/// Every function that reads or writes the database, as its own compiled
/// binary, answers one request that reaches Postgres — user routes, the
/// trust-level lookup of money routes, the crons, the outbox. Run as is, and
/// through PgBouncer in transaction mode by `scripts/ci/pgbouncer.sh`
/// (STAGEPASS_TEST_DB_PROXY), where it shows every binary's connection
/// settings and statements survive a transaction pooler.
#[tokio::test(flavor = "multi_thread")]
async fn every_database_function_binary_reaches_postgres() {
    const CRON_SECRET: &str = "cron-secret-for-e2e-tests-0123456789";
    let db = stagepass_platform::testing::TestDb::new().await;
    let mut env = env_for(&db);
    env.extend([
        ("CRON_SECRET", CRON_SECRET),
        ("STRIPE_SECRET_KEY", "sk_test_stagepass_e2e"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_stagepass_e2e_secret"),
        // Nothing listens here: no route below calls out to Stripe or Ably.
        ("STRIPE_API_BASE", "http://127.0.0.1:9"),
        ("ABLY_API_KEY", "testapp.testkey:ably-test-secret"),
        ("ABLY_API_BASE", "http://127.0.0.1:9"),
        ("PUBLIC_BASE_URL", "https://api.stagepass.test"),
        ("APP_BASE_URL", "https://app.stagepass.test"),
        (
            "STRIPE_CONNECT_WEBHOOK_SECRET",
            "whsec_stagepass_e2e_connect",
        ),
    ]);
    let token = mint(uuid::Uuid::new_v4(), Some("fan@example.com"));
    let nobody = uuid::Uuid::new_v4();
    let tip = format!(r#"{{"recipient_id":"{nobody}","amount":5}}"#);
    let role = r#"{"role":"creator"}"#;
    let class = format!("/api/v1/classes/{nobody}");
    let (enrol, me, cancel) = (
        format!("{class}/enrollments"),
        format!("{class}/enrollments/me"),
        format!("{class}/cancel"),
    );
    let admin = format!("/api/v1/admin/users/{nobody}/role");
    // Paid calls (ADR 0018), with their flag on: each answer comes from SQL.
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'calls'",
    )
    .execute(&db.admin_pool)
    .await
    .expect("calls flag on");
    // Payouts (ADR 0019), with their flag on.
    sqlx::query(
        "update app.feature_flags set enabled = true, rollout_basis_points = 10000 \
          where key = 'payouts'",
    )
    .execute(&db.admin_pool)
    .await
    .expect("payouts flag on");
    let payout = format!("/api/v1/me/payouts/{nobody}");
    let (payout_earnings, payout_hold) = (
        format!("{payout}/earnings"),
        format!("/api/v1/admin/payout-holds/{nobody}"),
    );
    let call_request = format!(r#"{{"creator_id":"{nobody}","media":"video"}}"#);
    let call = format!("/api/v1/calls/{nobody}");
    let (heartbeat, call_token, creator_settings) = (
        format!("{call}/heartbeat"),
        format!("{call}/token"),
        format!("/api/v1/creators/{nobody}/call-settings"),
    );
    use reqwest::Method;
    // (binary, method, path, body, expected status): each status is decided
    // by what the database holds (a fresh database: no classes, no funds).
    let cases: Vec<(&str, Method, &str, Option<&str>, u16)> = vec![
        ("health_ready", Method::GET, "/api/health/ready", None, 200),
        ("v1_me", Method::GET, "/api/v1/me", None, 200),
        (
            "v1_tokens_packages",
            Method::GET,
            "/api/v1/tokens/packages",
            None,
            200,
        ),
        (
            "v1_tokens_balance",
            Method::GET,
            "/api/v1/tokens/balance",
            None,
            200,
        ),
        (
            "v1_tokens_ledger",
            Method::GET,
            "/api/v1/tokens/ledger",
            None,
            200,
        ),
        ("v1_tips", Method::POST, "/api/v1/tips", Some(&tip), 422),
        (
            "v1_tokens_purchases",
            Method::POST,
            "/api/v1/tokens/purchases",
            // Recorded as pending in Postgres first; then Stripe (nothing
            // listens) is unavailable.
            Some(r#"{"package":"small"}"#),
            503,
        ),
        ("v1_classes", Method::GET, "/api/v1/classes", None, 200),
        ("v1_classes_id", Method::GET, &class, None, 404),
        ("v1_classes_enrollments", Method::POST, &enrol, None, 404),
        ("v1_classes_enrollments_me", Method::DELETE, &me, None, 404),
        ("v1_classes_cancel", Method::POST, &cancel, None, 404),
        (
            "v1_schedule",
            Method::GET,
            "/api/v1/schedule?from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z",
            None,
            200,
        ),
        (
            "v1_schedule_feed_token",
            Method::POST,
            "/api/v1/schedule/feed-token",
            None,
            201,
        ),
        (
            "v1_schedule_feed",
            Method::GET,
            "/api/v1/schedule/feed/0000000000000000000000000000000000000000000.ics",
            None,
            404,
        ),
        (
            "v1_realtime_token",
            Method::POST,
            "/api/v1/realtime/token",
            None,
            200,
        ),
        (
            "v1_calls",
            Method::POST,
            "/api/v1/calls",
            Some(&call_request),
            422,
        ),
        ("v1_calls_id", Method::GET, &call, None, 404),
        ("v1_calls_action", Method::POST, &heartbeat, None, 404),
        ("v1_calls_token", Method::POST, &call_token, None, 404),
        ("v1_me_calls", Method::GET, "/api/v1/me/calls", None, 200),
        (
            "v1_me_call_settings",
            Method::GET,
            "/api/v1/me/call-settings",
            None,
            404,
        ),
        (
            "v1_creators_call_settings",
            Method::GET,
            &creator_settings,
            None,
            404,
        ),
        // A fan is not paid out (decided in SQL); the history is theirs.
        (
            "v1_me_payout_account",
            Method::GET,
            "/api/v1/me/payout-account",
            None,
            403,
        ),
        (
            "v1_me_payout_requests",
            Method::POST,
            "/api/v1/me/payout-requests",
            None,
            403,
        ),
        (
            "v1_me_payouts",
            Method::GET,
            "/api/v1/me/payouts",
            None,
            200,
        ),
        ("v1_me_payouts_id", Method::GET, &payout, None, 404),
        (
            "v1_me_payouts_earnings",
            Method::GET,
            &payout_earnings,
            None,
            404,
        ),
        (
            "v1_admin_payout_holds",
            Method::PUT,
            &payout_hold,
            Some(r#"{"held":true,"reason":"e2e"}"#),
            403,
        ),
        ("v1_admin_users_role", Method::PUT, &admin, Some(role), 403),
        // Feature flags (ADR 0016): only a database admin may read or change them.
        (
            "v1_admin_flags",
            Method::GET,
            "/api/v1/admin/flags",
            None,
            403,
        ),
        (
            "v1_admin_flags_key",
            Method::PATCH,
            "/api/v1/admin/flags/calls",
            Some(r#"{"enabled":true,"reason":"e2e"}"#),
            403,
        ),
    ];
    for (binary, method, path, body, expected) in cases {
        let f = Function::start(binary, &env).await;
        let mut req = f
            .client()
            .request(method.clone(), f.url(path))
            .bearer_auth(&token)
            .header("idempotency-key", format!("e2e-{binary}"));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, expected, "{binary} {method} {path}: {text}");
    }
    for cron in [
        "ledger-audit",
        "cleanup",
        "reconcile-purchases",
        "settle-classes",
        "deliver-outbox",
        "bill-calls",
        "payouts",
    ] {
        let binary = format!("cron_{}", cron.replace('-', "_"));
        let f = Function::start(&binary, &env).await;
        let r = f
            .client()
            .get(f.url(&format!("/api/cron/{cron}")))
            .bearer_auth(CRON_SECRET)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{binary}: {text}");
    }
}

/// Agora's notification webhook through its binary: a signed notice is
/// applied (recorded) once; a forged one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_agora_webhook_binary_verifies_and_records_notices() {
    let db = stagepass_platform::testing::TestDb::new().await;
    let mut env = env_for(&db);
    env.push((
        "AGORA_NOTIFICATION_SECRET",
        support::AGORA_NOTIFICATION_SECRET,
    ));
    let f = Function::start("webhooks_agora", &env).await;
    let body = br#"{"noticeId":"e2e-1","productId":1,"eventType":104,"notifyMs":1,"payload":{"channelName":"call_none","uid":7,"clientSeq":1,"reason":2}}"#;
    let secret = support::AGORA_NOTIFICATION_SECRET.to_owned().into();
    let signature = stagepass_integrations::agora::notify::sign(body, &secret);
    let send = |sig: String| {
        f.client()
            .post(f.url("/api/webhooks/agora"))
            .header("content-type", "application/json")
            .header("agora-signature-v2", sig)
            .body(body.to_vec())
            .send()
    };
    let forged = send("0".repeat(64)).await.expect("request");
    assert_eq!(forged.status().as_u16(), 401);
    let first: serde_json::Value = send(signature.clone())
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(first["outcome"], "ignored", "{first}");
    let again: serde_json::Value = send(signature)
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(again["duplicate"], true, "{again}");
    let recorded: i64 = sqlx::query_scalar("select count(*) from app.agora_notices")
        .fetch_one(&db.admin_pool)
        .await
        .expect("notices");
    assert_eq!(recorded, 1);
}

/// The Stripe Connect webhook through its binary: a signed event of an
/// account that is not ours is recorded once (`unknown_account`); one signed
/// with the platform endpoint's secret is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_stripe_connect_webhook_binary_verifies_and_records_events() {
    const SECRET: &str = "whsec_stagepass_e2e_connect";
    let db = stagepass_platform::testing::TestDb::new().await;
    let mut env = env_for(&db);
    env.extend([
        ("STRIPE_SECRET_KEY", "sk_test_stagepass_e2e"),
        ("STRIPE_API_BASE", "http://127.0.0.1:9"),
        ("STRIPE_CONNECT_WEBHOOK_SECRET", SECRET),
    ]);
    let f = Function::start("webhooks_stripe_connect", &env).await;
    let body = br#"{"id":"evt_e2e_1","object":"event","type":"capability.updated","created":1,"livemode":false,"account":"acct_e2e","data":{"object":{"id":"transfers","object":"capability","account":"acct_e2e","status":"active","requested":true}}}"#;
    let now = chrono::Utc::now().timestamp();
    let send = |secret: &str| {
        let sig = stagepass_integrations::stripe::webhook::sign(body, secret, now).expect("sign");
        f.client()
            .post(f.url("/api/webhooks/stripe-connect"))
            .header("content-type", "application/json")
            .header("stripe-signature", sig)
            .body(body.to_vec())
            .send()
    };
    let forged = send("whsec_the_platform_endpoint").await.expect("request");
    assert_eq!(forged.status().as_u16(), 401);
    let first: serde_json::Value = send(SECRET)
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(first["outcome"], "unknown_account", "{first}");
    let again: serde_json::Value = send(SECRET)
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(again["duplicate"], true, "{again}");
}

/// The body of every envelope item kent received of type `transaction`.
fn transactions(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["payload"]["header"]["type"] == "transaction")
        .map(|e| &e["payload"]["body"])
        .collect()
}

/// With `SENTRY_TRACES_SAMPLE_RATE=1` a request becomes a Sentry transaction
/// named after its route, released as the deployed commit, whose spans are
/// the request's SQL statements (the `begin_user` settings included), with
/// no bound value (the token's e-mail) anywhere.
#[tokio::test]
async fn sampled_requests_reach_sentry_as_transactions_with_database_spans_and_the_release() {
    let Some(kent) = support::Kent::start().await else {
        return;
    };
    let db = stagepass_platform::testing::TestDb::new().await;
    let dsn = kent.dsn();
    let mut env = env_for(&db);
    env.extend([
        ("SENTRY_DSN", dsn.as_str()),
        ("SENTRY_TRACES_SAMPLE_RATE", "1"),
        ("VERCEL_GIT_COMMIT_SHA", "4f3c2b1a0e9d8c7b"),
    ]);
    let f = Function::start("v1_me", &env).await;
    let token = mint(uuid::Uuid::new_v4(), Some("traced-fan@example.com"));
    let r = f.get("/api/v1/me", Some(&token)).await;
    assert_eq!(r.status(), 200);
    // A write: a transaction of several statements.
    let r = f
        .client()
        .patch(f.url("/api/v1/me"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"display_name":"Traced"}"#)
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);

    let events = kent.wait_for_events(2).await;
    let found = transactions(&events);
    let named = |name: &str| {
        found
            .iter()
            .find(|t| t["transaction"] == name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} transaction arrived: {events:?}"))
    };
    let db_spans = |tx: &Value| -> Vec<String> {
        tx["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["op"] == "db.sql.query")
            .filter_map(|s| s["description"].as_str().map(str::to_owned))
            .collect()
    };
    // The read is one statement (issue 13): `app.read_me`, no BEGIN/COMMIT.
    let read = named("GET /api/v1/me");
    assert_eq!(read["release"], "stagepass@4f3c2b1a0e9d8c7b", "{read}");
    assert_eq!(read["contexts"]["trace"]["op"], "http.server", "{read}");
    // (A cold function also loads its flag cache once: not the read's. It
    // is a single statement too, with no transaction around it, also
    // through PgBouncer: ADR 0020.)
    let statements: Vec<String> = db_spans(read)
        .into_iter()
        .filter(|d| !d.contains("app.flag_snapshot"))
        .collect();
    assert_eq!(statements.len(), 1, "one statement: {statements:?}");
    assert!(statements[0].contains("app.read_me"), "{statements:?}");
    assert!(
        read["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["op"] == "db.connection" && s["description"] == "read_as_user"),
        "no span for the connection: {read}"
    );
    let tx = named("PATCH /api/v1/me");
    let db_spans = db_spans(tx);
    let spans = tx["spans"].as_array().cloned().unwrap_or_default();
    // The claims and role travel with `BEGIN` in one message (no statement
    // span of their own, and nothing of the claims in any span).
    assert!(
        !db_spans.iter().any(|d| d.contains("request.jwt.claims")),
        "the settings are part of BEGIN now: {db_spans:?}"
    );
    assert!(
        db_spans.iter().any(|d| d.eq_ignore_ascii_case("commit")),
        "the transaction's COMMIT is missing: {db_spans:?}"
    );
    // BEGIN is no statement event of its own: `db::begin_user` records
    // acquiring the connection and BEGIN (with the settings) instead.
    assert!(
        spans
            .iter()
            .any(|s| s["op"] == "db.connection" && s["description"] == "begin_user"),
        "no span for the connection and BEGIN: {spans:?}"
    );
    for t in [read, tx] {
        let text = t.to_string();
        assert!(
            !text.contains("traced-fan@example.com"),
            "a bound value leaked: {text}"
        );
        assert!(!text.contains(&token), "the token leaked: {text}");
    }
}

/// The default sample rate (unset, i.e. 0) sends no transaction: a request
/// that would have been traced is followed by a 5xx from another instance,
/// whose event is the marker that kent is receiving.
#[tokio::test]
async fn without_a_sample_rate_no_transaction_is_sent() {
    let Some(kent) = support::Kent::start().await else {
        return;
    };
    let db = stagepass_platform::testing::TestDb::new().await;
    let dsn = kent.dsn();
    let mut env = env_for(&db);
    env.extend([
        ("SENTRY_DSN", dsn.as_str()),
        ("SENTRY_TRACES_SAMPLE_RATE", "0"),
    ]);
    let traced = Function::start("health_ready", &env).await;
    assert_eq!(traced.get("/api/health/ready", None).await.status(), 200);
    let unset = Function::start("v1_me", &env[..env.len() - 1]).await;
    let token = mint(uuid::Uuid::new_v4(), None);
    assert_eq!(unset.get("/api/v1/me", Some(&token)).await.status(), 200);

    let broken = Function::start(
        "health_ready",
        &[
            (
                "DATABASE_URL",
                "postgres://stagepass_app:x@127.0.0.1:9/none",
            ),
            ("SENTRY_DSN", &dsn),
        ],
    )
    .await;
    assert_eq!(broken.get("/api/health/ready", None).await.status(), 503);
    let events = kent.wait_for_events(1).await;
    assert!(
        events
            .iter()
            .any(|e| e.to_string().contains("/api/health/ready")),
        "the marker event did not arrive: {events:?}"
    );
    // Anything the traced instances sent was sent before the marker's
    // request was even made; give stragglers a moment anyway.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = kent.wait_for_events(1).await;
    assert!(transactions(&events).is_empty(), "{events:?}");
}
