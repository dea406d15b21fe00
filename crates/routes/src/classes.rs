//! Paid live classes (SPEC §3): create, list, read, edit, enrol (pays into
//! escrow), withdraw (refund until the cut-off), cancel (refund everyone).
//!
//! Every request runs in one transaction under RLS; the rules live in the
//! SQL functions of `migrations/*_classes.sql` (capacity under the class
//! row's lock, ownership from `auth.uid()`, the cut-off in one place), and
//! `stagepass_ledger::classes` maps their refusals to problems. Enrolment
//! is idempotent like a tip: the key's record and the payment commit
//! together, refusals are rolled back to a savepoint and stored with the key.

use crate::problems::{IntoProblem, OrProblem};
use axum::extract::{Path, Query, State};
use axum::middleware::from_fn;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use stagepass_ledger::classes::{
    self, Cancellation, Class, ClassCursor, ClassFields, Enrollment, Withdrawal,
};
use stagepass_ledger::{ClassId, UserId};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::db;
use stagepass_platform::http::guard;
use stagepass_platform::http::{ApiError, ApiResult, FieldError, JsonBody, text};
use stagepass_platform::idempotency::{DEFAULT_TTL_HOURS, Idempotency, IdempotencyKey};
use stagepass_platform::serve::{Function, Limits, PlatformHandle};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::UserApi;
use crate::retry;

pub const COLLECTION: Function = Function {
    name: "v1_classes",
    limits: Limits::Authenticated,
    paths: &["/api/v1/classes"],
    build: |l, r| {
        let api = UserApi::load(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/classes", get(list_classes).post(create_class))
                .with_state(api),
        )
    },
};

pub const ITEM: Function = Function {
    name: "v1_classes_id",
    limits: Limits::Authenticated,
    paths: &["/api/v1/classes/{id}"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/classes/{id}", get(get_class).patch(patch_class))
                .with_state(api),
        )
    },
};

pub const ENROLLMENTS: Function = Function {
    name: "v1_classes_enrollments",
    limits: Limits::Money,
    paths: &["/api/v1/classes/{id}/enrollments"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route(
                    "/api/v1/classes/{id}/enrollments",
                    post(enroll).route_layer(from_fn(guard::no_body)),
                )
                .with_state(api),
        )
    },
};

pub const ENROLLMENT_ME: Function = Function {
    name: "v1_classes_enrollments_me",
    limits: Limits::Money,
    paths: &["/api/v1/classes/{id}/enrollments/me"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route("/api/v1/classes/{id}/enrollments/me", delete(withdraw))
                .with_state(api),
        )
    },
};

pub const CANCEL: Function = Function {
    name: "v1_classes_cancel",
    limits: Limits::Authenticated,
    paths: &["/api/v1/classes/{id}/cancel"],
    build: |l, r| {
        let api = UserApi::load_emitting(l, r)?;
        Some(
            Router::new()
                .route(
                    "/api/v1/classes/{id}/cancel",
                    post(cancel_class).route_layer(from_fn(guard::no_body)),
                )
                .with_state(api),
        )
    },
};

const ENROLL_ROUTE: &str = "POST /api/v1/classes/{id}/enrollments";
/// Largest page of classes.
pub const MAX_PAGE: i64 = 100;
const DEFAULT_PAGE: i64 = 20;

/// A new class. `starts_at` is an RFC 3339 instant; `time_zone` the IANA
/// zone to show it in.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewClass {
    /// 1–120 characters.
    pub title: String,
    /// Up to 5,000 characters.
    pub description: Option<String>,
    /// In the future.
    pub starts_at: DateTime<Utc>,
    /// An IANA zone name such as `Europe/Berlin`, or `UTC`.
    pub time_zone: String,
    /// 15–480.
    pub duration_minutes: i64,
    /// 1–1,000 seats.
    pub capacity: i64,
    /// 0–100,000 tokens.
    pub price_tokens: i64,
}

/// Changes to a scheduled class; absent fields stay as they are. The price
/// cannot change once anyone has enrolled.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub time_zone: Option<String>,
    pub duration_minutes: Option<i64>,
    pub capacity: Option<i64>,
    pub price_tokens: Option<i64>,
}

impl NewClass {
    fn parse(self) -> Result<ClassFields, ApiError> {
        ClassPatch {
            title: Some(self.title),
            description: self.description,
            starts_at: Some(self.starts_at),
            time_zone: Some(self.time_zone),
            duration_minutes: Some(self.duration_minutes),
            capacity: Some(self.capacity),
            price_tokens: Some(self.price_tokens),
        }
        .parse()
    }
}

