//! Every problem `code` the API sends (the `code` member of a problem
//! document and the last segment of its `type`). Clients switch on these:
//! they are snake_case and never change once shipped. Handlers name them by
//! these constants, never by a string literal (a test below refuses one).

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        $($(#[$doc])* pub const $name: &str = $value;)*
        /// All of them, for the tests and the documentation.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

codes! {
    // Fixed codes of `ApiError` variants.
    VALIDATION_FAILED = "validation_failed";
    BAD_REQUEST = "bad_request";
    NOT_FOUND = "not_found";
    METHOD_NOT_ALLOWED = "method_not_allowed";
    PAYLOAD_TOO_LARGE = "payload_too_large";
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type";
    RATE_LIMITED = "rate_limited";
    INTERNAL_ERROR = "internal_error";
    /// 503 from a limiter that fails closed (`ApiError::LimiterUnavailable`).
    RATE_LIMITER_UNAVAILABLE = "rate_limiter_unavailable";

    // 401
    MISSING_TOKEN = "missing_token";
    INVALID_TOKEN = "invalid_token";
    INVALID_CRON_SECRET = "invalid_cron_secret";
    INVALID_QSTASH_SIGNATURE = "invalid_qstash_signature";
    INVALID_SIGNATURE = "invalid_signature";
    STALE_SIGNATURE = "stale_signature";

    // 403
    ADMIN_REQUIRED = "admin_required";
    CREATOR_REQUIRED = "creator_required";
    NOT_CLASS_OWNER = "not_class_owner";
    CORS_ORIGIN_NOT_ALLOWED = "cors_origin_not_allowed";
    CORS_REQUEST_NOT_ALLOWED = "cors_request_not_allowed";
    /// The route's feature flag is off for the caller (ADR 0016).
    FEATURE_DISABLED = "feature_disabled";
    /// Only the other party may do this to a call (the creator answers,
    /// the fan cancels a request).
    WRONG_CALL_PARTY = "wrong_call_party";

    // 409
    HANDLE_TAKEN = "handle_taken";
    LAST_ADMIN = "last_admin";
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress";
    ALREADY_APPLIED = "already_applied";
    CLASS_NOT_OPEN = "class_not_open";
    ALREADY_ENROLLED = "already_enrolled";
    CLASS_FULL = "class_full";
    CUTOFF_PASSED = "cutoff_passed";
    NOT_ENROLLED = "not_enrolled";
    PRICE_LOCKED = "price_locked";
    RESCHEDULE_TOO_SOON = "reschedule_too_soon";
    FLAG_EXISTS = "flag_exists";
    /// The call is not in a state this action applies to.
    CALL_STATE_CONFLICT = "call_state_conflict";
    /// The creator did not answer within 2 minutes.
    CALL_RANG_OUT = "call_rang_out";
    /// The creator is already in another call.
    CREATOR_BUSY = "creator_busy";
    /// The fan already has a ringing, accepted or active call.
    CALL_ALREADY_OPEN = "call_already_open";

    // 422
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused";
    SELF_TIP = "self_tip";
    RECIPIENT_NOT_CREATOR = "recipient_not_creator";
    ACCOUNT_IN_DEBT = "account_in_debt";
    INSUFFICIENT_FUNDS = "insufficient_funds";
    DAILY_LIMIT_EXCEEDED = "daily_limit_exceeded";
    SELF_GRANT = "self_grant";
    OWN_CLASS = "own_class";
    /// The creator does not take calls (of this kind).
    NOT_TAKING_CALLS = "not_taking_calls";
    OWN_CALL = "own_call";
    /// A change that changes nothing (a flag patch with only a reason).
    NOTHING_TO_CHANGE = "nothing_to_change";
    /// What a creator could be paid is below the payout minimum (1,000 tokens).
    BELOW_PAYOUT_MINIMUM = "below_payout_minimum";

    // 503
    DATABASE_BUSY = "database_busy";
    DATABASE_UNAVAILABLE = "database_unavailable";
    AUTH_UNAVAILABLE = "auth_unavailable";
    PAYMENT_PROVIDER_UNAVAILABLE = "payment_provider_unavailable";
    NOT_CONFIGURED = "not_configured";
    MISCONFIGURED = "misconfigured";
    /// Deadlocks retried and still losing: retry the request.
    BUSY = "busy";
}

/// Whether `code` is snake_case: a lowercase ASCII letter, then lowercase
/// letters, digits and single underscores, not ending in one.
pub fn is_snake_case(code: &str) -> bool {
    let mut chars = code.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !code.ends_with('_')
        && !code.contains("__")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    #[test]
    fn every_code_is_snake_case_and_listed_once() {
        let unique: BTreeSet<&str> = ALL.iter().copied().collect();
        assert_eq!(unique.len(), ALL.len(), "a code is listed twice");
        for code in ALL {
            assert!(is_snake_case(code), "{code} is not snake_case");
        }
        assert!(!is_snake_case("alreadycredited_"));
        assert!(!is_snake_case("Already"));
        assert!(!is_snake_case("a__b"));
        assert!(!is_snake_case(""));
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// A code written as a literal where an `ApiError` is built would escape
    /// [`ALL`]: every constructor that takes a code must name a constant.
    #[test]
    fn no_handler_spells_a_code_as_a_literal() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for krate in ["platform", "routes", "ledger", "integrations", "cli"] {
            rust_files(&crates.join(krate).join("src"), &mut files);
        }
        assert!(files.len() > 50, "sources not found under {crates:?}");
        let constructors = [
            "Unauthenticated(",
            "Forbidden(",
            "Conflict(",
            "Unprocessable(",
            "Unavailable(",
        ];
        let mut literal = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for c in constructors {
                for (at, _) in text.match_indices(&format!("ApiError::{c}")) {
                    let rest = text[at + "ApiError::".len() + c.len()..].trim_start();
                    if rest.starts_with('"') {
                        let head: String = rest.chars().take(40).collect();
                        literal.push(format!("{}: {head}", file.display()));
                    }
                }
            }
        }
        assert!(
            literal.is_empty(),
            "use a constant of http::codes: {literal:#?}"
        );
    }
}
