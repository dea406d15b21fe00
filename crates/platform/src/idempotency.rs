//! Idempotency for money routes (SPEC §2).
//!
//! A money request carries `Idempotency-Key` (1–255 visible ASCII
//! characters). Records are scoped per user and route and live in Postgres
//! with a fingerprint of the request and the response, written **in the same
//! transaction as the effect**, so a crash can never leave an effect without
//! its record or the other way round.
//!
//! In the transaction, before the effect:
//! 1. `pg_try_advisory_xact_lock` on (user, route, key): taken by a
//!    concurrent duplicate still in flight → 409 `idempotency_in_progress`.
//! 2. A stored, unexpired record: same fingerprint → replay the stored status
//!    and body with `Idempotency-Replayed: true`; a different one → 422
//!    `idempotency_key_reused`.
//!
//! After the effect, [`Idempotency::store`] writes the response. Client
//! errors (4xx) of the effect are stored too, so a replay answers the same;
//! server errors are not, so the client may retry.
//!
//! [`Idempotency::settle_in_one_call`] does all of it — first sight, steps
//! 1–2, the effect and the record — in one statement
//! (`app.money_request`, migration 25) for the effects that have one.

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::auth::Claims;
use crate::http::ApiError;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotency-replayed";

/// How long records live: 24 h (payouts: 48 h).
pub const DEFAULT_TTL_HOURS: i32 = 24;
pub const PAYOUT_TTL_HOURS: i32 = 48;

