//! `stagepass flags list|show|create|set|history`: the operator's way to
//! see and change feature flags (ADR 0016). Changes go through
//! `app.operator_change_flag`, the same locked, audited path as the admin
//! routes, as the service role, recorded as `operator:$USER`.

use std::process::ExitCode;

use sqlx::PgPool;
use stagepass_platform::db;
use stagepass_platform::flags::{FlagFields, valid_key, valid_text};

use crate::args::Parsed;
use crate::error::{Context as _, Result, fail};

pub const VALUE_OPTIONS: [&str; 7] = [
    "--description",
    "--reason",
    "--enabled",
    "--rollout",
    "--roles",
    "--allow",
    "--deny",
];

/// A validated `flags create` or `flags set` (checked before touching the
/// database, with the rules `app.apply_flag_change` enforces again).
#[derive(Debug, PartialEq, Eq)]
pub struct FlagChange {
    pub key: String,
    pub create: bool,
    pub fields: FlagFields,
    pub reason: String,
}

/// `5`, `5%`, `12.5`, `0.01` percent → basis points (0–10,000).
pub fn parse_percent(text: &str) -> Option<i64> {
    let t = text.trim().trim_end_matches('%').trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty()
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || whole.len() > 3
    {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    let bp = whole * 100 + frac;
    (0..=10_000).contains(&bp).then_some(bp)
}

/// A comma-separated list; `none` (or nothing) is the empty list.
fn split_list(text: &str) -> Vec<String> {
    if text.trim() == "none" {
        return Vec::new();
    }
    text.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn users(option: &str, text: &str) -> Result<Vec<uuid::Uuid>> {
    split_list(text)
        .iter()
        .map(|u| {
            uuid::Uuid::parse_str(u)
                .map_err(|_| format!("{option}: '{u}' is not a user id (expected a UUID)").into())
        })
        .collect()
}

impl FlagChange {
    pub fn parse(key: &str, create: bool, p: &Parsed) -> Result<FlagChange> {
        if !valid_key(key) {
            return fail(format!(
                "'{key}' is not a flag key: 2-40 characters of a-z, 0-9 and _, starting with a letter"
            ));
        }
        let Some(reason) = p.value("--reason").filter(|r| valid_text(r)) else {
            return fail("--reason is required: 1-500 characters, no control characters");
        };
        let enabled = match p.value("--enabled") {
            None => None,
            Some("on" | "true" | "yes") => Some(true),
            Some("off" | "false" | "no") => Some(false),
            Some(other) => return fail(format!("--enabled: '{other}' is not on or off")),
        };
        let rollout_basis_points = match p.value("--rollout") {
            None => None,
            Some(v) => Some(parse_percent(v).ok_or_else(|| {
                format!("--rollout: '{v}' is not a percentage from 0 to 100 (at most 2 decimals)")
            })?),
        };
        let fields = FlagFields {
            description: p.value("--description").map(str::to_owned),
            enabled,
            rollout_basis_points,
            allow_users: p
                .value("--allow")
                .map(|v| users("--allow", v))
                .transpose()?,
            deny_users: p.value("--deny").map(|v| users("--deny", v)).transpose()?,
            roles: p.value("--roles").map(split_list),
        };
        if create && fields.description.is_none() {
            return fail("--description is required to create a flag");
        }
        if !create && fields.is_empty() {
            return fail(
                "nothing to change: give --enabled, --rollout, --roles, --allow, --deny or --description",
            );
        }
        if let Some(e) = fields.errors().first() {
            return fail(format!("{}: {}", e.field, e.message));
        }
        Ok(FlagChange {
            key: key.to_owned(),
            create,
            fields,
            reason: reason.to_owned(),
        })
    }
}

type Row = (
    String,
    String,
    bool,
    i32,
    Vec<uuid::Uuid>,
    Vec<uuid::Uuid>,
    Vec<String>,
);

const COLUMNS: &str =
    "key, description, enabled, rollout_basis_points, allow_users, deny_users, roles";

fn describe(r: &Row) -> String {
    let (key, description, enabled, bp, allow, deny, roles) = r;
    format!(
        "{key}: {} at {}.{:02} %, roles {}, allow {}, deny {} — {description}",
        if *enabled { "on" } else { "off" },
        bp / 100,
        bp % 100,
        if roles.is_empty() {
            "all".to_owned()
        } else {
            roles.join(",")
        },
        allow.len(),
        deny.len(),
    )
}

pub async fn change(change: FlagChange) -> Result<ExitCode> {
    let pool = connect().await?;
    let result = apply(&pool, &change, &crate::users::operator_name()).await;
    pool.close().await;
    let row = result?;
    println!(
        "{} {}",
        if change.create { "created" } else { "now" },
        describe(&row)
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `app.operator_change_flag` in its own transaction as the service role.
pub async fn apply(pool: &PgPool, change: &FlagChange, operator: &str) -> Result<Row> {
    let mut tx = db::begin_service(pool)
        .await
        .context("starting a transaction as the service role")?;
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from app.operator_change_flag($1, $2, $3, $4, $5)"
    )))
    .bind(&change.key)
    .bind(change.create)
    .bind(change.fields.to_patch())
    .bind(operator)
    .bind(&change.reason)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| explain(&e, &change.key))?;
    tx.commit().await.context("committing the flag change")?;
    Ok(row)
}