impl ClassPatch {
    /// Checks every present field, reporting all problems at once.
    fn parse(self) -> Result<ClassFields, ApiError> {
        let mut errors = Vec::new();
        let title = self.title.map(|t| t.trim().to_owned());
        check_text(&mut errors, "title", title.as_deref(), 1, 120);
        check_text(
            &mut errors,
            "description",
            self.description.as_deref(),
            0,
            5000,
        );
        if let Some(zone) = &self.time_zone
            && !is_zone_name(zone)
        {
            errors.push(field_error(
                "time_zone",
                "an IANA zone name such as Europe/Berlin, or UTC",
            ));
        }
        let duration_minutes = in_range(
            &mut errors,
            "duration_minutes",
            self.duration_minutes,
            15,
            480,
        );
        let capacity = in_range(&mut errors, "capacity", self.capacity, 1, 1000);
        let price_tokens = match self.price_tokens {
            Some(p) if !(0..=100_000).contains(&p) => {
                errors.push(field_error("price_tokens", "must be between 0 and 100000"));
                None
            }
            other => other,
        };
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(ClassFields {
            title,
            description: self.description,
            starts_at: self.starts_at,
            time_zone: self.time_zone,
            duration_minutes,
            capacity,
            price_tokens,
        })
    }
}

fn field_error(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

/// Length in characters within `min..=max`, and the shared character rules
/// (`text`): the title on one line, the description may keep line breaks.
fn check_text(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<&str>,
    min: usize,
    max: usize,
) {
    let Some(value) = value else { return };
    let length_ok = (min..=max).contains(&value.chars().count());
    let chars_ok = if field == "title" {
        text::check_single_line(field, value).is_ok()
    } else {
        text::check(field, value).is_ok()
    };
    if !length_ok || !chars_ok {
        errors.push(FieldError {
            field: field.to_owned(),
            message: format!(
                "must be {min}–{max} characters without control or format characters{}",
                if field == "title" {
                    ", on one line"
                } else {
                    ""
                }
            ),
        });
    }
}

fn in_range(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<i64>,
    min: i32,
    max: i32,
) -> Option<i32> {
    let value = value?;
    match i32::try_from(value) {
        Ok(v) if (min..=max).contains(&v) => Some(v),
        _ => {
            errors.push(FieldError {
                field: field.to_owned(),
                message: format!("must be between {min} and {max}"),
            });
            None
        }
    }
}

/// The shape of an IANA zone name (`Area/Location[/Sub]`, or `UTC`). The
/// database then checks the name exists in its zone database; the shape
/// check keeps out abbreviations and POSIX rules (`EST`, `UTC+5`).
fn is_zone_name(zone: &str) -> bool {
    if zone == "UTC" {
        return true;
    }
    let mut parts = zone.split('/');
    let area_ok = parts
        .next()
        .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphabetic()));
    let rest: Vec<&str> = parts.collect();
    zone.len() <= 64
        && area_ok
        && !rest.is_empty()
        && rest.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b))
        })
}

fn parse_id(raw: &str) -> Result<ClassId, ApiError> {
    crate::parse_uuid("id", raw).map(ClassId::new)
}

#[utoipa::path(post, path = "/api/v1/classes", tag = "classes", security(("bearer" = [])),
    request_body = NewClass,
    responses((status = 201, body = Class),
              (status = 400, description = "invalid fields, or a start in the past", body = crate::openapi::Problem),
              (status = 403, description = "creator_required", body = crate::openapi::Problem)))]
