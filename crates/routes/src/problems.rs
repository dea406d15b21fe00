//! The one place where the ledger's domain errors become problems: each
//! refusal gets one HTTP status and one `code`. The ledger crate knows
//! nothing of HTTP (docs/ARCHITECTURE.md, "Crates"); handlers write
//! `ledger_call(..).await.or_problem()?`.

use stagepass_ledger::LedgerError;
use stagepass_ledger::calls::CallError;
use stagepass_ledger::classes::ClassError;
use stagepass_ledger::payouts::PayoutError;
use stagepass_ledger::purchases::PurchaseError;
use stagepass_platform::http::codes;
use stagepass_platform::http::{ApiError, ApiResult};

/// A domain error the API answers as a problem.
pub trait IntoProblem {
    fn into_problem(self) -> ApiError;
}

/// `result.or_problem()?`: a domain result in a handler.
pub trait OrProblem<T> {
    fn or_problem(self) -> ApiResult<T>;
}

impl<T, E: IntoProblem> OrProblem<T> for Result<T, E> {
    fn or_problem(self) -> ApiResult<T> {
        self.map_err(IntoProblem::into_problem)
    }
}

impl IntoProblem for LedgerError {
    fn into_problem(self) -> ApiError {
        let detail = self.to_string();
        match self {
            LedgerError::AmountOutOfRange { .. } => ApiError::field("amount", detail),
            LedgerError::SelfTip => ApiError::Unprocessable(codes::SELF_TIP, detail),
            LedgerError::RecipientNotCreator => {
                ApiError::Unprocessable(codes::RECIPIENT_NOT_CREATOR, detail)
            }
            LedgerError::InDebt { .. } => ApiError::Unprocessable(codes::ACCOUNT_IN_DEBT, detail),
            LedgerError::InsufficientFunds { .. } => {
                ApiError::Unprocessable(codes::INSUFFICIENT_FUNDS, detail)
            }
            LedgerError::DailyLimitExceeded { .. } => {
                ApiError::Unprocessable(codes::DAILY_LIMIT_EXCEEDED, detail)
            }
            LedgerError::AlreadyApplied => ApiError::Conflict(codes::ALREADY_APPLIED, detail),
            LedgerError::InvalidReason => ApiError::field("reason", detail),
            LedgerError::SelfGrant => ApiError::Unprocessable(codes::SELF_GRANT, detail),
            LedgerError::AdminRequired => ApiError::Forbidden(codes::ADMIN_REQUIRED),
            LedgerError::UnknownUser => ApiError::NotFound,
            LedgerError::Invariant(m) => ApiError::Internal(m.into()),
            // Keeps the sqlx error as the source: 503 for a lost connection,
            // and `ApiError::is_deadlock` still sees a deadlock.
            LedgerError::Db(e) => e.into(),
        }
    }
}

impl IntoProblem for ClassError {
    fn into_problem(self) -> ApiError {
        let detail = self.to_string();
        match self {
            ClassError::NotFound => ApiError::NotFound,
            ClassError::NotCreator => ApiError::Forbidden(codes::CREATOR_REQUIRED),
            ClassError::NotOwner => ApiError::Forbidden(codes::NOT_CLASS_OWNER),
            ClassError::OwnClass => ApiError::Unprocessable(codes::OWN_CLASS, detail),
            ClassError::NotOpen => ApiError::Conflict(codes::CLASS_NOT_OPEN, detail),
            ClassError::AlreadyEnrolled => ApiError::Conflict(codes::ALREADY_ENROLLED, detail),
            ClassError::Full => ApiError::Conflict(codes::CLASS_FULL, detail),
            ClassError::CutoffPassed => ApiError::Conflict(codes::CUTOFF_PASSED, detail),
            ClassError::NotEnrolled => ApiError::Conflict(codes::NOT_ENROLLED, detail),
            ClassError::UnknownTimeZone => ApiError::field("time_zone", "unknown IANA time zone"),
            ClassError::StartsInPast => ApiError::field("starts_at", "must be in the future"),
            ClassError::PriceLocked => ApiError::Conflict(codes::PRICE_LOCKED, detail),
            ClassError::RescheduleTooSoon => ApiError::Conflict(codes::RESCHEDULE_TOO_SOON, detail),
            ClassError::CapacityBelowSeats { .. } => ApiError::field("capacity", detail),
            ClassError::Ledger(l) => l.into_problem(),
        }
    }
}

