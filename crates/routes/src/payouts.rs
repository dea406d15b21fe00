//! Creator payouts through Stripe Connect Express (SPEC §3 "Payouts",
//! issue 12, ADR 0019, docs/PAYOUTS.md).
//!
//! - `GET /api/v1/me/payout-account`: the creator's account, what Stripe
//!   still needs, what could be paid and when; `POST` the same path: a fresh
//!   onboarding link (the Express account is created once, on demand).
//! - `POST /api/v1/me/payout-requests`: "pay me in the next cycle"
//!   (`Idempotency-Key`, 3 per hour, minimum 1,000 tokens).
//! - `GET /api/v1/me/payouts`, `/api/v1/me/payouts/{id}` (with its
//!   statement) and `/api/v1/me/payouts/{id}/earnings` (the period's
//!   earnings as CSV).
//! - `PUT /api/v1/admin/payout-holds/{creator_id}`: an admin holds or
//!   releases a creator's payouts (logged).
//! - `GET /api/cron/payouts` (hourly; the run starts at 02:00 UTC on the 1st
//!   and 15th): freezes statements, holds tokens and queues one
//!   `payout-transfer` job per creator; looks up transfers whose answer was
//!   never recorded.
//! - `POST /api/jobs/payout-transfer` (QStash): creates one creator's
//!   transfer with the key `payout:{creator}:{cycle}` and records it with
//!   the ledger move in one transaction.
//! - `POST /api/webhooks/stripe-connect`: events of connected accounts.
//!
//! Behind the `payouts` feature flag (seeded off) for creators' routes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Path, Query, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stagepass_integrations::stripe::webhook::Event;
use stagepass_integrations::stripe::{
    self, CreateAccountLink, CreateExpressAccount, CreateTransfer, StripeClient, StripeError,
};
use stagepass_ledger::payouts::{
    self, AccountState, AttemptAction, AttemptPayout, BankPayout, Payout, PayoutAccount,
    PayoutError, PayoutRequest, PayoutStatus, PayoutSummary, TransfersCapability,
};
use stagepass_ledger::{Cents, UserId};
use stagepass_platform::auth::{AuthUser, Verifier};
use stagepass_platform::config::{
    AppLinksConfig, DbConfig, ExposeSecret, Loader, Secret, StripeApiConfig,
    StripeConnectWebhookConfig,
};
use stagepass_platform::db;
use stagepass_platform::flags::{Feature, FeatureKey, FlagCache};
use stagepass_platform::http::{ApiError, ApiResult, JsonBody, codes, guard};
use stagepass_platform::idempotency::{Idempotency, IdempotencyKey, PAYOUT_TTL_HOURS};
use stagepass_platform::ratelimit::{SignatureGate, SignedSource};
use stagepass_platform::serve::{Function, Limits, PlatformHandle, Resources};
use stagepass_platform::time::Clock;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::UserApi;
use crate::outbox::Outbox;
use crate::problems::OrProblem;

/// The `payouts` feature flag (migration 18 seeds it off).
pub struct PayoutsFlag;

impl FeatureKey for PayoutsFlag {
    const KEY: &'static str = "payouts";
}

type PayoutsUser = Feature<PayoutsFlag>;

const ACCOUNT_PATH: &str = "/api/v1/me/payout-account";
const REQUESTS_PATH: &str = "/api/v1/me/payout-requests";
const HISTORY_PATH: &str = "/api/v1/me/payouts";
const ITEM_PATH: &str = "/api/v1/me/payouts/{id}";
const EARNINGS_PATH: &str = "/api/v1/me/payouts/{id}/earnings";
const HOLDS_PATH: &str = "/api/v1/admin/payout-holds/{id}";
const CRON_PATH: &str = "/api/cron/payouts";
/// The transfer job's public path (QStash calls it).
pub const JOB_PATH: &str = "/api/jobs/payout-transfer";
const CONNECT_WEBHOOK_PATH: &str = "/api/webhooks/stripe-connect";

/// Stripe's default live-mode limit is 25 requests/s per endpoint; the
/// transfers are paced below it, across every instance (a row in Postgres),
/// so that jitter between instances never crosses it.
pub const TRANSFERS_PER_SECOND: f64 = 23.0;
/// A transfer job waits at most this long for its slot; later ones come
/// back (a delayed message) rather than outlive the function.
const MAX_PACE_WAIT: Duration = Duration::from_secs(8);
/// Retries of an answer we did not see (5xx, timeout, 429) start here and
/// double, up to an hour.
const FIRST_RETRY: Duration = Duration::from_secs(30);
const LAST_RETRY: Duration = Duration::from_secs(3600);
/// A held payout whose last attempt is older than this, with no recorded
/// answer, is looked up at Stripe by the hourly run.
const RECONCILE_QUIET: Duration = Duration::from_secs(600);
/// Opt-ins frozen per transaction of the run.
const FREEZE_BATCH: i32 = 500;
/// The run stops starting batches after this long (a function has 15 s);
/// the next hourly run that day continues (2,000 creators take ~5 s).
const FREEZE_BUDGET: Duration = Duration::from_secs(8);
/// Largest page of `GET /api/v1/me/payouts`.
pub const MAX_PAGE: i64 = 50;

