//! `GET /api/v1/schedule?from=&to=` — the caller's calendar: one event per
//! class they host or attend, kept in sync with the class by the SQL
//! functions that change it (reschedule moves every copy, cancel and
//! withdrawal mark copies cancelled, each bumping `sequence`). Cancelled
//! events are listed too, so a client can remove them.
//!
//! The same events as a private iCalendar feed (`GET
//! /api/v1/schedule/feed/{token}.ics`, for phones and calendar apps, which
//! cannot send a bearer token): the URL carries a per-user secret made by
//! `POST /api/v1/schedule/feed-token`. Only its SHA-256 is stored, so the
//! URL is shown once; making a new one replaces it and the old URL stops
//! working (404).

use axum::extract::{FromRef, Path, Query, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use stagepass_platform::auth::{AuthUser, Verifier};
use stagepass_platform::config::{DbConfig, Loader};
use stagepass_platform::db;
use stagepass_platform::http::guard;
use stagepass_platform::http::{ApiError, ApiResult, FieldError};
use stagepass_platform::serve::{Function, Limits};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::UserApi;

pub const FUNCTION: Function = Function {
    name: "v1_schedule",
    limits: Limits::Authenticated,
    paths: &["/api/v1/schedule"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/schedule", get(schedule))
                .with_state(api),
        )
    },
};

pub const FEED: Function = Function {
    name: "v1_schedule_feed",
    limits: Limits::Public,
    paths: &["/api/v1/schedule/feed/{token}"],
    build: |l, r| {
        let pool = r.db(&DbConfig::load(l)?)?;
        Some(
            Router::new()
                .route("/api/v1/schedule/feed/{token}", get(feed))
                .with_state(pool),
        )
    },
};

pub const FEED_TOKEN: Function = Function {
    name: "v1_schedule_feed_token",
    limits: Limits::Authenticated,
    paths: &["/api/v1/schedule/feed-token"],
    build: |l, r| {
        let api = UserApi::load(l, r);
        let base = public_base_url(l);
        Some(
            Router::new()
                .route(
                    "/api/v1/schedule/feed-token",
                    post(rotate_feed_token).route_layer(from_fn(guard::no_body)),
                )
                .with_state(FeedTokenState {
                    api: api?,
                    public_base: base?,
                }),
        )
    },
};

/// The deployment's public URL, for links handed out (feed URLs).
fn public_base_url(l: &mut Loader) -> Option<url::Url> {
    l.url(
        "PUBLIC_BASE_URL",
        &["https"],
        "the deployment's public URL, e.g. https://api.stagepass.app",
    )
}

/// Longest range one request may ask for.
pub const MAX_RANGE_DAYS: i64 = 62;
/// Most events one response carries (a bound, not a page: 62 days of a
/// busy calendar fit well within it).
pub const MAX_EVENTS: i64 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ScheduleQuery {
    /// RFC 3339 instant, inclusive. Required (a missing one is reported
    /// with the other problems, hence `Option` here).
    #[param(required = true, value_type = DateTime<Utc>)]
    pub from: Option<String>,
    /// RFC 3339 instant, exclusive; after `from` and at most 62 days after it.
    #[param(required = true, value_type = DateTime<Utc>)]
    pub to: Option<String>,
}

stagepass_ledger::text_enum! {
    /// `app.calendar_events.status` (check `calendar_events_status_check`).
    pub enum CalendarEventStatus {
        /// The class takes place.
        Confirmed = "confirmed",
        /// The class was cancelled (or the seat given up).
        Cancelled = "cancelled",
    }
}

/// One calendar copy of a class.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct CalendarEvent {
    pub id: Uuid,
    /// `class`.
    pub source_kind: String,
    pub source_id: Uuid,
    /// `host` or `attendee`.
    pub role: String,
    pub title: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub status: CalendarEventStatus,
    /// Bumped on every change of the event.
    pub sequence: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Schedule {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Events overlapping [from, to), by start.
    pub events: Vec<CalendarEvent>,
    /// More than 1,000 events overlap the range; ask for a shorter one.
    pub truncated: bool,
}

impl ScheduleQuery {
    /// Both bounds, in order, at most [`MAX_RANGE_DAYS`] apart; every
    /// problem reported at once.
    fn parse(&self) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
        let mut errors = Vec::new();
        let from = instant(&mut errors, "from", self.from.as_deref());
        let to = instant(&mut errors, "to", self.to.as_deref());
        if let (Some(from), Some(to)) = (from, to) {
            if to <= from {
                errors.push(problem("to", "must be after from"));
            } else if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
                errors.push(problem("to", "at most 62 days after from"));
            }
        }
        match (from, to) {
            (Some(from), Some(to)) if errors.is_empty() => Ok((from, to)),
            _ => Err(ApiError::Validation(errors)),
        }
    }
}

fn problem(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

fn instant(errors: &mut Vec<FieldError>, field: &str, raw: Option<&str>) -> Option<DateTime<Utc>> {
    let Some(raw) = raw else {
        errors.push(problem(field, "required (RFC 3339)"));
        return None;
    };
    match DateTime::parse_from_rfc3339(raw) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            errors.push(problem(field, "must be an RFC 3339 date-time"));
            None
        }
    }
}