impl IntoProblem for CallError {
    fn into_problem(self) -> ApiError {
        let detail = self.to_string();
        match self {
            CallError::NotCreator => ApiError::Forbidden(codes::CREATOR_REQUIRED),
            CallError::PriceOutOfRange => ApiError::field("price_per_minute", detail),
            CallError::NotTakingCalls => ApiError::Unprocessable(codes::NOT_TAKING_CALLS, detail),
            CallError::AlreadyOpen => ApiError::Conflict(codes::CALL_ALREADY_OPEN, detail),
            CallError::OwnCall => ApiError::Unprocessable(codes::OWN_CALL, detail),
            CallError::NotFound => ApiError::NotFound,
            CallError::WrongState(_) => ApiError::Conflict(codes::CALL_STATE_CONFLICT, detail),
            CallError::RangOut => ApiError::Conflict(codes::CALL_RANG_OUT, detail),
            CallError::CreatorBusy => ApiError::Conflict(codes::CREATOR_BUSY, detail),
            CallError::WrongParty(_) => ApiError::Forbidden(codes::WRONG_CALL_PARTY),
            CallError::Ledger(l) => l.into_problem(),
        }
    }
}

impl IntoProblem for PurchaseError {
    fn into_problem(self) -> ApiError {
        match self {
            PurchaseError::UnknownPackage => ApiError::field("package", "unknown package"),
            PurchaseError::KeyConflict => ApiError::Unprocessable(
                codes::IDEMPOTENCY_KEY_REUSED,
                "this Idempotency-Key was used with a different request".into(),
            ),
            PurchaseError::AmountMismatch => ApiError::Internal(self.to_string().into()),
            PurchaseError::Ledger(l) => l.into_problem(),
        }
    }
}

impl IntoProblem for PayoutError {
    fn into_problem(self) -> ApiError {
        let detail = self.to_string();
        match self {
            PayoutError::NotCreator => ApiError::Forbidden(codes::CREATOR_REQUIRED),
            PayoutError::BelowMinimum(_) => {
                ApiError::Unprocessable(codes::BELOW_PAYOUT_MINIMUM, detail)
            }
            PayoutError::NotFound | PayoutError::UnknownCreator => ApiError::NotFound,
            PayoutError::Busy => ApiError::Unavailable(codes::BUSY, detail),
            PayoutError::AdminRequired => ApiError::Forbidden(codes::ADMIN_REQUIRED),
            PayoutError::Ledger(l) => l.into_problem(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn refusals_keep_their_status_and_code() {
        let cases = [
            (
                LedgerError::InsufficientFunds { balance: 3 }.into_problem(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "insufficient_funds",
            ),
            (
                LedgerError::AmountOutOfRange { min: 1, max: 2 }.into_problem(),
                StatusCode::BAD_REQUEST,
                "validation_failed",
            ),
            (
                ClassError::Full.into_problem(),
                StatusCode::CONFLICT,
                "class_full",
            ),
            (
                ClassError::NotOwner.into_problem(),
                StatusCode::FORBIDDEN,
                "not_class_owner",
            ),
            (
                CallError::RangOut.into_problem(),
                StatusCode::CONFLICT,
                "call_rang_out",
            ),
            (
                CallError::WrongParty("x".into()).into_problem(),
                StatusCode::FORBIDDEN,
                "wrong_call_party",
            ),
            (
                PurchaseError::KeyConflict.into_problem(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
            ),
            (
                PurchaseError::AmountMismatch.into_problem(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
            ),
        ];
        for (problem, status, code) in cases {
            assert_eq!((problem.status(), problem.code()), (status, code));
        }
    }
}
