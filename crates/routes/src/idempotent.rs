//! The one shape of an idempotent money request (tips, enrolments): one
//! transaction under RLS holding first-sight user creation, the idempotency
//! check, the effect in a savepoint, and the record of the response.
//!
//! Tips and enrolments send all of it as one statement
//! ([`run_in_one_call`], `app.money_request`); a refusal costs a second
//! statement, its record.
//!
//! A refusal of the effect (4xx: insufficient funds, class full, …) is
//! rolled back to the savepoint and recorded with the key, so a replay
//! answers the same; a server error records nothing, so the client may
//! retry; a deadlock retries the whole transaction (ADR 0005).

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::StatusCode;
use sqlx::{Acquire, PgConnection};
use stagepass_platform::auth::AuthUser;
use stagepass_platform::http::{ApiError, ApiResult};
use stagepass_platform::idempotency::{Idempotency, Settled};
use stagepass_platform::serve::PlatformHandle;

use crate::UserApi;
use crate::retry::{self, Retry};

/// The effect: given the savepoint's connection, the response body. It owns
/// what it needs (its future may not borrow from the handler).
pub trait Effect:
    for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<serde_json::Value, ApiError>>
{
}

impl<F> Effect for F where
    F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<serde_json::Value, ApiError>>
{
}

/// Runs `effect` exactly once per idempotency key; `success` is the status
/// of its JSON body. After a committed effect, its messages (outbox) go out
/// once the response is sent.
pub async fn run<F>(
    api: &UserApi,
    user: &AuthUser,
    platform: &PlatformHandle,
    idempotency: &Idempotency,
    success: StatusCode,
    mut effect: F,
) -> ApiResult<Response>
where
    F: Effect,
{
    for _ in 0..retry::DEADLOCK_ATTEMPTS {
        match attempt(api, user, idempotency, success, &mut effect).await {
            Ok(response) => {
                if response.status() == success
                    && !response.headers().contains_key("idempotency-replayed")
                {
                    api.kick(platform);
                }
                return Ok(response);
            }
            Err(Retry::Fail(e)) => return Err(e),
            Err(Retry::Deadlock) => {}
        }
    }
    Err(retry::busy())
}

/// [`run`] in one round trip: `effect` (one `app.money_request` knows)
/// with `args` runs with first sight and the idempotency record in one
/// statement. `refusal` maps the statement's error as the effect's Rust
/// function would (`LedgerError`, `ClassError`); a refusal (4xx) is recorded
/// with the key and answered, a deadlock retries the statement. After an
/// applied effect, the wallets of `credited` (deferred credits, ADR 0021)
/// are folded and the outbox delivered, once the response is sent.
#[allow(clippy::too_many_arguments)]
pub async fn run_in_one_call(
    api: &UserApi,
    user: &AuthUser,
    platform: &PlatformHandle,
    idempotency: &Idempotency,
    success: StatusCode,
    effect: &'static str,
    args: serde_json::Value,
    refusal: fn(sqlx::Error) -> ApiError,
    credited: &[uuid::Uuid],
) -> ApiResult<Response> {
    for _ in 0..retry::DEADLOCK_ATTEMPTS {
        let settled = idempotency
            .settle_in_one_call(&api.pool, user.claims(), success, effect, &args, refusal)
            .await;
        match settled {
            Ok(Settled::Applied(body)) => {
                api.fold_then_kick(platform, credited);
                return Ok(json_response(success, body));
            }
            Ok(Settled::Refused { status, body }) => return Ok(json_response(status, body)),
            Ok(Settled::Replay(replay)) => return Ok(replay.into_response()),
            Err(e) if e.is_deadlock() => {}
            Err(e) => return Err(e),
        }
    }
    Err(retry::busy())
}

async fn attempt<F>(
    api: &UserApi,
    user: &AuthUser,
    idempotency: &Idempotency,
    success: StatusCode,
    effect: &mut F,
) -> Result<Response, Retry>
where
    F: Effect,
{
    let mut tx = crate::me::begin_seen(&api.pool, user.claims()).await?;
    if let Some(replay) = idempotency.begin(&mut tx).await? {
        tx.commit().await?;
        return Ok(replay.into_response());
    }
    let mut savepoint = tx.begin().await?;
    let (status, body) = match effect(&mut savepoint).await {
        Ok(body) => {
            savepoint.commit().await?;
            (success, body)
        }
        Err(e) if e.is_deadlock() => {
            drop(savepoint);
            return Err(retry::deadlocked(tx).await);
        }
        Err(e) if e.status().is_client_error() => {
            savepoint.rollback().await?;
            (e.status(), e.body_json())
        }
        Err(e) => return Err(Retry::Fail(e)),
    };
    idempotency.store(&mut tx, status, &body).await?;
    tx.commit().await?;
    Ok(json_response(status, body))
}

/// A JSON response; client errors are problem documents.
fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if status.is_client_error() {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/problem+json"),
        );
    }
    response
}