pub async fn create_class(
    State(api): State<UserApi>,
    user: AuthUser,
    JsonBody(request): JsonBody<NewClass>,
) -> ApiResult<(StatusCode, Json<Class>)> {
    let fields = request.parse()?;
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    let class = classes::create(&mut tx, ClassId::new(Uuid::now_v7()), &fields)
        .await
        .or_problem()?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(class)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this creator's classes.
    #[param(value_type = Option<Uuid>)]
    pub creator: Option<String>,
    /// `next_cursor` of the previous page (opaque).
    #[param(max_length = 128)]
    pub cursor: Option<String>,
    /// 1–100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClassPage {
    pub classes: Vec<Class>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// 9999-12-31T23:59:59.999999Z, the latest RFC 3339 instant a class can be
/// given (four-digit years).
const MAX_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// The cursor is opaque to clients: `<start in µs>.<id>`.
fn encode_cursor(class: &Class) -> String {
    format!(
        "{}.{}",
        class.starts_at.timestamp_micros(),
        class.id.simple()
    )
}

fn decode_cursor(raw: &str) -> Result<ClassCursor, ApiError> {
    let bad = || ApiError::field("cursor", "not a cursor from a previous page");
    let (micros, id) = raw.split_once('.').ok_or_else(bad)?;
    // Bounded to what a class can start at: chrono accepts instants far
    // outside Postgres's timestamp range, which answered 500 (issue 14).
    let starts_at = micros
        .parse::<i64>()
        .ok()
        .filter(|m| (0..=MAX_CURSOR_MICROS).contains(m))
        .and_then(DateTime::<Utc>::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(ClassCursor { starts_at, id })
}

/// Upcoming scheduled classes, soonest first.
#[utoipa::path(get, path = "/api/v1/classes", tag = "classes", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, body = ClassPage), (status = 400, body = crate::openapi::Problem)))]
pub async fn list_classes(
    State(api): State<UserApi>,
    user: AuthUser,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<ClassPage>> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::field("limit", "must be between 1 and 100"));
    }
    let creator = q
        .creator
        .as_deref()
        .map(|c| crate::parse_uuid("creator", c).map(UserId::new))
        .transpose()?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    // One statement as the caller (ADR 0020). One extra row tells whether
    // another page exists.
    let claims = db::claims_text(user.claims());
    let mut found = db::traced_read(classes::read_upcoming(
        &api.pool,
        &claims,
        creator,
        after,
        limit + 1,
    ))
    .await
    .or_problem()?;
    let more = found.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    found.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        found.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(ClassPage {
        classes: found,
        next_cursor,
    }))
}

/// One class: scheduled ones are visible to everyone signed in; a cancelled
/// or settled class only to its creator and the fans who enrolled.
#[utoipa::path(get, path = "/api/v1/classes/{id}", tag = "classes", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the class's id")),
    responses((status = 200, body = Class), (status = 404, body = crate::openapi::Problem)))]
pub async fn get_class(
    State(api): State<UserApi>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Class>> {
    let id = parse_id(&id)?;
    let claims = db::claims_text(user.claims());
    let class = db::traced_read(classes::read_class(&api.pool, &claims, id))
        .await
        .or_problem()?;
    Ok(Json(class))
}

/// The creator edits a scheduled class; a new time moves every calendar copy
/// (host and attendees) and bumps its sequence.
#[utoipa::path(patch, path = "/api/v1/classes/{id}", tag = "classes", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the class's id")),
    request_body = ClassPatch,
    responses((status = 200, body = Class),
              (status = 400, body = crate::openapi::Problem),
              (status = 403, description = "not_class_owner", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "class_not_open, price_locked, reschedule_too_soon (a class with paid enrolments cannot move to start within the 24 h cut-off)", body = crate::openapi::Problem)))]
pub async fn patch_class(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
    JsonBody(patch): JsonBody<ClassPatch>,
) -> ApiResult<Json<Class>> {
    let id = parse_id(&id)?;
    let fields = patch.parse()?;
    if fields_empty(&fields) {
        return Err(ApiError::field("body", "give at least one field to change"));
    }
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    let class = classes::update(&mut tx, id, &fields).await.or_problem()?;
    tx.commit().await?;
    api.kick(&platform);
    Ok(Json(class))
}

fn fields_empty(f: &ClassFields) -> bool {
    f.title.is_none()
        && f.description.is_none()
        && f.starts_at.is_none()
        && f.time_zone.is_none()
        && f.duration_minutes.is_none()
        && f.capacity.is_none()
        && f.price_tokens.is_none()
}

/// What an enrolment's `Idempotency-Key` is bound to (there is no body).
#[derive(Serialize)]
struct EnrollFingerprint {
    class_id: Uuid,
}

/// The caller enrols, paying the class's price into escrow.
#[utoipa::path(post, path = "/api/v1/classes/{id}/enrollments", tag = "classes",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the class's id"),
           ("Idempotency-Key" = String, Header, description = "1–255 visible ASCII characters")),
    responses((status = 201, body = Enrollment),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "class_full, class_not_open, already_enrolled, idempotency_in_progress", body = crate::openapi::Problem),
              (status = 422, description = "insufficient_funds, daily_limit_exceeded, account_in_debt, own_class, idempotency_key_reused", body = crate::openapi::Problem)))]
