//! Paid 1:1 calls (SPEC §3 "Calls", issue 11, ADR 0018): a creator's call
//! settings, the request (money: `Idempotency-Key`, the creator's price
//! snapshotted in SQL), the creator's answer, joins and heartbeats that
//! drive per-minute billing, hanging up, and the Agora token of a party.
//!
//! Behind the `calls` feature flag (seeded off, ADR 0016). Every request is
//! one transaction under RLS; the rules live in the SQL functions of
//! `migrations/*_calls.sql`, `stagepass_ledger::calls` is their typed door,
//! and every change of state is told to both parties by `call.updated`
//! (transactional outbox) and can be re-read with `GET /api/v1/calls/{id}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, Path, Query, State};
use axum::middleware::from_fn;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use stagepass_integrations::agora::{self, AgoraCredentials, RtcTokenRequest};
use stagepass_ledger::calls::{
    self, Action, Call, CallError, CallMedia, CallSettings, CallStatus, MAX_PRICE_PER_MINUTE,
    MIN_PRICE_PER_MINUTE,
};
use stagepass_ledger::{CallId, UserId};
use stagepass_platform::auth::Verifier;
use stagepass_platform::config::AgoraConfig;
use stagepass_platform::db;
use stagepass_platform::flags::{Feature, FeatureKey, FlagCache};
use stagepass_platform::http::{ApiError, ApiResult, JsonBody, guard};
use stagepass_platform::idempotency::{DEFAULT_TTL_HOURS, Idempotency, IdempotencyKey};
use stagepass_platform::serve::{Function, Limits, PlatformHandle};
use stagepass_platform::time::Clock;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::UserApi;
use crate::problems::OrProblem;
use crate::retry;

/// The `calls` feature flag (migration 18 seeds it off).
pub struct CallsFlag;

impl FeatureKey for CallsFlag {
    const KEY: &'static str = "calls";
}

type CallsUser = Feature<CallsFlag>;

pub const REQUEST: Function = Function {
    name: "v1_calls",
    limits: Limits::Money,
    paths: &["/api/v1/calls"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/calls", post(request_call))
                .with_state(api),
        )
    },
};

pub const ITEM: Function = Function {
    name: "v1_calls_id",
    limits: Limits::Authenticated,
    paths: &["/api/v1/calls/{id}"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/calls/{id}", get(get_call))
                .with_state(api),
        )
    },
};

pub const ACTION: Function = Function {
    name: "v1_calls_action",
    limits: Limits::Authenticated,
    paths: &["/api/v1/calls/{id}/{action}"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route(
                    "/api/v1/calls/{id}/{action}",
                    post(call_action).route_layer(from_fn(guard::no_body)),
                )
                .with_state(api),
        )
    },
};

pub const TOKEN: Function = Function {
    name: "v1_calls_token",
    limits: Limits::Authenticated,
    paths: &["/api/v1/calls/{id}/token"],
    build: |l, r| {
        let api = UserApi::load(l, r);
        let agora = AgoraConfig::load(l).and_then(|c| {
            AgoraCredentials::new(&c.app_id, c.app_certificate)
                .inspect_err(|e| tracing::error!(error = %e, "Agora credentials refused"))
                .ok()
        });
        Some(
            Router::new()
                .route(
                    "/api/v1/calls/{id}/token",
                    post(call_token).route_layer(from_fn(guard::no_body)),
                )
                .with_state(TokenState {
                    api: api?,
                    agora: agora?,
                    clock: r.clock.clone(),
                }),
        )
    },
};

pub const MY_CALLS: Function = Function {
    name: "v1_me_calls",
    limits: Limits::Authenticated,
    paths: &["/api/v1/me/calls"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/me/calls", get(my_calls))
                .with_state(api),
        )
    },
};

pub const SETTINGS: Function = Function {
    name: "v1_me_call_settings",
    limits: Limits::Authenticated,
    paths: &["/api/v1/me/call-settings"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(
                    "/api/v1/me/call-settings",
                    get(my_call_settings).put(put_call_settings),
                )
                .with_state(api),
        )
    },
};

pub const CREATOR_SETTINGS: Function = Function {
    name: "v1_creators_call_settings",
    limits: Limits::Authenticated,
    paths: &["/api/v1/creators/{id}/call-settings"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route(
                    "/api/v1/creators/{id}/call-settings",
                    get(creator_call_settings),
                )
                .with_state(api),
        )
    },
};

