//! `GET /api/v1/schedule?from=&to=` — the caller's calendar: one event per
//! class they host or attend, kept in sync with the class by the SQL
//! functions that change it (reschedule moves every copy, cancel and
//! withdrawal mark copies cancelled, each bumping `sequence`). Cancelled
//! events are listed too, so a client can remove them.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::db;
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

/// Longest range one request may ask for.
pub const MAX_RANGE_DAYS: i64 = 62;
/// Most events one response carries (a bound, not a page: 62 days of a
/// busy calendar fit well within it).
pub const MAX_EVENTS: i64 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ScheduleQuery {
    /// RFC 3339 instant, inclusive. Required.
    pub from: Option<String>,
    /// RFC 3339 instant, exclusive; at most 62 days after `from`. Required.
    pub to: Option<String>,
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
    /// `confirmed` or `cancelled`.
    pub status: String,
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
    let mut tx = db::begin_user(&api.pool, user.claims()).await?;
    // RLS limits the rows to the caller's; the filter says so too, so the
    // index on (user_id, starts_at) serves it.
    let mut events = sqlx::query_as::<_, CalendarEvent>(
        "select id, source_kind, source_id, role, title, starts_at, ends_at, status, sequence, \
                updated_at \
         from app.calendar_events \
         where user_id = auth.uid() and starts_at < $2 and ends_at > $1 \
         order by starts_at, id limit $3",
    )
    .bind(from)
    .bind(to)
    .bind(MAX_EVENTS + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
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