/// A validated `Idempotency-Key` header (required).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<IdempotencyKey, ApiError> {
        let ok = (1..=255).contains(&raw.len()) && raw.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if ok {
            Ok(IdempotencyKey(raw.to_owned()))
        } else {
            Err(ApiError::field(
                "Idempotency-Key",
                "must be 1–255 visible ASCII characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(HEADER).iter();
        match (values.next(), values.next()) {
            (None, _) => Err(ApiError::BadRequest(
                "this route requires an Idempotency-Key header".into(),
            )),
            (Some(_), Some(_)) => Err(ApiError::field(
                "Idempotency-Key",
                "give the header exactly once",
            )),
            (Some(v), None) => IdempotencyKey::parse(v.to_str().unwrap_or("")),
        }
    }
}

/// One idempotent request in progress.
pub struct Idempotency {
    user: Uuid,
    route: &'static str,
    key: IdempotencyKey,
    fingerprint: String,
    ttl_hours: i32,
}

/// What [`Idempotency::settle_in_one_call`] did.
#[derive(Debug)]
pub enum Settled {
    /// The effect ran and its response was recorded with the key: the body.
    Applied(serde_json::Value),
    /// The effect refused; this problem document was recorded with the key.
    Refused {
        status: StatusCode,
        body: serde_json::Value,
    },
    /// The key's stored response, to replay.
    Replay(Replay),
}

/// A stored response, replayed as it was.
#[derive(Debug, Clone)]
pub struct Replay {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl IntoResponse for Replay {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if self.status.is_client_error() {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
        }
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        response
    }
}

impl Idempotency {
    /// `request` is the parsed body; its canonical JSON (keys sorted) is the
    /// fingerprint, so formatting differences do not matter but any change
    /// of a value does. A request that cannot be serialised is a 500, never
    /// an empty fingerprint (which every such request would share).
    pub fn new(
        user: Uuid,
        route: &'static str,
        key: IdempotencyKey,
        request: &impl Serialize,
        ttl_hours: i32,
    ) -> Result<Idempotency, ApiError> {
        let canonical = serde_json::to_value(request)
            .map(|v| v.to_string())
            .map_err(ApiError::internal)?;
        let mut hasher = Sha256::new();
        hasher.update(route.as_bytes());
        hasher.update([0]);
        hasher.update(canonical.as_bytes());
        let fingerprint = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Idempotency {
            user,
            route,
            key,
            fingerprint,
            ttl_hours,
        })
    }

    /// Step 1 and 2 of the module docs. `Ok(Some(replay))`: answer with it
    /// and do nothing else.
    pub async fn begin(&self, conn: &mut PgConnection) -> Result<Option<Replay>, ApiError> {
        // One round trip: the in-flight lock, then (a statement of its own,
        // so it sees what a request that held the lock committed) the
        // stored response (migration 23).
        let (locked, fingerprint, status, body): (
            bool,
            Option<String>,
            Option<i16>,
            Option<serde_json::Value>,
        ) = sqlx::query_as("select * from app.idempotency_begin($1, $2, $3)")
            .bind(self.user)
            .bind(self.route)
            .bind(self.key.as_str())
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Err(in_flight());
        }
        match fingerprint.zip(status).zip(body) {
            None => Ok(None),
            Some(((fingerprint, status), body)) => {
                self.replay(&fingerprint, status, body).map(Some)
            }
        }
    }

    /// A stored record found under the key: its response if it was stored
    /// for this same request, else 422 `idempotency_key_reused`.
    fn replay(
        &self,
        fingerprint: &str,
        status: i16,
        body: serde_json::Value,
    ) -> Result<Replay, ApiError> {
        if fingerprint != self.fingerprint {
            return Err(ApiError::Unprocessable(
                crate::http::codes::IDEMPOTENCY_KEY_REUSED,
                "this Idempotency-Key was used with a different request".into(),
            ));
        }
        Ok(Replay {
            status: u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK),
            body,
        })
    }

    /// The whole request in one statement on the pool, as the caller:
    /// first sight, the in-flight lock and lookup, `effect` (an effect
    /// `app.money_request` knows: `tip`, `enroll`) with `args`, and the
    /// record of its `success` response — one implicit transaction, one
    /// round trip.
    ///
    /// When the statement fails, `refusal` maps its error to the route's
    /// problem (the same mapping as the effect's Rust function). A client
    /// error is a refusal: it is recorded with the key in a second
    /// statement, unless a request with the same key recorded first, whose
    /// record then answers. A deadlock or a server error is returned (the
    /// statement was rolled back whole: a deadlock may be retried).
    pub async fn settle_in_one_call(
        &self,
        pool: &sqlx::PgPool,
        claims: &Claims,
        success: StatusCode,
        effect: &str,
        args: &serde_json::Value,
        refusal: impl FnOnce(sqlx::Error) -> ApiError,
    ) -> Result<Settled, ApiError> {
        let claims = crate::db::claims_text(claims);
        let settled = self.one_call(pool, &claims, success, effect, args).await;
        let problem = match settled {
            Ok(settled) => return settled,
            Err(e) => refusal(e),
        };
        if problem.is_deadlock() || !problem.status().is_client_error() {
            return Err(problem);
        }
        let (status, body) = (problem.status(), problem.body_json());
        let (recorded, fingerprint, stored_status, stored_body): (
            bool,
            String,
            i16,
            serde_json::Value,
        ) = crate::telemetry::db_span(
            "money_request_refused",
            sqlx::query_as(
                "select recorded, fingerprint, status_code, response \
                   from app.money_request_refused($1, $2, $3, $4, $5, $6, $7::jsonb)",
            )
            .bind(&claims)
            .bind(self.route)
            .bind(self.key.as_str())
            .bind(&self.fingerprint)
            .bind(self.ttl_hours)
            .bind(i16::try_from(status.as_u16()).unwrap_or(422))
            .bind(body.to_string())
            .fetch_one(pool),
        )
        .await?;
        if recorded {
            Ok(Settled::Refused { status, body })
        } else {
            self.replay(&fingerprint, stored_status, stored_body)
                .map(Settled::Replay)
        }
    }

    /// `app.money_request` itself: the outcome, or the statement's error.
    async fn one_call(
        &self,
        pool: &sqlx::PgPool,
        claims: &str,
        success: StatusCode,
        effect: &str,
        args: &serde_json::Value,
    ) -> Result<Result<Settled, ApiError>, sqlx::Error> {
        let (outcome, status, body, fingerprint): (
            String,
            Option<i16>,
            Option<serde_json::Value>,
            Option<String>,
        ) = crate::telemetry::db_span(
            "money_request",
            // The arguments as text: a `serde_json::Value` argument is not
            // final before the server has described the statement (sqlx
            // patches the jsonb version byte in then), so it would go in
            // two flights, which a transaction pooler may split
            // (vendor/sqlx-postgres/STAGEPASS-PATCH.md).
            sqlx::query_as(
                "select outcome, status_code, response, fingerprint \
                   from app.money_request($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
            )
            .bind(claims)
            .bind(self.route)
            .bind(self.key.as_str())
            .bind(&self.fingerprint)
            .bind(self.ttl_hours)
            .bind(i16::try_from(success.as_u16()).unwrap_or(200))
            .bind(effect)
            .bind(args.to_string())
            .fetch_one(pool),
        )
        .await?;
        Ok(match (outcome.as_str(), status, body, fingerprint) {
            ("applied", _, Some(body), _) => Ok(Settled::Applied(body)),
            ("stored", Some(status), Some(body), Some(fingerprint)) => {
                self.replay(&fingerprint, status, body).map(Settled::Replay)
            }
            ("in_flight", ..) => Err(in_flight()),
            (other, ..) => Err(ApiError::internal(std::io::Error::other(format!(
                "app.money_request answered {other:?}"
            )))),
        })
    }

    /// Records the response of the effect (same transaction).
    pub async fn store(
        &self,
        conn: &mut PgConnection,
        status: StatusCode,
        body: &serde_json::Value,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "insert into app.idempotency_keys \
               (user_id, route, key, fingerprint, status_code, response, expires_at) \
             values ($1, $2, $3, $4, $5, $6, app.now() + make_interval(hours => $7)) \
             on conflict (user_id, route, key) do update set \
               fingerprint = excluded.fingerprint, status_code = excluded.status_code, \
               response = excluded.response, created_at = app.now(), expires_at = excluded.expires_at",
        )
        .bind(self.user)
        .bind(self.route)
        .bind(self.key.as_str())
        .bind(&self.fingerprint)
        .bind(i16::try_from(status.as_u16()).unwrap_or(500))
        .bind(body)
        .bind(self.ttl_hours)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// 409 `idempotency_in_progress`: a request with the key holds its lock.
fn in_flight() -> ApiError {
    ApiError::Conflict(
        crate::http::codes::IDEMPOTENCY_IN_PROGRESS,
        "a request with this Idempotency-Key is still being processed".into(),
    )
}