pub async fn enroll(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
    key: IdempotencyKey,
) -> ApiResult<Response> {
    let class = parse_id(&id)?;
    let fingerprint = EnrollFingerprint {
        class_id: class.get(),
    };
    let idempotency = Idempotency::new(
        user.id(),
        ENROLL_ROUTE,
        key,
        &fingerprint,
        DEFAULT_TTL_HOURS,
    )?;
    let args = serde_json::json!({"class_id": class.get(), "enrollment_id": Uuid::now_v7()});
    crate::idempotent::run_in_one_call(
        &api,
        &user,
        &platform,
        &idempotency,
        StatusCode::CREATED,
        "enroll",
        args,
        |e| classes::ClassError::from(e).into_problem(),
        &[],
    )
    .await
}

/// The caller leaves the class with a full refund, until the cut-off (24 h
/// before the start). Needs no `Idempotency-Key`: a repeat finds no
/// enrolment (409 `not_enrolled`) and refunds nothing, since the refund's
/// journal is unique per enrolment.
#[utoipa::path(delete, path = "/api/v1/classes/{id}/enrollments/me", tag = "classes",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the class's id")),
    responses((status = 200, body = Withdrawal),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "cutoff_passed, not_enrolled", body = crate::openapi::Problem)))]
pub async fn withdraw(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
) -> ApiResult<Json<Withdrawal>> {
    let class = parse_id(&id)?;
    let (api, user) = (&api, &user);
    retry::on_deadlock(|| async move {
        let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
        let withdrawal = match classes::withdraw(&mut tx, class).await {
            Err(e) if e.is_deadlock() => return Err(retry::deadlocked(tx).await),
            other => other.or_problem()?,
        };
        tx.commit().await?;
        Ok(Json(withdrawal))
    })
    .await
    .inspect(|_| api.kick(&platform))
}

/// The creator cancels the class: every enrolled fan is refunded from
/// escrow, the creator is paid nothing, every calendar copy is cancelled.
#[utoipa::path(post, path = "/api/v1/classes/{id}/cancel", tag = "classes",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "the class's id")),
    responses((status = 200, body = Cancellation),
              (status = 403, description = "not_class_owner", body = crate::openapi::Problem),
              (status = 404, body = crate::openapi::Problem),
              (status = 409, description = "class_not_open", body = crate::openapi::Problem)))]
pub async fn cancel_class(
    State(api): State<UserApi>,
    user: AuthUser,
    platform: PlatformHandle,
    Path(id): Path<String>,
) -> ApiResult<Json<Cancellation>> {
    let class = parse_id(&id)?;
    // Refunds credit many wallets in one transaction, so it can meet a
    // concurrent tip between two of those fans in a deadlock.
    let (api, user) = (&api, &user);
    retry::on_deadlock(|| async move {
        let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
        let cancellation = match classes::cancel(&mut tx, class).await {
            Err(e) if e.is_deadlock() => return Err(retry::deadlocked(tx).await),
            other => other.or_problem()?,
        };
        tx.commit().await?;
        Ok(Json(cancellation))
    })
    .await
    .inspect(|_| api.kick(&platform))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_names_have_the_iana_shape() {
        for ok in [
            "UTC",
            "Europe/Berlin",
            "America/Argentina/Buenos_Aires",
            "Etc/GMT+5",
        ] {
            assert!(is_zone_name(ok), "{ok}");
        }
        for bad in [
            "",
            "EST",
            "UTC+5",
            "Europe/",
            "/Berlin",
            "Europe//Berlin",
            "Europe/Ber lin",
        ] {
            assert!(!is_zone_name(bad), "{bad}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let at = DateTime::<Utc>::from_timestamp_micros(1_800_000_000_123_456).unwrap_or_default();
        let id = Uuid::now_v7();
        let raw = format!("{}.{}", at.timestamp_micros(), id.simple());
        assert_eq!(
            decode_cursor(&raw).ok(),
            Some(ClassCursor { starts_at: at, id })
        );
        for bad in ["", "x", "1.nope", "nope.0190"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
        // Postgres cannot hold these instants (issue 14: a 500).
        for out_of_range in [
            "-3200000000000000000.00000000000000000000000000000000",
            "253402300800000000.0191c7b5a4f27a5e9c1b2d3e4f5a6b7c",
            "-1.0191c7b5a4f27a5e9c1b2d3e4f5a6b7c",
        ] {
            assert!(decode_cursor(out_of_range).is_err(), "{out_of_range}");
        }
    }
}
