//! Rules that live in SQL, checked against the SQL itself:
//!
//! - Trust levels are derived in one place, `app.trust_level` (the limiter's
//!   money policy and the daily spending limit read it). A Rust copy of the
//!   rules, `TrustLevel::derive`, was tested but never used; it is gone. The
//!   account's age is set by backdating `app.users.created_at`.
//! - Amount bounds: the API validates with the ledger's constants
//!   (`MIN_TIP`/`MAX_TIP`, `MIN_GRANT`/`MAX_GRANT`, `MAX_REASON_CHARS`), and
//!   the OpenAPI document reads them too; the SQL functions keep their own
//!   check. Here the SQL's bounds are proven equal to the constants.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::{TestApp, claims_for};
use stagepass_ledger::grants::{MAX_GRANT, MAX_REASON_CHARS, MIN_GRANT};
use stagepass_ledger::{LedgerError, MAX_TIP, MIN_TIP};
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

/// A user with `facts`, and the level `app.trust_level` derives for them.
async fn level(app: &TestApp, facts: Facts) -> String {
    let user = app.signed_in_user().await;
    let db = &app.db.admin_pool;
    sqlx::query(
        "update app.users set created_at = now() - make_interval(days => $2) where id = $1",
    )
    .bind(user.id)
    .bind(facts.age_days)
    .execute(db)
    .await
    .expect("age");
    sqlx::query(
        "update app.user_private set email_verified = $2, \
           vip_granted_at = case when $3 then now() end where user_id = $1",
    )
    .bind(user.id)
    .bind(facts.email_verified)
    .bind(facts.vip_grant)
    .execute(db)
    .await
    .expect("private facts");
    for (status, n) in [
        ("succeeded", facts.settled_purchases),
        ("disputed", facts.chargebacks),
    ] {
        for _ in 0..n {
            sqlx::query(
                "insert into app.purchases (id, user_id, package, tokens, price_cents, status) \
                 values ($1, $2, 'starter', 50, 500, $3)",
            )
            .bind(Uuid::new_v4())
            .bind(user.id)
            .bind(status)
            .execute(db)
            .await
            .expect("purchase");
        }
    }
    sqlx::query_scalar("select app.trust_level($1)")
        .bind(user.id)
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
    for (case, facts, expected) in cases {
        assert_eq!(level(&app, facts).await, expected, "{case}");
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
