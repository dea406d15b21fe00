//! Rules that live in SQL, checked against the SQL itself:
//!
//! - Trust levels are derived in one place, `app.trust_level` (the limiter's
//!   money policy and the daily spending limit read it). A Rust copy of the
//!   rules, `TrustLevel::derive`, was tested but never used; it is gone. An
//!   account's age is made by moving the test clock after it signs up
//!   (nothing is backdated).
//! - Amount bounds: the API validates with the ledger's constants
//!   (`MIN_TIP`/`MAX_TIP`, `MIN_GRANT`/`MAX_GRANT`, `MAX_REASON_CHARS`), and
//!   the OpenAPI document reads them too; the SQL functions keep their own
//!   check. Here the SQL's bounds are proven equal to the constants.
//! - Status columns: each is `text` with a check constraint listing its
//!   values, and a Rust enum (`ledger::status::text_enum!`) reads it. Here
//!   each enum's values are proven equal to its constraint's, in order.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{TestApp, claims_for};
use stagepass_ledger::calls::{CallMedia, CallStatus, EndReason};
use stagepass_ledger::classes::{ClassStatus, EnrollmentStatus};
use stagepass_ledger::grants::{MAX_GRANT, MAX_REASON_CHARS, MIN_GRANT};
use stagepass_ledger::payouts::{
    CENTS_PER_TOKEN, MINIMUM_TOKENS, PayoutStatus, TransfersCapability,
};
use stagepass_ledger::purchases::PurchaseStatus;
use stagepass_ledger::{LedgerError, MAX_TIP, MIN_TIP};
use stagepass_routes::schedule::CalendarEventStatus;
use uuid::Uuid;

#[derive(Clone, Copy, Default)]
struct Facts {
    email_verified: bool,
    age_days: i32,
    /// Purchases whose payment succeeded (and were not refunded).
    settled_purchases: u32,
    chargebacks: u32,
    vip_grant: bool,
}

/// Users whose accounts are `ages[i]` days old by `app.now()`, in the order
/// asked. Nothing is backdated: the oldest signs up first, and the test
/// clock moves forward between sign-ups (`TestDb::advance_clock`), so every
/// `created_at` is what the column's default wrote. Leaves the clock at the
/// youngest account's sign-up.
async fn users_aged(app: &TestApp, ages: &[i32]) -> Vec<Uuid> {
    let mut order: Vec<usize> = (0..ages.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ages[i]));
    let mut ids = vec![Uuid::nil(); ages.len()];
    let mut previous: Option<i32> = None;
    for i in order {
        if let Some(older) = previous {
            let days = older - ages[i];
            if days > 0 {
                app.db
                    .advance_clock(chrono::Duration::days(i64::from(days)))
                    .await;
            }
        }
        previous = Some(ages[i]);
        ids[i] = app.signed_in_user().await.id;
    }
    ids
}