fn explain(e: &sqlx::Error, key: &str) -> crate::error::BoxError {
    use stagepass_ledger::sqlstate::{self, Refusal};
    match sqlstate::raised(e).map(|r| r.refusal) {
        Some(Refusal::InvalidFlagReason) => {
            "--reason: 1-500 characters, no control characters".into()
        }
        Some(Refusal::FlagExists) => format!("flag {key} already exists (use `flags set`)").into(),
        Some(Refusal::UnknownFlag) => {
            format!("flag {key} does not exist (use `flags create`)").into()
        }
        Some(Refusal::InvalidFlagFields) => format!("invalid flag fields: {e}").into(),
        _ if matches!(
            db::sqlstate(e).as_deref(),
            Some("42883" | "3F000" | "42P01")
        ) =>
        {
            "the flag tables do not exist: run `stagepass migrate` first".into()
        }
        _ => format!("changing the flag: {e}").into(),
    }
}

pub async fn list(key: Option<&str>) -> Result<ExitCode> {
    let pool = connect().await?;
    let rows = async {
        let mut tx = db::begin_service(&pool).await.context("connecting")?;
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {COLUMNS} from app.feature_flags where $1::text is null or key = $1 order by key"
        )))
        .bind(key)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| explain(&e, key.unwrap_or("")))?;
        tx.commit().await.context("reading flags")?;
        Ok::<_, crate::error::BoxError>(rows)
    }
    .await;
    pool.close().await;
    let rows = rows?;
    if let Some(key) = key {
        let Some(r) = rows.first() else {
            return fail(format!("flag {key} does not exist"));
        };
        println!("{}", describe(r));
        for (name, ids) in [("allow", &r.4), ("deny", &r.5)] {
            for id in ids {
                println!("  {name} {id}");
            }
        }
    } else {
        for r in &rows {
            println!("{}", describe(r));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `changed_at, actor, reason, before, after` of an audit row.
type Change = (
    chrono::DateTime<chrono::Utc>,
    String,
    String,
    Option<serde_json::Value>,
    serde_json::Value,
);

pub async fn history(key: &str) -> Result<ExitCode> {
    let pool = connect().await?;
    let rows = async {
        let mut tx = db::begin_service(&pool).await.context("connecting")?;
        let rows: Vec<Change> = sqlx::query_as(
            "select changed_at, actor, reason, before, after from app.feature_flag_changes \
                 where flag_key = $1 order by id",
        )
        .bind(key)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| explain(&e, key))?;
        tx.commit().await.context("reading the history")?;
        Ok::<_, crate::error::BoxError>(rows)
    }
    .await;
    pool.close().await;
    for (at, actor, reason, before, after) in rows? {
        let before = before.map_or_else(|| "(created)".to_owned(), |b| b.to_string());
        println!("{at} {actor} — {reason}\n  before {before}\n  after  {after}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect() -> Result<PgPool> {
    let url = crate::users::database_url()?;
    crate::migrate::connect(&url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Parsed {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        crate::args::parse(&args, &VALUE_OPTIONS, &[]).expect("parse")
    }

    #[test]
    fn percentages_are_basis_points() {
        for (text, bp) in [
            ("0", 0),
            ("5", 500),
            ("5%", 500),
            ("12.5", 1250),
            ("0.01", 1),
            ("100", 10_000),
            ("100.00", 10_000),
        ] {
            assert_eq!(parse_percent(text), Some(bp), "{text}");
        }
        for text in [
            "", "-1", "100.01", "101", "1.234", "five", ".5", "1e2", "0x10",
        ] {
            assert_eq!(parse_percent(text), None, "{text}");
        }
    }

    #[test]
    fn changes_are_validated_before_touching_the_database() {
        let id = uuid::Uuid::from_u128(7);
        let c = FlagChange::parse(
            "calls",
            false,
            &parsed(&[
                "--enabled",
                "on",
                "--rollout",
                "5",
                "--roles",
                "creator,admin",
                "--allow",
                &id.to_string(),
                "--deny",
                "none",
                "--reason",
                "staff first",
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.fields.to_patch(),
            serde_json::json!({ "enabled": true, "rollout_basis_points": 500,
                "roles": ["creator", "admin"], "allow_users": [id], "deny_users": [] })
        );
        for (key, create, args) in [
            ("calls", false, vec!["--enabled", "on"]),
            ("calls", false, vec!["--reason", "nothing"]),
            ("Calls", false, vec!["--enabled", "on", "--reason", "r"]),
            ("calls", false, vec!["--enabled", "maybe", "--reason", "r"]),
            ("calls", false, vec!["--rollout", "200", "--reason", "r"]),
            ("calls", false, vec!["--roles", "boss", "--reason", "r"]),
            ("calls", false, vec!["--allow", "x", "--reason", "r"]),
            ("calls", false, vec!["--enabled", "on", "--reason", "a\nb"]),
            ("beta", true, vec!["--reason", "no description"]),
        ] {
            assert!(
                FlagChange::parse(key, create, &parsed(&args)).is_err(),
                "{key} {args:?}"
            );
        }
    }

    /// The operator's path end to end: created, changed, refused when it
    /// exists or is missing, every change audited as `operator:<name>`.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_operator_creates_and_changes_a_flag_with_an_audit_row_each() {
        let db = stagepass_platform::testing::TestDb::new().await;
        let create = FlagChange::parse(
            "beta",
            true,
            &parsed(&["--description", "Beta", "--reason", "new"]),
        )
        .expect("valid");
        let row = apply(&db.app_pool, &create, "ops").await.expect("created");
        assert_eq!((row.0.as_str(), row.2, row.3), ("beta", false, 0));
        assert!(apply(&db.app_pool, &create, "ops").await.is_err(), "exists");

        let set = FlagChange::parse(
            "beta",
            false,
            &parsed(&[
                "--enabled",
                "on",
                "--rollout",
                "12.5",
                "--reason",
                "rollout",
            ]),
        )
        .expect("valid");
        let row = apply(&db.app_pool, &set, "ops").await.expect("changed");
        assert_eq!((row.2, row.3), (true, 1250));
        let missing = FlagChange {
            key: "nope".into(),
            ..set
        };
        let err = apply(&db.app_pool, &missing, "ops")
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");

        let audit: Vec<(String, String)> = sqlx::query_as(
            "select actor, reason from app.feature_flag_changes where flag_key = 'beta' order by id",
        )
        .fetch_all(&db.admin_pool)
        .await
        .expect("audit");
        assert_eq!(
            audit,
            [
                ("operator:ops".to_owned(), "new".to_owned()),
                ("operator:ops".to_owned(), "rollout".to_owned())
            ]
        );
    }
}
