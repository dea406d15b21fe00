//! One clock (issue 10, ADR 0014): `app.now()` is the only function that
//! reads the wall clock, a production database's clock cannot be moved by
//! anything a request can do, and a test database's clock moves with the
//! Rust `Clock` of the test.

use std::path::{Path, PathBuf};

use sqlx::{Connection as _, PgConnection, Row as _};
use stagepass_platform::auth::Claims;
use stagepass_platform::db;
use stagepass_platform::testing::{TestDb, admin_connection, shift_clock_local};

/// Every way Postgres reads the wall clock (functions, SQL keywords, and the
/// special input strings `'now'`, `'today'`, …).
const CLOCK_READS: &str = r"\mnow[[:space:]]*\(|\m(clock_timestamp|current_timestamp|statement_timestamp|transaction_timestamp|localtimestamp|localtime|current_date|current_time|timeofday)\M|'(now|today|tomorrow|yesterday)'";

/// The schemas the migrations own.
const OURS: &str = "('app', 'ledger', 'auth')";

fn claims(sub: uuid::Uuid) -> Claims {
    Claims {
        sub,
        email: None,
        email_verified: false,
        app_role: None,
        session_id: None,
        exp: 0,
        raw: serde_json::json!({"sub": sub, "role": "authenticated"}),
    }
}