/// Gives `user` the facts other than age, and returns the level
/// `app.trust_level` derives for them.
async fn level(app: &TestApp, user: Uuid, facts: Facts) -> String {
    let db = &app.db.admin_pool;
    sqlx::query(
        "update app.user_private set email_verified = $2, \
           vip_granted_at = case when $3 then app.now() end where user_id = $1",
    )
    .bind(user)
    .bind(facts.email_verified)
    .bind(facts.vip_grant)
    .execute(db)
    .await
    .expect("private facts");
    for (status, n) in [
        (PurchaseStatus::Succeeded, facts.settled_purchases),
        (PurchaseStatus::Disputed, facts.chargebacks),
    ] {
        for _ in 0..n {
            sqlx::query(
                "insert into app.purchases (id, user_id, package, tokens, price_cents, status) \
                 values ($1, $2, 'starter', 50, 500, $3)",
            )
            .bind(Uuid::new_v4())
            .bind(user)
            .bind(status)
            .execute(db)
            .await
            .expect("purchase");
        }
    }
    sqlx::query_scalar("select app.trust_level($1)")
        .bind(user)
        .fetch_one(db)
        .await
        .expect("trust level")
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_levels_follow_the_rules_in_order() {
    let app = TestApp::new().await;
    let verified = Facts {
        email_verified: true,
        age_days: 7,
        ..Facts::default()
    };
    let trusted = Facts {
        age_days: 30,
        settled_purchases: 1,
        ..verified
    };
    let cases = [
        ("a new account", Facts::default(), "basic"),
        // verified: a verified e-mail and 7 days.
        ("verified", verified, "verified"),
        (
            "verified but 6 days old",
            Facts {
                age_days: 6,
                ..verified
            },
            "basic",
        ),
        (
            "7 days, e-mail not verified",
            Facts {
                email_verified: false,
                ..verified
            },
            "basic",
        ),
        // trusted: 30 days and a settled purchase (no verified e-mail needed).
        ("trusted", trusted, "trusted"),
        (
            "trusted without a verified e-mail",
            Facts {
                email_verified: false,
                ..trusted
            },
            "trusted",
        ),
        (
            "30 days, no purchase",
            Facts {
                settled_purchases: 0,
                ..trusted
            },
            "verified",
        ),
        (
            "a purchase, 29 days",
            Facts {
                age_days: 29,
                ..trusted
            },
            "verified",
        ),
        // vip: a grant.
        (
            "a vip grant",
            Facts {
                vip_grant: true,
                ..Facts::default()
            },
            "vip",
        ),
        // Any chargeback drops everyone to basic, a vip grant included.
        (
            "every upgrade",
            Facts {
                age_days: 400,
                settled_purchases: 12,
                vip_grant: true,
                ..verified
            },
            "vip",
        ),
        (
            "every upgrade and a chargeback",
            Facts {
                age_days: 400,
                settled_purchases: 12,
                vip_grant: true,
                chargebacks: 1,
                ..verified
            },
            "basic",
        ),
    ];
    let ages: Vec<i32> = cases.iter().map(|(_, facts, _)| facts.age_days).collect();
    let users = users_aged(&app, &ages).await;
    for ((case, facts, expected), user) in cases.into_iter().zip(users) {
        assert_eq!(level(&app, user, facts).await, expected, "{case}");
    }
}

/// `app.tip` by `payer` of `amount` to a user who is not a creator: the
/// amount check comes first, so an amount in range is refused for the
/// recipient instead.
async fn tip_refusal(app: &TestApp, payer: Uuid, amount: i64) -> LedgerError {
    let mut tx = app.db.app_pool.begin().await.expect("begin");
    sqlx::query("select set_config('request.jwt.claims', $1, true), set_config('role', 'authenticated', true)")
        .bind(claims_for(payer, None, 600).to_string())
        .execute(&mut *tx)
        .await
        .expect("claims");
    let err = sqlx::query("select * from app.tip($1, $2, $3, null)")
        .bind(Uuid::new_v4())
        .bind(Uuid::new_v4())
        .bind(amount)
        .execute(&mut *tx)
        .await
        .expect_err("refused");
    LedgerError::from(err)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_tip_bounds_are_the_ledger_constants() {
    let app = TestApp::new().await;
    let payer = app.signed_in_user().await.id;
    for outside in [MIN_TIP - 1, MAX_TIP + 1] {
        let e = tip_refusal(&app, payer, outside).await;
        assert!(
            matches!(
                e,
                LedgerError::AmountOutOfRange {
                    min: MIN_TIP,
                    max: MAX_TIP
                }
            ),
            "{outside}: {e:?}"
        );
    }
    for inside in [MIN_TIP, MAX_TIP] {
        let e = tip_refusal(&app, payer, inside).await;
        assert!(
            matches!(e, LedgerError::RecipientNotCreator),
            "{inside}: {e:?}"
        );
    }
}

/// `app.apply_token_grant` (the operator's path) to a user who does not
/// exist: amount and reason are checked before the user.
async fn grant_refusal(app: &TestApp, amount: i64, reason: &str) -> LedgerError {
    let err =
        sqlx::query("select * from app.apply_token_grant($1, $2, $3, $4, null, 'operator:tests')")
            .bind(Uuid::new_v4())
            .bind(Uuid::new_v4())
            .bind(amount)
            .bind(reason)
            .execute(&app.db.admin_pool)
            .await
            .expect_err("refused");
    LedgerError::from(err)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_grant_bounds_are_the_ledger_constants() {
    let app = TestApp::new().await;
    for outside in [MIN_GRANT - 1, MAX_GRANT + 1] {
        let e = grant_refusal(&app, outside, "bonus").await;
        assert!(
            matches!(
                e,
                LedgerError::AmountOutOfRange {
                    min: MIN_GRANT,
                    max: MAX_GRANT
                }
            ),
            "{outside}: {e:?}"
        );
    }
    for inside in [MIN_GRANT, MAX_GRANT] {
        let e = grant_refusal(&app, inside, "bonus").await;
        assert!(matches!(e, LedgerError::UnknownUser), "{inside}: {e:?}");
    }
    let longest = "é".repeat(MAX_REASON_CHARS);
    let e = grant_refusal(&app, MIN_GRANT, &longest).await;
    assert!(matches!(e, LedgerError::UnknownUser), "{e:?}");
    let e = grant_refusal(&app, MIN_GRANT, &format!("{longest}é")).await;
    assert!(matches!(e, LedgerError::InvalidReason), "{e:?}");
}

/// The values `app.<table>`'s check constraint `constraint` allows, in the
/// order it lists them (`status = ANY (ARRAY['a'::text, 'b'::text])`).
async fn allowed_values(app: &TestApp, table: &str, constraint: &str) -> Vec<String> {
    let definition: String = sqlx::query_scalar(
        "select pg_get_constraintdef(c.oid) from pg_constraint c \
         where c.conrelid = $1::regclass and c.conname = $2 and c.contype = 'c'",
    )
    .bind(format!("app.{table}"))
    .bind(constraint)
    .fetch_one(&app.db.admin_pool)
    .await
    .unwrap_or_else(|e| panic!("check constraint {constraint} on app.{table}: {e}"));
    assert!(
        definition.contains(" = ANY (ARRAY["),
        "{constraint} is not a list of statuses: {definition}"
    );
    // The quoted literals are every other piece between single quotes.
    definition
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Each value's text, after checking that JSON spells it the same way.
fn texts<T: Copy + serde::Serialize>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<String> {
    all.iter()
        .map(|&v| {
            let text = as_str(v);
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(text));
            text.to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_enums_are_the_sql_check_constraints() {
    let app = TestApp::new().await;
    let openapi: serde_json::Value =
        serde_json::from_str(stagepass_routes::openapi::document()).expect("the document is JSON");
    let cases = [
        (
            "ClassStatus",
            "classes",
            "classes_status_check",
            texts(ClassStatus::ALL, ClassStatus::as_str),
        ),
        (
            "EnrollmentStatus",
            "enrollments",
            "enrollments_status_check",
            texts(EnrollmentStatus::ALL, EnrollmentStatus::as_str),
        ),
        (
            "PurchaseStatus",
            "purchases",
            "purchases_status_check",
            texts(PurchaseStatus::ALL, PurchaseStatus::as_str),
        ),
        (
            "CalendarEventStatus",
            "calendar_events",
            "calendar_events_status_check",
            texts(CalendarEventStatus::ALL, CalendarEventStatus::as_str),
        ),
        (
            "CallStatus",
            "calls",
            "calls_status_check",
            texts(CallStatus::ALL, CallStatus::as_str),
        ),
        (
            "CallMedia",
            "calls",
            "calls_media_check",
            texts(CallMedia::ALL, CallMedia::as_str),
        ),
        (
            "EndReason",
            "calls",
            "calls_end_reason_check",
            texts(EndReason::ALL, EndReason::as_str),
        ),
        (
            "PayoutStatus",
            "payouts",
            "payouts_status_check",
            texts(PayoutStatus::ALL, PayoutStatus::as_str),
        ),
        (
            "TransfersCapability",
            "connect_accounts",
            "connect_accounts_transfers_check",
            texts(TransfersCapability::ALL, TransfersCapability::as_str),
        ),
    ];
    for (component, table, constraint, rust) in cases {
        let sql = allowed_values(&app, table, constraint).await;
        assert_eq!(sql, rust, "app.{table}.status");
        // The OpenAPI document lists the same values (the enrolment status
        // is not in any response, so not in the document).
        let schema = &openapi["components"]["schemas"][component];
        if table != "enrollments" {
            assert_eq!(schema["type"], "string", "{component}: {schema}");
            assert_eq!(schema["enum"], serde_json::json!(sql), "{component}");
        }
    }
    // Every status check constraint of schema app is one of the above: a
    // new status column needs its enum (and a line here).
    let mut checked: Vec<String> = sqlx::query_scalar(
        "select c.conname::text from pg_constraint c \
           join pg_attribute a on a.attrelid = c.conrelid and a.attnum = any (c.conkey) \
         where c.contype = 'c' and c.connamespace = 'app'::regnamespace \
           and a.attname = 'status' \
           and pg_get_constraintdef(c.oid) like '%status = ANY (ARRAY[%' order by 1",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("status constraints");
    checked.sort();
    assert_eq!(
        checked,
        [
            "calendar_events_status_check",
            "calls_status_check",
            "classes_status_check",
            "enrollments_status_check",
            "payouts_status_check",
            "purchases_status_check",
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_payout_rate_and_minimum_are_the_ledger_constants() {
    let app = TestApp::new().await;
    let (cents, minimum): (i32, i64) =
        sqlx::query_as("select cents_per_token, minimum_tokens from app.payout_config")
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("payout config");
    assert_eq!(i64::from(cents), CENTS_PER_TOKEN);
    assert_eq!(minimum, MINIMUM_TOKENS);
    // The rate cannot be changed by a setting: 1 token is 5 cents (SPEC).
    let changed = sqlx::query("update app.payout_config set cents_per_token = 500")
        .execute(&app.db.admin_pool)
        .await;
    assert!(
        changed.is_err(),
        "dollars as cents are refused by the database"
    );
}