const REQUEST_ROUTE: &str = "POST /api/v1/calls";
/// Largest page of `GET /api/v1/me/calls`.
pub const MAX_PAGE: i64 = 50;

fn parse_call(raw: &str) -> Result<CallId, ApiError> {
    crate::parse_uuid("id", raw).map(CallId::new)
}

/// A fan asks a creator for a call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The creator to call.
    pub creator_id: Uuid,
    /// `audio` or `video`.
    pub media: CallMedia,
}

/// The fan asks for a call. The price is the creator's current price,
/// snapshotted on the call (the request carries none). Refused when the
/// fan could not fund the first minutes (2 by default), is in debt, or is
/// over the daily spending limit; nothing is held until the creator
/// accepts.
#[utoipa::path(post, path = "/api/v1/calls", tag = "calls", security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    request_body = CallRequest,
    responses((status = 201, body = Call),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 409, description = "call_already_open, idempotency_in_progress", body = crate::openapi::Problem),
              (status = 422, description = "not_taking_calls, own_call, insufficient_funds, daily_limit_exceeded, account_in_debt, idempotency_key_reused", body = crate::openapi::Problem)))]
pub async fn request_call(
    State(api): State<UserApi>,
    feature: CallsUser,
    platform: PlatformHandle,
    key: IdempotencyKey,
    JsonBody(request): JsonBody<CallRequest>,
) -> ApiResult<Response> {
    let user = feature.0;
    let idempotency = Idempotency::new(user.id(), REQUEST_ROUTE, key, &request, DEFAULT_TTL_HOURS)?;
    let (creator, media) = (UserId::new(request.creator_id), request.media);
    crate::idempotent::run(
        &api,
        &user,
        &platform,
        &idempotency,
        StatusCode::CREATED,
        |conn| {
            Box::pin(async move {
                let call = calls::request(conn, CallId::new(Uuid::now_v7()), creator, media)
                    .await
                    .or_problem()?;
                serde_json::to_value(&call).map_err(ApiError::internal)
            })
        },
    )
    .await
}

/// One call the caller is a party to.
#[utoipa::path(get, path = "/api/v1/calls/{id}", tag = "calls", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the call's id")),
    responses((status = 200, body = Call),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn get_call(
    State(api): State<UserApi>,
    feature: CallsUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Call>> {
    let user = feature.0;
    let id = parse_call(&id)?;
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let call = calls::get(&mut tx, id).await.or_problem()?;
    tx.commit().await?;
    Ok(Json(call))
}

/// What a party does to a call (the last path segment).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CallAction {
    /// The creator accepts: the first minutes move from the fan's wallet
    /// into the call's escrow (422 and nothing moves if they cannot).
    Accept,
    /// The creator declines.
    Decline,
    /// The fan withdraws a request not answered yet.
    Cancel,
    /// The caller joined the channel; when both have, minute 1 starts and
    /// is charged.
    Join,
    /// The caller is still in the call (every 15–20 s). Charges the
    /// minutes that have started and tops the escrow up one minute ahead.
    Heartbeat,
    /// The caller hangs up: the started minute stays charged, the rest of
    /// the escrow goes back to the fan, now.
    HangUp,
}

impl CallAction {
    fn parse(raw: &str) -> Result<CallAction, ApiError> {
        serde_json::from_value(serde_json::Value::String(raw.to_owned())).map_err(|_| {
            ApiError::field(
                "action",
                "one of accept, decline, cancel, join, heartbeat, hang-up",
            )
        })
    }

    fn action(self) -> Action {
        match self {
            CallAction::Accept => Action::Accept,
            CallAction::Decline => Action::Decline,
            CallAction::Cancel => Action::Cancel,
            CallAction::Join => Action::Join,
            CallAction::Heartbeat => Action::Heartbeat,
            CallAction::HangUp => Action::HangUp,
        }
    }
}

/// A party acts on a call. Each action is one transaction and idempotent
/// by state: repeating one that already happened returns the call as it
/// is; one that no longer applies is 409 `call_state_conflict` (an ended
/// call tells a heartbeating client to leave).
#[utoipa::path(post, path = "/api/v1/calls/{id}/{action}", tag = "calls", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the call's id"),
           ("action" = CallAction, Path, description = "accept, decline (creator); cancel (fan); join, heartbeat, hang-up (either)")),
    responses((status = 200, body = Call),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "wrong_call_party, feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "call_state_conflict, call_rang_out, creator_busy", body = crate::openapi::Problem),
              (status = 422, description = "insufficient_funds, daily_limit_exceeded, account_in_debt (the fan's, on accept)", body = crate::openapi::Problem)))]