/// The Stripe side of the payout functions.
#[derive(Clone)]
pub struct Connect {
    pub stripe: StripeClient,
    /// The key is a live one: events must be `livemode` too.
    pub livemode: bool,
}

impl Connect {
    pub fn load(l: &mut Loader, r: &Resources) -> Option<Connect> {
        let c = StripeApiConfig::load(l)?;
        let key = c.secret_key.expose_secret();
        let livemode = key.starts_with("sk_live_") || key.starts_with("rk_live_");
        Some(Connect {
            stripe: StripeClient::new(c.api_base, c.secret_key, r.http()),
            livemode,
        })
    }
}

#[derive(Clone)]
pub struct AccountApi {
    pub api: UserApi,
    pub connect: Connect,
    pub app_base_url: url::Url,
}

impl FromRef<AccountApi> for Arc<Verifier> {
    fn from_ref(s: &AccountApi) -> Arc<Verifier> {
        s.api.verifier.clone()
    }
}

impl FromRef<AccountApi> for Arc<FlagCache> {
    fn from_ref(s: &AccountApi) -> Arc<FlagCache> {
        s.api.flags.clone()
    }
}

pub const ACCOUNT: Function = Function {
    name: "v1_me_payout_account",
    limits: Limits::Authenticated,
    paths: &[ACCOUNT_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r);
        let connect = Connect::load(l, r);
        let links = AppLinksConfig::load(l);
        Some(
            Router::new()
                .route(
                    ACCOUNT_PATH,
                    get(my_payout_account)
                        .post(onboarding_link)
                        .route_layer(from_fn(guard::no_body)),
                )
                .with_state(AccountApi {
                    api: api?,
                    connect: connect?,
                    app_base_url: links?.app_base_url,
                }),
        )
    },
};

pub const REQUESTS: Function = Function {
    name: "v1_me_payout_requests",
    limits: Limits::PayoutRequest,
    paths: &[REQUESTS_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(
                    REQUESTS_PATH,
                    post(request_payout).route_layer(from_fn(guard::no_body)),
                )
                .with_state(api),
        )
    },
};

pub const HISTORY: Function = Function {
    name: "v1_me_payouts",
    limits: Limits::Authenticated,
    paths: &[HISTORY_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(HISTORY_PATH, get(my_payouts))
                .with_state(api),
        )
    },
};

pub const ITEM: Function = Function {
    name: "v1_me_payouts_id",
    limits: Limits::Authenticated,
    paths: &[ITEM_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(ITEM_PATH, get(my_payout))
                .with_state(api),
        )
    },
};

pub const EARNINGS: Function = Function {
    name: "v1_me_payouts_earnings",
    limits: Limits::Authenticated,
    paths: &[EARNINGS_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(EARNINGS_PATH, get(payout_earnings_csv))
                .with_state(api),
        )
    },
};

pub const HOLDS: Function = Function {
    name: "v1_admin_payout_holds",
    limits: Limits::Authenticated,
    paths: &[HOLDS_PATH],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(HOLDS_PATH, put(set_payout_hold))
                .with_state(api),
        )
    },
};

/// The run's and the job's state: the pool, Stripe, the outbox.
#[derive(Clone)]
pub struct RunState {
    pub pool: PgPool,
    pub connect: Connect,
    pub outbox: Outbox,
}

pub const CRON: Function = Function {
    name: "cron_payouts",
    limits: Limits::Signed(SignedSource::VercelCron),
    paths: &[CRON_PATH],
    build: |l, r| {
        let cron = crate::cron::cron_state(l, r);
        let connect = Connect::load(l, r);
        let outbox = Outbox::load(l, r, cron.as_ref().map(|c| c.pool.clone()));
        let (cron, connect, outbox) = (cron?, connect?, outbox?);
        Some(
            Router::new()
                .route(CRON_PATH, get(payouts_cron))
                .with_state(CronRunState {
                    secret: cron.secret,
                    run: RunState {
                        pool: cron.pool,
                        connect,
                        outbox,
                    },
                }),
        )
    },
};

#[derive(Clone)]
pub struct CronRunState {
    secret: Secret,
    run: RunState,
}

pub const JOB: Function = Function {
    name: "jobs_payout_transfer",
    limits: Limits::Signed(SignedSource::Qstash),
    paths: &[JOB_PATH],
    build: |l, r| {
        let jobs = crate::jobs::JobState::load(l, r);
        let connect = Connect::load(l, r);
        let (jobs, connect) = (jobs?, connect?);
        Some(
            Router::new()
                .route(JOB_PATH, post(payout_transfer_job))
                .with_state(JobRunState {
                    run: RunState {
                        pool: jobs.pool().clone(),
                        connect,
                        outbox: jobs.outbox().clone(),
                    },
                    jobs,
                }),
        )
    },
};

#[derive(Clone)]
pub struct JobRunState {
    jobs: crate::jobs::JobState,
    run: RunState,
}

