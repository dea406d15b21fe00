//! The HTTP handlers of Stagepass. One module per route family; each
//! exposes a [`Function`]: the paths it serves and how to build its router
//! from configuration. `api/**/*.rs` binaries and the dev server both use
//! [`FUNCTIONS`].

pub mod admin;
pub mod auth_hook;
pub mod calls;
pub mod classes;
pub mod cron;
pub mod flags;
pub mod grants;
pub mod health;
pub mod ical;
mod idempotent;
pub mod jobs;
pub mod me;
pub mod openapi;
pub mod outbox;
pub mod payouts;
pub mod problems;
pub mod purchases;
pub mod realtime;
mod retry;
pub mod schedule;
mod state;
pub mod tips;
pub mod tokens;
pub mod webhooks;

use stagepass_platform::http::ApiError;
use stagepass_platform::serve::Function;
pub use state::UserApi;

/// A UUID from a path segment or query value named `field`, or 400
/// `validation_failed` naming it (every route that takes an id).
pub(crate) fn parse_uuid(field: &'static str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::field(field, "must be a UUID"))
}

/// Every deployable function. A test checks that each has an `api/` binary,
/// a documented OpenAPI operation, and a router that builds.
pub const FUNCTIONS: &[Function] = &[
    health::HEALTH,
    health::READY,
    me::FUNCTION,
    auth_hook::FUNCTION,
    admin::ROLE,
    flags::COLLECTION,
    flags::ITEM,
    grants::FUNCTION,
    openapi::FUNCTION,
    tokens::PACKAGES_FUNCTION,
    tokens::BALANCE_FUNCTION,
    tokens::LEDGER_FUNCTION,
    tips::FUNCTION,
    purchases::FUNCTION,
    classes::COLLECTION,
    classes::ITEM,
    classes::ENROLLMENTS,
    classes::ENROLLMENT_ME,
    classes::CANCEL,
    calls::REQUEST,
    calls::ITEM,
    calls::ACTION,
    calls::TOKEN,
    calls::MY_CALLS,
    calls::SETTINGS,
    calls::CREATOR_SETTINGS,
    schedule::FUNCTION,
    schedule::FEED,
    schedule::FEED_TOKEN,
    realtime::FUNCTION,
    jobs::CLASS_REMINDER,
    webhooks::STRIPE,
    webhooks::AGORA,
    cron::LEDGER_AUDIT,
    cron::CLEANUP,
    cron::RECONCILE_PURCHASES,
    cron::SETTLE_CLASSES,
    cron::DELIVER_OUTBOX,
    cron::BILL_CALLS,
    jobs::CALL_TICK,
    payouts::ACCOUNT,
    payouts::REQUESTS,
    payouts::HISTORY,
    payouts::ITEM,
    payouts::EARNINGS,
    payouts::HOLDS,
    payouts::CRON,
    payouts::JOB,
    payouts::CONNECT_WEBHOOK,
];