pub async fn call_action(
    State(api): State<UserApi>,
    feature: CallsUser,
    platform: PlatformHandle,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Call>> {
    let user = feature.0;
    let id = parse_call(&id)?;
    let action = CallAction::parse(&action)?.action();
    let (api, user) = (&api, &user);
    // Charges and refunds credit wallets a concurrent tip may hold.
    let call = retry::on_deadlock(|| async move {
        let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
        let call = match calls::act(&mut tx, id, action).await {
            Err(e) if e.is_deadlock() => return Err(retry::deadlocked(tx).await),
            // Rolled back before answering: the call's row lock is gone by
            // the time the client sees the refusal (a dropped transaction
            // rolls back a moment later, and the sweep skips locked calls).
            Err(e) => {
                tx.rollback().await?;
                return Err(e).or_problem().map_err(retry::Retry::Fail);
            }
            Ok(call) => call,
        };
        tx.commit().await?;
        Ok(call)
    })
    .await?;
    api.kick(&platform);
    // An end the action found is committed above; the caller still learns
    // that its action did not apply.
    calls::outcome(action, &call).or_problem()?;
    Ok(Json(call))
}

#[derive(Clone)]
pub struct TokenState {
    api: UserApi,
    agora: AgoraCredentials,
    clock: Clock,
}

impl FromRef<TokenState> for Arc<Verifier> {
    fn from_ref(s: &TokenState) -> Arc<Verifier> {
        s.api.verifier.clone()
    }
}

impl FromRef<TokenState> for Arc<FlagCache> {
    fn from_ref(s: &TokenState) -> Arc<FlagCache> {
        s.api.flags.clone()
    }
}

/// An Agora RTC token (AccessToken2, "007") for one party of one call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallToken {
    /// The project's App ID (public).
    pub app_id: String,
    /// The call's own channel: the token is valid for no other.
    pub channel: String,
    /// The caller's uid in the channel (server-assigned, never 0).
    pub uid: u32,
    pub token: String,
    /// When Agora drops the caller: the funded time plus a short grace.
    /// Ask again before then (after each top-up the funded time grows).
    pub expires_at: DateTime<Utc>,
    /// Until when the call is paid for.
    pub funded_until: DateTime<Utc>,
}

/// The caller's Agora token for the call: only for its two parties, only
/// while accepted or active, publisher role, joining and staying until the
/// funded time ends plus a grace (at most 2 h).
#[utoipa::path(post, path = "/api/v1/calls/{id}/token", tag = "calls", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the call's id")),
    responses((status = 200, body = CallToken),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "call_state_conflict: not accepted or active", body = crate::openapi::Problem)))]