pub const CONNECT_WEBHOOK: Function = Function {
    name: "webhooks_stripe_connect",
    limits: Limits::Signed(SignedSource::Stripe),
    paths: &[CONNECT_WEBHOOK_PATH],
    build: |l, r| {
        let db = DbConfig::load(l);
        let hook = StripeConnectWebhookConfig::load(l);
        let livemode = StripeApiConfig::load(l).map(|c| {
            let key = c.secret_key.expose_secret();
            key.starts_with("sk_live_") || key.starts_with("rk_live_")
        });
        let pool = db.and_then(|db| r.db(&db));
        let outbox = Outbox::load(l, r, pool.clone());
        Some(
            Router::new()
                .route(CONNECT_WEBHOOK_PATH, post(connect_webhook))
                .with_state(ConnectWebhookState {
                    pool: pool?,
                    secret: hook?.webhook_secret,
                    livemode: livemode?,
                    clock: r.clock.clone(),
                    outbox: outbox?,
                }),
        )
    },
};

#[derive(Clone)]
pub struct ConnectWebhookState {
    pool: PgPool,
    secret: Secret,
    livemode: bool,
    clock: Clock,
    outbox: Outbox,
}

fn stripe_unavailable(e: &StripeError) -> ApiError {
    tracing::warn!(error = %e, "a Stripe Connect call failed");
    ApiError::Unavailable(
        codes::PAYMENT_PROVIDER_UNAVAILABLE,
        "the payment provider did not answer; try again".into(),
    )
}

// ---------------------------------------------------------------------------
// The creator's routes.

/// The creator's payout account and what could be paid.
#[derive(Debug, Serialize, ToSchema)]
pub struct PayoutAccountView {
    /// `null` until the creator starts onboarding.
    pub account: Option<PayoutAccount>,
    /// Payouts are sent: the `transfers` capability is active and no admin
    /// holds them.
    pub eligible: bool,
    pub summary: PayoutSummary,
}

/// The caller's payout account (creators only): onboarding state, what
/// Stripe still needs (`currently_due`, `past_due`, the deadline), what
/// could be paid now, and the cycle an opt-in counts for.
#[utoipa::path(get, path = "/api/v1/me/payout-account", tag = "payouts", security(("bearer" = [])),
    responses((status = 200, body = PayoutAccountView),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "creator_required, feature_disabled", body = crate::openapi::Problem)))]
pub async fn my_payout_account(
    State(s): State<AccountApi>,
    feature: PayoutsUser,
) -> ApiResult<Json<PayoutAccountView>> {
    let user = feature.0;
    let mut tx = db::begin_user(&s.api.pool, user.claims()).await?;
    let summary = payouts::summary(&mut tx).await.or_problem()?;
    let account = payouts::my_account(&mut tx).await.or_problem()?;
    tx.commit().await?;
    let eligible = !summary.held
        && account
            .as_ref()
            .is_some_and(|a| a.transfers == TransfersCapability::Active);
    Ok(Json(PayoutAccountView {
        account,
        eligible,
        summary,
    }))
}

/// A single-use link to Stripe's hosted onboarding. Never stored or logged.
#[derive(Debug, Serialize, ToSchema)]
pub struct OnboardingLink {
    /// Open it in the browser now: it expires within minutes and works once.
    pub url: String,
    pub expires_at: i64,
    pub stripe_account_id: String,
}

/// A fresh onboarding link (creators only). The Express account is created
/// the first time (one per creator, whatever the concurrency); every call
/// mints a new single-use link. `refresh_url` is the web app's page that
/// signs the creator in again and calls this once more.
#[utoipa::path(post, path = "/api/v1/me/payout-account", tag = "payouts", security(("bearer" = [])),
    responses((status = 200, body = OnboardingLink),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "creator_required, feature_disabled", body = crate::openapi::Problem),
              (status = 503, description = "payment_provider_unavailable", body = crate::openapi::Problem)))]
