//! Vercel Cron calls: `GET` with `Authorization: Bearer $CRON_SECRET`,
//! compared in constant time. Runs may overlap, so every job also takes a
//! lock ([`try_lock`]) and skips when another run holds it.

use http::HeaderMap;
use sqlx::PgConnection;
use subtle::ConstantTimeEq;

use crate::config::{ExposeSecret, Secret};
use crate::http::ApiError;

/// Checks the cron secret. Missing or wrong → 401.
pub fn authorize(headers: &HeaderMap, secret: &Secret) -> Result<(), ApiError> {
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = secret.expose_secret().as_bytes();
    // `ct_eq` on slices of different lengths is false without leaking where
    // they differ.
    if bool::from(presented.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated(
            crate::http::codes::INVALID_CRON_SECRET,
        ))
    }
}

/// Takes the job's transaction-scoped lock; `false` when another run of the
/// same job holds it.
pub async fn try_lock(conn: &mut PgConnection, job: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended($1, 7403))")
        .bind(job)
        .fetch_one(conn)
        .await
}