pub async fn call_token(
    State(s): State<TokenState>,
    feature: CallsUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
) -> ApiResult<Json<CallToken>> {
    let user = feature.0;
    let id = parse_call(&id)?;
    let (api, user) = (&s.api, &user);
    let grant = retry::on_deadlock(|| async move {
        let mut tx = db::begin_user(&api.pool, user.claims()).await?;
        let grant = match calls::join_grant(&mut tx, id).await {
            Err(e) if e.is_deadlock() => return Err(retry::deadlocked(tx).await),
            Err(e) => {
                tx.rollback().await?;
                return Err(e).or_problem().map_err(retry::Retry::Fail);
            }
            Ok(grant) => grant,
        };
        tx.commit().await?;
        Ok(grant)
    })
    .await?;
    // Looking at the call may have charged a minute or ended it.
    s.api.kick(&platform);
    if !matches!(grant.status, CallStatus::Accepted | CallStatus::Active) {
        return Err(CallError::WrongState(format!(
            "the call is {}",
            grant.status
        )))
        .or_problem();
    }
    let funded_until = grant
        .funded_until
        .ok_or_else(|| ApiError::Internal("an accepted call without funded time".into()))?;
    let uid = u32::try_from(grant.uid)
        .map_err(|_| ApiError::Internal("an Agora uid outside u32".into()))?;
    // Durations by the database's clock; the issue time by ours (they move
    // together in tests; in production both are the real time).
    let funded_for = (funded_until - grant.issued_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    let grace = Duration::from_secs(u64::try_from(grant.grace_seconds).unwrap_or(0));
    let request = RtcTokenRequest::for_call(&grant.channel, uid, funded_for, grace)
        .map_err(ApiError::internal)?;
    let now = s.clock.now();
    let token = agora::rtc_token(&s.agora, &request, now).map_err(ApiError::internal)?;
    let expires_at =
        now + chrono::Duration::from_std(request.join_expires_in).map_err(ApiError::internal)?;
    Ok(Json(CallToken {
        app_id: s.agora.app_id().to_owned(),
        channel: grant.channel,
        uid,
        token,
        expires_at,
        funded_until,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MyCallsQuery {
    /// Only calls created before this instant (the last `created_at` of
    /// the previous page).
    pub before: Option<DateTime<Utc>>,
    /// 1–50, default 20.
    #[param(minimum = 1, maximum = 50)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallPage {
    pub calls: Vec<Call>,
}

/// The caller's calls, as fan or creator, newest first (a creator sees the
/// requests ringing for them here).
#[utoipa::path(get, path = "/api/v1/me/calls", tag = "calls", security(("bearer" = [])),
    params(MyCallsQuery),
    responses((status = 200, body = CallPage),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem)))]
pub async fn my_calls(
    State(api): State<UserApi>,
    feature: CallsUser,
    query: Result<Query<MyCallsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<CallPage>> {
    let user = feature.0;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 50"));
    }
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let found = calls::mine(&mut tx, q.before, limit).await.or_problem()?;
    tx.commit().await?;
    Ok(Json(CallPage { calls: found }))
}

/// A creator's call settings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallSettingsInput {
    /// Tokens per started minute, 1–10,000.
    #[schema(minimum = 1, maximum = 10000)]
    pub price_per_minute: i64,
    pub audio_enabled: bool,
    pub video_enabled: bool,
}

/// The caller's own call settings (404 until a creator sets them).
#[utoipa::path(get, path = "/api/v1/me/call-settings", tag = "calls", security(("bearer" = [])),
    responses((status = 200, body = CallSettings),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn my_call_settings(
    State(api): State<UserApi>,
    feature: CallsUser,
) -> ApiResult<Json<CallSettings>> {
    let user = feature.0;
    read_settings(&api, &user, UserId::new(user.id())).await
}

/// The creator sets their price per minute and which calls they take. A
/// new price applies to calls asked for from now on; a call keeps the
/// price it was asked at.
#[utoipa::path(put, path = "/api/v1/me/call-settings", tag = "calls", security(("bearer" = [])),
    request_body = CallSettingsInput,
    responses((status = 200, body = CallSettings),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "creator_required, feature_disabled", body = crate::openapi::Problem)))]
pub async fn put_call_settings(
    State(api): State<UserApi>,
    feature: CallsUser,
    JsonBody(input): JsonBody<CallSettingsInput>,
) -> ApiResult<Json<CallSettings>> {
    let user = feature.0;
    if !(MIN_PRICE_PER_MINUTE..=MAX_PRICE_PER_MINUTE).contains(&input.price_per_minute) {
        return Err(ApiError::field(
            "price_per_minute",
            "must be between 1 and 10000",
        ));
    }
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    let settings = calls::set_settings(
        &mut tx,
        input.price_per_minute,
        input.audio_enabled,
        input.video_enabled,
    )
    .await
    .or_problem()?;
    tx.commit().await?;
    Ok(Json(settings))
}

/// A creator's call settings, as their profile shows them (404 when the
/// user is not a creator or has set none).
#[utoipa::path(get, path = "/api/v1/creators/{id}/call-settings", tag = "calls", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the creator's user id")),
    responses((status = 200, body = CallSettings),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "feature_disabled", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem)))]
pub async fn creator_call_settings(
    State(api): State<UserApi>,
    feature: CallsUser,
    Path(id): Path<String>,
) -> ApiResult<Json<CallSettings>> {
    let user = feature.0;
    let creator = crate::parse_uuid("id", &id).map(UserId::new)?;
    read_settings(&api, &user, creator).await
}

async fn read_settings(
    api: &UserApi,
    user: &stagepass_platform::auth::AuthUser,
    creator: UserId,
) -> ApiResult<Json<CallSettings>> {
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    let settings = calls::settings_of(&mut tx, creator).await.or_problem()?;
    tx.commit().await?;
    settings.map(Json).ok_or(ApiError::NotFound)
}