pub async fn onboarding_link(
    State(s): State<AccountApi>,
    feature: PayoutsUser,
) -> ApiResult<Response> {
    let user = feature.0;
    let mut tx = db::begin_user(&s.api.pool, user.claims()).await?;
    let existing = payouts::my_account_id(&mut tx).await.or_problem()?;
    tx.commit().await?;
    let account = match existing {
        Some(id) => id,
        None => {
            let params = CreateExpressAccount {
                email: None,
                country: "US".to_owned(),
                metadata: BTreeMap::from([("creator_id".to_owned(), user.id().to_string())]),
            };
            // One key per creator: concurrent first onboardings get one
            // account from Stripe (and the first row wins here anyway).
            let key = format!("connect_account:{}", user.id());
            let created = s
                .connect
                .stripe
                .create_express_account(&params, &key)
                .await
                .map_err(|e| stripe_unavailable(&e))?;
            let mut tx = db::begin_user(&s.api.pool, user.claims()).await?;
            let stored = payouts::record_account(&mut tx, &created.id, s.connect.livemode)
                .await
                .or_problem()?;
            tx.commit().await?;
            stored
        }
    };
    let page = |p: &str| {
        s.app_base_url
            .join(p)
            .map(|u| u.to_string())
            .map_err(|_| ApiError::Unavailable(codes::MISCONFIGURED, "APP_BASE_URL".into()))
    };
    let link = s
        .connect
        .stripe
        .create_account_link(&CreateAccountLink {
            account: account.clone(),
            refresh_url: page("/payouts/onboarding/refresh")?,
            return_url: page("/payouts/onboarding/return")?,
        })
        .await
        .map_err(|e| stripe_unavailable(&e))?;
    let body = OnboardingLink {
        url: link.url().to_owned(),
        expires_at: link.expires_at,
        stripe_account_id: account,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

const REQUEST_ROUTE: &str = "POST /api/v1/me/payout-requests";

/// The creator asks to be paid in the next cycle: the 1st or the 15th,
/// whichever comes first after this instant (an opt-in after 06:00 UTC on a
/// cycle day counts for the next one). Refused below 1,000 payable tokens.
/// An open opt-in is returned rather than duplicated (`created: false`).
#[utoipa::path(post, path = "/api/v1/me/payout-requests", tag = "payouts", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    responses((status = 201, body = PayoutRequest),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "creator_required, feature_disabled", body = crate::openapi::Problem),
              (status = 409, description = "idempotency_in_progress", body = crate::openapi::Problem),
              (status = 422, description = "below_payout_minimum, idempotency_key_reused", body = crate::openapi::Problem),
              (status = 429, body = crate::openapi::Problem)))]
pub async fn request_payout(
    State(api): State<UserApi>,
    feature: PayoutsUser,
    platform: PlatformHandle,
    key: IdempotencyKey,
) -> ApiResult<Response> {
    let user = feature.0;
    let idempotency = Idempotency::new(
        user.id(),
        REQUEST_ROUTE,
        key,
        &serde_json::Value::Null,
        PAYOUT_TTL_HOURS,
    )?;
    crate::idempotent::run(
        &api,
        &user,
        &platform,
        &idempotency,
        StatusCode::CREATED,
        |conn| {
            Box::pin(async move {
                let request = payouts::request(conn, Uuid::now_v7()).await.or_problem()?;
                serde_json::to_value(&request).map_err(ApiError::internal)
            })
        },
    )
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// 1–50, default 24 (a year of cycles).
    #[param(minimum = 1, maximum = 50)]
    pub limit: Option<i64>,
}

/// The caller's payouts (history), newest cycle first, each with its
/// statement.
#[utoipa::path(get, path = "/api/v1/me/payouts", tag = "payouts", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = [Payout]),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem)))]
pub async fn my_payouts(
    State(api): State<UserApi>,
    feature: PayoutsUser,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Payout>>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(24);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 50"));
    }
    let user = feature.0;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let list = payouts::mine(&mut tx, limit).await.or_problem()?;
    tx.commit().await?;
    Ok(Json(list))
}

/// One of the caller's payouts and its statement: the period's earnings by
/// source, what was carried over, what was paid and where it stands.
#[utoipa::path(get, path = "/api/v1/me/payouts/{id}", tag = "payouts", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the payout's id")),
    responses((status = 200, body = Payout),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn my_payout(
    State(api): State<UserApi>,
    feature: PayoutsUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Payout>> {
    let id = crate::parse_uuid("id", &id)?;
    let user = feature.0;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let payout = payouts::get(&mut tx, id).await.or_problem()?;
    tx.commit().await?;
    Ok(Json(payout))
}

/// The period's earnings of one of the caller's payouts, one line per
/// earning (CSV, RFC 4180): `earned_at,source,reference,tokens,cents`.
#[utoipa::path(get, path = "/api/v1/me/payouts/{id}/earnings", tag = "payouts", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the payout's id")),
    responses((status = 200, content_type = "text/csv", body = String),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn payout_earnings_csv(
    State(api): State<UserApi>,
    feature: PayoutsUser,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = crate::parse_uuid("id", &id)?;
    let user = feature.0;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let payout = payouts::get(&mut tx, id).await.or_problem()?;
    let rows = payouts::earnings(&mut tx, id).await.or_problem()?;
    tx.commit().await?;
    let mut csv = String::from("earned_at,source,reference,tokens,cents\r\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{}\r\n",
            r.earned_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            csv_field(&r.source),
            csv_field(&r.reference),
            r.tokens,
            r.cents
        ));
    }
    let name = format!(
        "attachment; filename=\"stagepass-earnings-{}.csv\"",
        payout.cycle
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, name),
            (header::CACHE_CONTROL, "private, no-store".to_owned()),
        ],
        csv,
    )
        .into_response())
}