async fn names(conn: &mut PgConnection, sql: &str) -> Vec<String> {
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(CLOCK_READS)
        .fetch_all(conn)
        .await
        .expect(sql)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migrated_database_reads_the_wall_clock_in_app_now_only() {
    let db = TestDb::production().await;
    let mut conn = admin_connection(&db).await;

    // Functions (rule functions, trigger functions; bodies of both kinds:
    // `pg_get_functiondef` shows SQL-standard bodies too).
    let functions = names(
        &mut conn,
        &format!(
            "select p.oid::regprocedure::text from pg_proc p \
               join pg_namespace n on n.oid = p.pronamespace \
              where n.nspname in {OURS} and p.prokind in ('f', 'p') \
                and replace(pg_get_functiondef(p.oid), 'app.now()', '') ~* $1 order by 1"
        ),
    )
    .await;
    assert_eq!(functions, ["app.now()"], "only app.now() reads the clock");
    // Every trigger runs one of those functions.
    let foreign_triggers = names(
        &mut conn,
        &format!(
            "select t.tgname::text from pg_trigger t \
               join pg_proc p on p.oid = t.tgfoid \
               join pg_namespace n on n.oid = p.pronamespace \
              where not t.tgisinternal and n.nspname not in {OURS} and $1 is not null"
        ),
    )
    .await;
    assert_eq!(foreign_triggers, Vec::<String>::new());
    // Column defaults, check constraints, policies, views.
    let others = names(
        &mut conn,
        &format!(
            "select format('default %s.%s', c.oid::regclass, a.attname) from pg_attrdef d \
               join pg_class c on c.oid = d.adrelid \
               join pg_namespace n on n.oid = c.relnamespace \
               join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum \
              where n.nspname in {OURS} \
                and replace(pg_get_expr(d.adbin, d.adrelid), 'app.now()', '') ~* $1 \
             union all \
             select format('constraint %s', k.conname) from pg_constraint k \
               join pg_namespace n on n.oid = k.connamespace \
              where n.nspname in {OURS} and k.contype = 'c' \
                and replace(pg_get_constraintdef(k.oid), 'app.now()', '') ~* $1 \
             union all \
             select format('policy %s', p.polname) from pg_policy p \
               join pg_class c on c.oid = p.polrelid \
               join pg_namespace n on n.oid = c.relnamespace \
              where n.nspname in {OURS} \
                and replace(coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' ' || \
                            coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''), \
                            'app.now()', '') ~* $1 \
             union all \
             select format('view %s', c.oid::regclass) from pg_class c \
               join pg_namespace n on n.oid = c.relnamespace \
              where n.nspname in {OURS} and c.relkind in ('v', 'm') \
                and replace(pg_get_viewdef(c.oid), 'app.now()', '') ~* $1"
        ),
    )
    .await;
    assert_eq!(others, Vec::<String>::new(), "a second clock");
    // Defaults that stamp rows ask the one clock too.
    let stamped: i64 = sqlx::query_scalar(
        "select count(*) from pg_attrdef d join pg_class c on c.oid = d.adrelid \
          where c.relnamespace in ('app'::regnamespace, 'ledger'::regnamespace) \
            and pg_get_expr(d.adbin, d.adrelid) = 'app.now()'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("defaults");
    assert!(stamped >= 20, "{stamped} defaults use app.now()");

    // And app.now() itself reads no setting in production: nothing a
    // session sets can move it.
    let body: String =
        sqlx::query_scalar("select prosrc from pg_proc where oid = 'app.now()'::regprocedure")
            .fetch_one(&mut conn)
            .await
            .expect("app.now");
    assert_eq!(body.trim(), "select pg_catalog.now()");
}

/// Whatever a session sets, as the login the functions use and as every
/// role a request or a job runs as, a production database's `app.now()` is
/// the transaction's start; and none of those roles can replace it.
#[tokio::test(flavor = "multi_thread")]
async fn no_role_a_request_runs_as_can_move_a_production_clock() {
    let db = TestDb::production().await;
    let settings = [
        "stagepass.clock_offset",
        "stagepass.clock_override",
        "stagepass.test_clock",
        "app.now",
        "request.clock",
    ];
    for role in [None, Some(db::USER_ROLE), Some(db::SERVICE_ROLE)] {
        let mut tx = match role {
            Some(db::USER_ROLE) => db::begin_user(&db.app_pool, &claims(uuid::Uuid::new_v4()))
                .await
                .expect("begin_user"),
            Some(_) => db::begin_service(&db.app_pool)
                .await
                .expect("begin_service"),
            None => db.app_pool.begin().await.expect("begin"),
        };
        for name in settings {
            for local in [true, false] {
                sqlx::query("select set_config($1, '1000 days', $2)")
                    .bind(name)
                    .bind(local)
                    .execute(&mut *tx)
                    .await
                    .expect("any role may set a custom setting");
            }
        }
        shift_clock_local(&mut tx, chrono::Duration::days(1000))
            .await
            .expect("the test helper's setting");
        let row = sqlx::query("select app.now() = now() as same, current_user::text as who")
            .fetch_one(&mut *tx)
            .await
            .expect("app.now()");
        assert!(
            row.get::<bool, _>("same"),
            "{} moved the clock",
            row.get::<String, _>("who")
        );
        tx.rollback().await.expect("rollback");
    }

    // Replacing the function, adding the test clock's schema, or changing
    // the function's owner: refused to every one of those roles.
    let attempts = [
        "create or replace function app.now() returns timestamptz language sql stable \
         as $$ select pg_catalog.now() + interval '1000 days' $$",
        "alter function app.now() rename to later_now",
        "drop function app.now() cascade",
        "create schema stagepass_test",
        "create function app.later() returns timestamptz language sql \
         as $$ select pg_catalog.now() + interval '1000 days' $$",
    ];
    for role in [None, Some(db::USER_ROLE), Some(db::SERVICE_ROLE)] {
        for sql in attempts {
            let mut conn = db.app_pool.acquire().await.expect("acquire");
            let mut tx = conn.begin().await.expect("begin");
            if let Some(role) = role {
                sqlx::query("select set_config('role', $1, true)")
                    .bind(role)
                    .execute(&mut *tx)
                    .await
                    .expect("set role");
            }
            let err = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .expect_err(sql);
            assert_eq!(
                db::sqlstate(&err).as_deref(),
                Some("42501"),
                "{role:?}: {sql}: {err}"
            );
        }
    }
}

/// In a test database one call moves the database's and the Rust clock.
#[tokio::test(flavor = "multi_thread")]
async fn a_test_database_moves_app_now_with_the_rust_clock() {
    let db = TestDb::new().await;
    let mut tx = db::begin_user(&db.app_pool, &claims(uuid::Uuid::new_v4()))
        .await
        .expect("begin_user");
    let same: bool = sqlx::query_scalar("select app.now() = now()")
        .fetch_one(&mut *tx)
        .await
        .expect("app.now");
    assert!(same, "no offset before the test moves time");
    tx.rollback().await.expect("rollback");

    db.advance_clock(chrono::Duration::hours(25)).await;
    let rust = db.clock.now() - chrono::Utc::now() - chrono::Duration::hours(25);
    assert!(
        rust.num_seconds().abs() <= 1,
        "the Rust clock moved 25 h: {rust}"
    );
    for pool in [&db.app_pool, &db.admin_pool] {
        let offset: f64 =
            sqlx::query_scalar("select extract(epoch from app.now() - now())::float8")
                .fetch_one(pool)
                .await
                .expect("offset");
        assert_eq!(offset, 25.0 * 3600.0);
    }
    // For one transaction only.
    let mut tx = db.app_pool.begin().await.expect("begin");
    shift_clock_local(&mut tx, chrono::Duration::minutes(30))
        .await
        .expect("shift");
    let offset: f64 = sqlx::query_scalar("select extract(epoch from app.now() - now())::float8")
        .fetch_one(&mut *tx)
        .await
        .expect("offset");
    assert_eq!(offset, 25.5 * 3600.0);
    tx.rollback().await.expect("rollback");

    // The test clock's offset is the superuser's: request roles read it only.
    let mut tx = db::begin_user(&db.app_pool, &claims(uuid::Uuid::new_v4()))
        .await
        .expect("begin_user");
    let err = sqlx::query("update stagepass_test.clock set offset_by = interval '0'")
        .execute(&mut *tx)
        .await
        .expect_err("update the test clock");
    assert_eq!(db::sqlstate(&err).as_deref(), Some("42501"), "{err}");
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code that serves requests never sets a clock: every `set_config` it
/// runs names `request.jwt.claims` or `role`, no SQL it sends names the test
/// clock, and only the test support does (`testing.rs`, a `testing`-feature
/// module). Together with the test above (a production `app.now()` reads no
/// setting and no request role can replace it), no route, header or body
/// can move the clock.
#[test]
fn only_the_test_support_names_the_test_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in ["crates", "api"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found the sources: {}", files.len());
    let mut offenders = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/");
        if !rel.contains("/src/") || rel.ends_with("platform/src/testing.rs") {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("read");
        for (i, line) in text.lines().enumerate() {
            let named = [
                "stagepass.clock",
                "stagepass_test",
                "clock_offset",
                "clock_override",
            ]
            .iter()
            .any(|n| line.contains(n));
            let other_setting = line.match_indices("set_config(").any(|(at, _)| {
                let rest = &line[at + "set_config(".len()..];
                !(rest.starts_with("'request.jwt.claims'") || rest.starts_with("'role'"))
            });
            if named || other_setting {
                offenders.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert_eq!(offenders, Vec::<String>::new());
}