/// The caller's calendar events overlapping [from, to).
#[utoipa::path(get, path = "/api/v1/schedule", tag = "schedule", security(("bearer" = [])),
    params(ScheduleQuery),
    responses((status = 200, body = Schedule), (status = 400, body = crate::openapi::Problem)))]
pub async fn schedule(
    State(api): State<UserApi>,
    user: AuthUser,
    query: Result<Query<ScheduleQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Schedule>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (from, to) = q.parse()?;
    // One statement as the caller (`app.read_schedule`, under RLS; ADR 0020).
    let mut events = db::traced_read(
        sqlx::query_as::<_, CalendarEvent>("select * from app.read_schedule($1, $2, $3, $4)")
            .bind(db::claims_text(user.claims()))
            .bind(from)
            .bind(to)
            .bind(MAX_EVENTS + 1)
            .fetch_all(&api.pool),
    )
    .await?;
    let max = usize::try_from(MAX_EVENTS).unwrap_or(usize::MAX);
    let truncated = events.len() > max;
    events.truncate(max);
    Ok(Json(Schedule {
        from,
        to,
        events,
        truncated,
    }))
}

#[derive(Clone)]
pub struct FeedTokenState {
    api: UserApi,
    public_base: url::Url,
}

impl FromRef<FeedTokenState> for std::sync::Arc<Verifier> {
    fn from_ref(s: &FeedTokenState) -> std::sync::Arc<Verifier> {
        s.api.verifier.clone()
    }
}

/// A new private feed URL.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FeedToken {
    /// Subscribe to this URL in a calendar app (`webcal://` works too).
    /// Shown once: only a hash of its secret is kept.
    pub url: String,
    pub created_at: DateTime<Utc>,
}

/// Bytes of randomness in a feed token (256 bits).
const FEED_TOKEN_BYTES: usize = 32;

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Makes the caller's feed URL, replacing any earlier one (which stops
/// working at once).
#[utoipa::path(post, path = "/api/v1/schedule/feed-token", tag = "schedule",
    security(("bearer" = [])),
    responses((status = 201, body = FeedToken)))]
pub async fn rotate_feed_token(
    State(s): State<FeedTokenState>,
    user: AuthUser,
) -> ApiResult<(http::StatusCode, Json<FeedToken>)> {
    let mut secret = [0u8; FEED_TOKEN_BYTES];
    getrandom::fill(&mut secret)
        .map_err(|e| ApiError::internal(std::io::Error::other(e.to_string())))?;
    let token = URL_SAFE_NO_PAD.encode(secret);
    let mut tx = crate::me::begin_seen(&s.api.pool, user.claims()).await?;
    let created_at: DateTime<Utc> = sqlx::query_scalar("select app.rotate_calendar_feed($1)")
        .bind(token_hash(&token))
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let url = s
        .public_base
        .join(&format!("/api/v1/schedule/feed/{token}.ics"))
        .map_err(ApiError::internal)?;
    Ok((
        http::StatusCode::CREATED,
        Json(FeedToken {
            url: url.to_string(),
            created_at,
        }),
    ))
}

/// The private iCalendar feed (no bearer token: the URL is the secret).
#[utoipa::path(get, path = "/api/v1/schedule/feed/{token}", tag = "schedule",
    params(("token" = String, Path, description = "the secret of the feed URL, optionally followed by `.ics`")),
    responses((status = 200, description = "RFC 5545 calendar", content_type = "text/calendar"),
              (status = 404, description = "unknown or rotated token", body = crate::openapi::Problem)))]
pub async fn feed(State(pool): State<PgPool>, Path(token): Path<String>) -> ApiResult<Response> {
    let token = token.strip_suffix(".ics").unwrap_or(&token);
    // Anything but a token we could have made is unknown, without a query.
    let well_formed = URL_SAFE_NO_PAD
        .decode(token)
        .is_ok_and(|bytes| bytes.len() == FEED_TOKEN_BYTES);
    if !well_formed {
        return Err(ApiError::NotFound);
    }
    let hash = token_hash(token);
    let mut tx = db::begin_service(&pool).await?;
    let exists: bool = sqlx::query_scalar("select app.calendar_feed_exists($1)")
        .bind(&hash)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Err(ApiError::NotFound);
    }
    let events =
        sqlx::query_as::<_, crate::ical::FeedEvent>("select * from app.calendar_feed_events($1)")
            .bind(&hash)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok((
        [
            (http::header::CONTENT_TYPE, "text/calendar; charset=utf-8"),
            (
                http::header::CONTENT_DISPOSITION,
                "inline; filename=\"stagepass.ics\"",
            ),
            // Private data: no shared cache; calendar apps poll anyway.
            (http::header::CACHE_CONTROL, "private, no-store"),
        ],
        crate::ical::calendar(&events),
    )
        .into_response())
}