/// One CSV field: quoted when it holds a comma, quote or line break, and
/// never starting with a spreadsheet formula character.
fn csv_field(raw: &str) -> String {
    let guarded = if raw.starts_with(['=', '+', '-', '@']) {
        format!("'{raw}")
    } else {
        raw.to_owned()
    };
    if guarded.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

// ---------------------------------------------------------------------------
// Admin holds.

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    /// `true` holds the creator's payouts, `false` releases them.
    pub held: bool,
    /// Why (1–500 characters; logged with the admin's id).
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HoldChange {
    pub creator_id: Uuid,
    pub held: bool,
    /// False when it already was so (nothing logged).
    pub changed: bool,
}

fn check_reason(reason: &str) -> ApiResult<()> {
    let chars = reason.chars().count();
    if reason.trim().is_empty() || chars > 500 || reason.chars().any(char::is_control) {
        return Err(ApiError::field(
            "reason",
            "must be 1–500 characters without control characters",
        ));
    }
    Ok(())
}

async fn set_hold(
    api: &UserApi,
    user: &AuthUser,
    id: &str,
    hold: bool,
    reason: &str,
) -> ApiResult<Json<HoldChange>> {
    let creator = crate::parse_uuid("id", id)?;
    check_reason(reason)?;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let changed = payouts::set_hold(&mut tx, UserId::new(creator), hold, reason)
        .await
        .or_problem()?;
    tx.commit().await?;
    Ok(Json(HoldChange {
        creator_id: creator,
        held: hold,
        changed,
    }))
}

/// An admin holds a creator's payouts (`held: true`: none is frozen or sent
/// until released) or releases them (`held: false`). Logged (who, when,
/// why) in `app.payout_hold_log`.
#[utoipa::path(put, path = "/api/v1/admin/payout-holds/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the creator's id")),
    request_body = HoldRequest,
    responses((status = 200, body = HoldChange),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, body = crate::openapi::Problem),
              (status = 403, description = "admin_required", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn set_payout_hold(
    State(api): State<UserApi>,
    user: AuthUser,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<HoldRequest>,
) -> ApiResult<Json<HoldChange>> {
    set_hold(&api, &user, &id, body.held, &body.reason).await
}

// ---------------------------------------------------------------------------
// The run (cron) and the transfer job.

/// What one run of `/api/cron/payouts` did.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct PayoutRun {
    /// The cycle under way, if today is a cycle day after 02:00 UTC.
    pub cycle: Option<chrono::NaiveDate>,
    /// Statements frozen (one transfer job queued each).
    pub frozen: i64,
    /// Opt-ins left open, by reason (carried over to a later run or cycle).
    pub skipped: BTreeMap<String, i64>,
    /// Cents the platform had available at Stripe before freezing.
    pub platform_available_cents: Option<i64>,
    /// Held payouts found sent at Stripe and recorded now.
    pub reconciled: i64,
    /// Payouts whose transfer job was queued again.
    pub requeued: i64,
    /// Lookups Stripe did not answer (tried again next hour).
    pub lookups_failed: i64,
}

/// Freezes what is due (within the platform's available balance) and
/// reconciles what was sent but not recorded. Safe to run concurrently and
/// again.
pub async fn run_payouts(s: &RunState) -> ApiResult<PayoutRun> {
    let mut run = PayoutRun::default();
    let mut tx = db::begin_service(&s.pool).await?;
    run.cycle = sqlx::query_scalar("select app.payout_cycle_running()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let due: bool = match run.cycle {
        Some(cycle) => {
            let mut tx = db::begin_service(&s.pool).await?;
            let due = sqlx::query_scalar(
                "select exists (select 1 from app.payout_requests \
                  where payout_id is null and cycle <= $1)",
            )
            .bind(cycle)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            due
        }
        None => false,
    };
    if due {
        // The platform's balance is checked up front: a payout is frozen
        // only while the available balance, less what is in flight, covers it.
        let balance = s
            .connect
            .stripe
            .retrieve_balance()
            .await
            .map_err(|e| stripe_unavailable(&e))?;
        let available = balance.available_in("usd");
        run.platform_available_cents = Some(available);
        let started = std::time::Instant::now();
        while started.elapsed() < FREEZE_BUDGET {
            let mut tx = db::begin_service(&s.pool).await?;
            let in_flight = payouts::in_flight(&mut tx).await.or_problem()?;
            let budget = Cents::new(available.saturating_sub(in_flight.get()).max(0));
            let frozen = payouts::freeze(&mut tx, FREEZE_BATCH, Some(budget))
                .await
                .or_problem()?;
            tx.commit().await?;
            let n = frozen.len();
            for f in frozen {
                if f.payout_id.is_some() {
                    run.frozen += 1;
                } else {
                    *run.skipped.entry(f.outcome).or_default() += 1;
                }
            }
            if n < usize::try_from(FREEZE_BATCH).unwrap_or(usize::MAX) {
                break;
            }
        }
    }
    let mut tx = db::begin_service(&s.pool).await?;
    let stale = payouts::to_reconcile(&mut tx, RECONCILE_QUIET, 100)
        .await
        .or_problem()?;
    tx.commit().await?;
    for p in stale {
        if p.status == PayoutStatus::Held && p.attempts > 0 {
            let group = format!("payout:{}", p.id);
            let found = match s.connect.stripe.list_transfers(&group).await {
                Ok(found) => found,
                Err(e) => {
                    // One failed lookup does not stop the others; the next
                    // hourly run looks again.
                    tracing::warn!(error = %e, payout = %p.id, "a payout lookup failed");
                    run.lookups_failed += 1;
                    continue;
                }
            };
            if let Some(t) = found.first() {
                let mut tx = db::begin_service(&s.pool).await?;
                payouts::record_sent(&mut tx, p.id, &t.id, Cents::new(t.amount), &t.destination)
                    .await
                    .or_problem()?;
                tx.commit().await?;
                run.reconciled += 1;
                continue;
            }
        }
        let mut tx = db::begin_service(&s.pool).await?;
        payouts::requeue(&mut tx, p.id, Duration::ZERO)
            .await
            .or_problem()?;
        tx.commit().await?;
        run.requeued += 1;
    }
    Ok(run)
}

#[utoipa::path(get, path = "/api/cron/payouts", tag = "cron", security(("cron" = [])),
    responses((status = 200, body = PayoutRun),
              (status = 401, body = crate::openapi::Problem),
              (status = 503, description = "payment_provider_unavailable", body = crate::openapi::Problem)))]
