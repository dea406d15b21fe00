//! Whole-transaction retries when Postgres picks a transaction as a deadlock
//! victim (ADR 0005 §5: deadlocks between wallets are detected and retried,
//! not prevented by a global lock order). Safe because every retried
//! transaction is all-or-nothing and money routes are keyed by
//! `Idempotency-Key`.

use std::future::Future;

use stagepass_platform::http::{ApiError, codes};

/// Attempts before answering 503 `busy`.
pub const DEADLOCK_ATTEMPTS: usize = 3;

/// Why an attempt did not produce a response.
pub enum Retry {
    Deadlock,
    Fail(ApiError),
}

impl<E: Into<ApiError>> From<E> for Retry {
    fn from(e: E) -> Self {
        Retry::Fail(e.into())
    }
}

/// Rolls the deadlocked transaction back *now*, before the retry: a dropped
/// transaction's ROLLBACK is only sent when its pooled connection is next
/// used, and until then it still holds its locks — the retry's own
/// idempotency lock among them, which would answer 409 to itself.
pub async fn deadlocked(tx: sqlx::Transaction<'_, sqlx::Postgres>) -> Retry {
    match tx.rollback().await {
        Ok(()) => Retry::Deadlock,
        Err(e) => Retry::Fail(e.into()),
    }
}

/// Runs `attempt` up to [`DEADLOCK_ATTEMPTS`] times while it deadlocks.
pub async fn on_deadlock<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Retry>>,
{
    for _ in 0..DEADLOCK_ATTEMPTS {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Retry::Fail(e)) => return Err(e),
            Err(Retry::Deadlock) => {}
        }
    }
    Err(busy())
}

/// The answer after [`DEADLOCK_ATTEMPTS`] deadlocks in a row.
pub fn busy() -> ApiError {
    ApiError::Unavailable(codes::BUSY, "the ledger is busy; retry the request".into())
}