pub async fn payouts_cron(
    State(s): State<CronRunState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
) -> ApiResult<Json<PayoutRun>> {
    gate.admit(stagepass_platform::cron::authorize(&headers, &s.secret))
        .await?;
    let run = run_payouts(&s.run).await?;
    if run.frozen > 0 || run.reconciled > 0 || run.requeued > 0 {
        s.run.outbox.kick(&platform);
    }
    Ok(Json(run))
}

/// What one transfer attempt did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferOutcome {
    /// The transfer exists and is recorded (now).
    Sent,
    /// Sent (or reversed, or abandoned) before: nothing to do.
    AlreadyDone,
    /// The next attempt is not due yet.
    NotDue,
    /// Another delivery of this payout is running.
    Busy,
    /// No pacing slot soon enough: queued again shortly.
    Paced,
    /// Stripe refused; the tokens are back in the wallet until the retry.
    Released,
    /// The answer was not seen (5xx, timeout, rate limit): retried later
    /// with the same key; the tokens stay held.
    Retrying,
    /// Given up: retries ran out, or the tokens were spent meanwhile.
    Abandoned,
}

/// Whether a Stripe error is a refusal (the transfer was not made and will
/// not be by resending) rather than an answer we did not see.
fn is_refusal(e: &StripeError) -> bool {
    match e {
        StripeError::Api(api) => {
            (400..500).contains(&api.status)
                && ![401, 403, 409, 429].contains(&api.status)
                && api.type_ != "idempotency_error"
        }
        _ => false,
    }
}

/// Backoff of the `attempt`-th unseen answer.
fn retry_delay(attempt: i32, e: &StripeError) -> Duration {
    let exp = u32::try_from(attempt.clamp(1, 8) - 1).unwrap_or(0);
    let backoff = FIRST_RETRY.saturating_mul(2u32.saturating_pow(exp));
    let after = match e {
        StripeError::RateLimited {
            retry_after_seconds: Some(s),
        } => Duration::from_secs(*s),
        _ => Duration::ZERO,
    };
    backoff.max(after).min(LAST_RETRY)
}

/// One creator's transfer: the job's whole work. Exactly once whatever the
/// deliveries: the attempt is recorded before Stripe is asked; Stripe gets
/// the same idempotency key every time (and, after its 24 h window, a
/// lookup first); the transfer id is recorded in the transaction that
/// retires the tokens.
pub async fn transfer_payout(s: &RunState, payout: Uuid) -> ApiResult<TransferOutcome> {
    // 1. A slot under Stripe's rate limit, shared by every instance.
    let interval = Duration::from_secs_f64(1.0 / TRANSFERS_PER_SECOND);
    let mut tx = db::begin_service(&s.pool).await?;
    let wait = payouts::pace(&mut tx, "stripe:transfers", interval, MAX_PACE_WAIT)
        .await
        .or_problem()?;
    tx.commit().await?;
    let Some(wait) = wait else {
        let mut tx = db::begin_service(&s.pool).await?;
        payouts::requeue(&mut tx, payout, MAX_PACE_WAIT)
            .await
            .or_problem()?;
        tx.commit().await?;
        return Ok(TransferOutcome::Paced);
    };

    // 2. The attempt, committed before Stripe is asked.
    let mut tx = db::begin_service(&s.pool).await?;
    let begun = payouts::begin_attempt(&mut tx, payout).await;
    let (action, p) = match begun {
        Err(PayoutError::Busy) => return Ok(TransferOutcome::Busy),
        other => other.or_problem()?,
    };
    tx.commit().await?;
    match action {
        AttemptAction::Done => return Ok(TransferOutcome::AlreadyDone),
        AttemptAction::NotDue => return Ok(TransferOutcome::NotDue),
        AttemptAction::Abandoned => return Ok(TransferOutcome::Abandoned),
        AttemptAction::Send | AttemptAction::LookupThenSend => {}
    }
    tokio::time::sleep(wait).await;

    // 3. Stripe.
    let answer = match action {
        AttemptAction::LookupThenSend => {
            match s.connect.stripe.list_transfers(&p.transfer_group()).await {
                Ok(found) => match found.into_iter().next() {
                    Some(t) => Ok(t),
                    None => create_transfer(&s.connect.stripe, &p).await,
                },
                Err(e) => Err(e),
            }
        }
        _ => create_transfer(&s.connect.stripe, &p).await,
    };

    // 4. The answer, recorded.
    let mut tx = db::begin_service(&s.pool).await?;
    let outcome = match answer {
        Ok(t) => {
            payouts::record_sent(&mut tx, p.id, &t.id, Cents::new(t.amount), &t.destination)
                .await
                .or_problem()?;
            TransferOutcome::Sent
        }
        Err(e) => {
            let refused = is_refusal(&e);
            tracing::warn!(error = %e, payout = %p.id, refused, "a payout transfer failed");
            let status = payouts::record_failure(
                &mut tx,
                p.id,
                refused,
                &e.to_string(),
                retry_delay(p.attempts, &e),
            )
            .await
            .or_problem()?;
            match status {
                PayoutStatus::Released => TransferOutcome::Released,
                PayoutStatus::Abandoned => TransferOutcome::Abandoned,
                _ => TransferOutcome::Retrying,
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

async fn create_transfer(
    stripe: &StripeClient,
    p: &AttemptPayout,
) -> Result<stripe::Transfer, StripeError> {
    stripe
        .create_transfer(&transfer_params(p), &p.idempotency_key())
        .await
}

/// The transfer of a payout: the same parameters on every attempt (Stripe
/// refuses a reused key with other parameters). The statement is named in
/// `transfer_group` (the lookup key) and the metadata.
pub fn transfer_params(p: &AttemptPayout) -> CreateTransfer {
    CreateTransfer {
        amount_cents: p.amount_cents,
        currency: "usd".to_owned(),
        destination: p.stripe_account_id.clone(),
        transfer_group: p.transfer_group(),
        metadata: BTreeMap::from([
            ("payout_id".to_owned(), p.id.to_string()),
            ("creator_id".to_owned(), p.creator_id.to_string()),
            ("cycle".to_owned(), p.cycle.to_string()),
            ("tokens".to_owned(), p.tokens.to_string()),
        ]),
        description: Some(format!("Stagepass earnings, cycle {}", p.cycle)),
    }
}

/// A payout-transfer message: the payout to send.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayoutTransferMessage {
    pub payout_id: Uuid,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TransferJobOutcome {
    pub outcome: TransferOutcome,
}

/// QStash callback: one creator's transfer (see [`transfer_payout`]).
#[utoipa::path(post, path = "/api/jobs/payout-transfer", tag = "jobs",
    security(("qstash" = [])),
    request_body = PayoutTransferMessage,
    responses((status = 200, body = TransferJobOutcome),
              (status = 400, body = crate::openapi::Problem),
              (status = 401, description = "invalid_qstash_signature", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn payout_transfer_job(
    State(s): State<JobRunState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<TransferJobOutcome>> {
    gate.admit(s.jobs.verify(JOB_PATH, &headers, &body)).await?;
    let message = crate::jobs::message(
        "payout-transfer",
        serde_json::from_slice::<PayoutTransferMessage>(&body),
    )?;
    let outcome = transfer_payout(&s.run, message.payout_id).await?;
    s.run.outbox.kick(&platform);
    Ok(Json(TransferJobOutcome { outcome }))
}

// ---------------------------------------------------------------------------
// The Connect webhook.

#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectReceived {
    pub received: bool,
    /// This event id was applied before; nothing changed.
    pub duplicate: bool,
    /// What the event did: `applied`, `stale`, `unknown_account`,
    /// `wrong_mode`, `ignored`, …
    pub outcome: String,
}

/// Stripe's events of connected accounts (the Connect endpoint, its own
/// secret): `account.updated`, `capability.updated` (the `transfers`
/// capability gates payouts), `payout.paid|failed|canceled|updated` (bank
/// payouts). Verified on the raw body first; each event id applied once, in
/// the effect's transaction; an event of the other mode (test events reach
/// live endpoints) is recorded and ignored; an event older than one applied
/// is recorded and ignored.
#[utoipa::path(post, path = "/api/webhooks/stripe-connect", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "t=…,v1=…")),
    request_body(content = serde_json::Value, description = "a Stripe event of a connected account, verified on the raw bytes"),
    responses(
        (status = 200, body = ConnectReceived),
        (status = 401, description = "missing, bad or stale signature (`invalid_signature`)", body = crate::openapi::Problem),
        (status = 429, description = "too many bad signatures from this client IP (`unsigned`), or Stripe's own budget spent", body = crate::openapi::Problem),
        (status = 500, description = "the effect failed; Stripe retries", body = crate::openapi::Problem)))]
pub async fn connect_webhook(
    State(s): State<ConnectWebhookState>,
    platform: PlatformHandle,
    gate: SignatureGate,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<ConnectReceived>> {
    let verified = crate::webhooks::verify_signed(&s.secret, &s.clock, &headers, &body);
    let event = gate.admit(verified).await?;
    let mut tx = db::begin_service(&s.pool).await?;
    if !crate::webhooks::first_delivery(&mut tx, &event).await? {
        tx.commit().await?;
        return Ok(Json(ConnectReceived {
            received: true,
            duplicate: true,
            outcome: "duplicate".into(),
        }));
    }
    let outcome = if event.livemode != s.livemode {
        "wrong_mode".to_owned()
    } else {
        apply_connect(&mut tx, &event).await?
    };
    tx.commit().await?;
    s.outbox.kick(&platform);
    tracing::info!(event = %event.id, kind = %event.type_, %outcome, "stripe connect event applied");
    Ok(Json(ConnectReceived {
        received: true,
        duplicate: false,
        outcome,
    }))
}

fn object<T: serde::de::DeserializeOwned>(event: &Event) -> ApiResult<T> {
    serde_json::from_value(event.data.object.clone()).map_err(|e| {
        ApiError::Internal(format!("event {} of type {}: {e}", event.id, event.type_).into())
    })
}

fn capability(status: stripe::CapabilityStatus) -> TransfersCapability {
    match status {
        stripe::CapabilityStatus::Active => TransfersCapability::Active,
        stripe::CapabilityStatus::Inactive => TransfersCapability::Inactive,
        stripe::CapabilityStatus::Pending => TransfersCapability::Pending,
        stripe::CapabilityStatus::Unknown => TransfersCapability::Unknown,
    }
}

fn timestamp(seconds: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    seconds.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
}

/// The effect of one Connect event, in the caller's (service) transaction.
pub async fn apply_connect(conn: &mut sqlx::PgConnection, event: &Event) -> ApiResult<String> {
    match event.type_.as_str() {
        "account.updated" => {
            let a: stripe::Account = object(event)?;
            let req = a.requirements.unwrap_or_default();
            let future = a.future_requirements.unwrap_or_default();
            let state = AccountState {
                stripe_account_id: &a.id,
                event_created: event.created,
                details_submitted: a.details_submitted,
                payouts_enabled: a.payouts_enabled,
                transfers: Some(
                    a.capabilities
                        .transfers
                        .map_or(TransfersCapability::Inactive, capability),
                ),
                currently_due: req.currently_due,
                past_due: req.past_due,
                eventually_due: req.eventually_due,
                current_deadline: timestamp(req.current_deadline),
                disabled_reason: req.disabled_reason,
                future_currently_due: future.currently_due,
            };
            payouts::apply_account(conn, &state).await.or_problem()
        }
        "capability.updated" => {
            let c: stripe::Capability = object(event)?;
            if c.id != "transfers" {
                return Ok("ignored".into());
            }
            payouts::apply_capability(conn, &c.account, event.created, capability(c.status))
                .await
                .or_problem()
        }
        "payout.paid" | "payout.failed" | "payout.canceled" | "payout.updated" => {
            let Some(account) = event.account.as_deref() else {
                return Ok("ignored:not_connect".into());
            };
            let p: stripe::BankPayout = object(event)?;
            payouts::apply_bank_payout(
                conn,
                &BankPayout {
                    stripe_account_id: account,
                    payout_id: &p.id,
                    event_created: event.created,
                    status: &p.status,
                    amount_cents: p.amount,
                    currency: &p.currency,
                    failure_code: p.failure_code.as_deref(),
                    arrival: timestamp(Some(p.arrival_date)),
                },
            )
            .await
            .or_problem()
        }
        "transfer.reversed" => apply_transfer_reversed(conn, event).await,
        _ => Ok("ignored".into()),
    }
}

/// `transfer.reversed` (a platform event: the platform endpoint receives
/// it; the Connect endpoint applies it too if configured so): the reversed
/// tokens go back to the creator's wallet, once per cumulative amount.
pub async fn apply_transfer_reversed(
    conn: &mut sqlx::PgConnection,
    event: &Event,
) -> ApiResult<String> {
    let t: stripe::Transfer = object(event)?;
    payouts::apply_reversal(conn, &t.id, Cents::new(t.amount_reversed))
        .await
        .or_problem()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formula_safe() {
        assert_eq!(csv_field("tip"), "tip");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(csv_field("-2"), "'-2");
    }

    #[test]
    fn refusals_release_and_unseen_answers_hold() {
        let api = |status: u16, type_: &str| {
            StripeError::Api(Box::new(stripe::ApiError {
                status,
                type_: type_.to_owned(),
                code: None,
                decline_code: None,
                message: String::new(),
                param: None,
                request_id: None,
                retryable: status >= 500,
            }))
        };
        assert!(is_refusal(&api(400, "invalid_request_error")));
        assert!(!is_refusal(&api(400, "idempotency_error")));
        assert!(!is_refusal(&api(409, "invalid_request_error")));
        assert!(!is_refusal(&api(401, "invalid_request_error")));
        assert!(!is_refusal(&api(500, "api_error")));
        assert!(!is_refusal(&StripeError::Timeout));
        assert!(!is_refusal(&StripeError::RateLimited {
            retry_after_seconds: Some(2)
        }));
        assert_eq!(retry_delay(1, &StripeError::Timeout), FIRST_RETRY);
        assert_eq!(retry_delay(3, &StripeError::Timeout), FIRST_RETRY * 4);
        assert_eq!(retry_delay(20, &StripeError::Timeout), LAST_RETRY);
    }
}
