//! Attack tests against row-level security and grants, with hand-written
//! SQL on the functions' own login, exactly as a buggy handler would run it
//! (SPEC §1 "Row Level Security", §6 defect 10).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use common::TestApp;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// A transaction on the app login, switched to `authenticated` with `user`'s
/// claims — what `db::begin_user` does for every request.
async fn as_user(pool: &PgPool, user: Uuid) -> Transaction<'_, Postgres> {
    let mut tx = pool.begin().await.expect("begin");
    let claims = format!(r#"{{"sub":"{user}","role":"authenticated"}}"#);
    sqlx::query("select set_config('request.jwt.claims', $1, true), set_config('role', 'authenticated', true)")
        .bind(claims)
        .execute(&mut *tx)
        .await
        .expect("switch to authenticated");
    tx
}

/// Runs `sql` as `user` and returns the SQLSTATE it failed with.
async fn denied(pool: &PgPool, user: Uuid, sql: &str) -> String {
    let mut tx = as_user(pool, user).await;
    let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .expect_err(&format!("`{sql}` must fail for a user"));
    stagepass_platform::db::sqlstate(&err).unwrap_or_else(|| panic!("`{sql}`: {err}"))
}

/// Rows affected by `sql` run as `user` (the transaction is rolled back).
async fn affected(pool: &PgPool, user: Uuid, sql: &str) -> u64 {
    let mut tx = as_user(pool, user).await;
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {e}"))
        .rows_affected()
}

/// Two users with private rows, created as the superuser.
async fn two_users(app: &TestApp) -> (Uuid, Uuid) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, email) in [(a, "a@example.test"), (b, "b@example.test")] {
        app.set_role(id, "fan").await;
        sqlx::query(
            "insert into app.user_private (user_id, email, email_verified) values ($1, $2, true)",
        )
        .bind(id)
        .bind(email)
        .execute(&app.db.admin_pool)
        .await
        .expect("user_private fixture");
    }
    sqlx::query("update app.users set display_name = 'Bee' where id = $1")
        .bind(b)
        .execute(&app.db.admin_pool)
        .await
        .expect("fixture");
    (a, b)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_cannot_change_their_own_role() {
    let app = TestApp::new().await;
    let (a, _) = two_users(&app).await;
    let pool = &app.db.app_pool;
    for sql in [
        format!("update app.users set role = 'admin' where id = '{a}'"),
        format!("update app.users set role = 'creator' where id = '{a}'"),
        format!("update app.users set role = 'admin', display_name = 'x' where id = '{a}'"),
        format!("update app.users set id = gen_random_uuid() where id = '{a}'"),
        format!("update app.users set created_at = now() where id = '{a}'"),
    ] {
        assert_eq!(denied(pool, a, &sql).await, "42501", "{sql}");
    }
    assert_eq!(app.role_of(a).await.as_deref(), Some("fan"));
    // The two columns a user may change do change, on their own row.
    assert_eq!(
        affected(
            pool,
            a,
            &format!("update app.users set display_name = 'Me' where id = '{a}'")
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_cannot_update_another_users_row() {
    let app = TestApp::new().await;
    let (a, b) = two_users(&app).await;
    let pool = &app.db.app_pool;
    assert_eq!(
        affected(
            pool,
            a,
            &format!("update app.users set display_name = 'x' where id = '{b}'")
        )
        .await,
        0
    );
    assert_eq!(
        affected(pool, a, "update app.users set handle = null").await,
        1,
        "only A's row"
    );
    let name: Option<String> =
        sqlx::query_scalar("select display_name from app.users where id = $1")
            .bind(b)
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("row");
    assert_eq!(name.as_deref(), Some("Bee"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_reads_only_their_own_private_row() {
    let app = TestApp::new().await;
    let (a, b) = two_users(&app).await;
    let pool = &app.db.app_pool;

    let mut tx = as_user(pool, a).await;
    let other: Vec<Option<String>> =
        sqlx::query_scalar("select email from app.user_private where user_id = $1")
            .bind(b)
            .fetch_all(&mut *tx)
            .await
            .expect("query");
    assert!(other.is_empty(), "A read B's e-mail: {other:?}");
    let all: Vec<(Uuid, Option<String>)> =
        sqlx::query_as("select user_id, email from app.user_private")
            .fetch_all(&mut *tx)
            .await
            .expect("query");
    assert_eq!(all, vec![(a, Some("a@example.test".to_owned()))]);
    // Public profile columns of everyone are readable; the list has both.
    let ids: i64 = sqlx::query_scalar("select count(*) from app.users where id in ($1, $2)")
        .bind(a)
        .bind(b)
        .fetch_one(&mut *tx)
        .await
        .expect("query");
    assert_eq!(ids, 2);
    drop(tx);

    // Nor can a user write private rows at all.
    for sql in [
        format!("update app.user_private set email = 'x@evil.test' where user_id = '{a}'"),
        format!("update app.user_private set email = 'x@evil.test' where user_id = '{b}'"),
        format!("delete from app.user_private where user_id = '{b}'"),
        format!(
            "insert into app.user_private (user_id, email) values ('{}', 'x')",
            Uuid::new_v4()
        ),
    ] {
        assert_eq!(denied(pool, a, &sql).await, "42501", "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_cannot_insert_users_or_audit_rows() {
    let app = TestApp::new().await;
    let (a, b) = two_users(&app).await;
    let pool = &app.db.app_pool;
    let new = Uuid::new_v4();
    for sql in [
        format!("insert into app.users (id, role) values ('{new}', 'admin')"),
        format!("insert into app.users (id) values ('{new}')"),
        format!("delete from app.users where id = '{b}'"),
        format!(
            "insert into app.role_changes (user_id, old_role, new_role, changed_by, actor) \
             values ('{a}', 'fan', 'admin', '{a}', 'user:{a}')"
        ),
        "select * from app.role_changes".to_owned(),
        "update app.role_changes set new_role = 'admin'".to_owned(),
        "delete from app.role_changes".to_owned(),
    ] {
        assert_eq!(denied(pool, a, &sql).await, "42501", "{sql}");
    }
    assert_eq!(app.role_of(new).await, None);
    assert_eq!(app.role_of(b).await.as_deref(), Some("fan"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_cannot_call_the_operator_or_internal_role_functions() {
    let app = TestApp::new().await;
    let (a, b) = two_users(&app).await;
    let pool = &app.db.app_pool;
    for sql in [
        format!("select app.operator_set_role('{a}', 'admin', 'me', null)"),
        format!("select app.apply_role_change('{a}', 'admin', null, 'operator:x', null)"),
    ] {
        assert_eq!(denied(pool, a, &sql).await, "42501", "{sql}");
    }
    // The admin entry point is callable but refuses a non-admin caller.
    for sql in [
        format!("select app.admin_set_role('{b}', 'admin', null)"),
        format!("select app.admin_set_role('{a}', 'admin', null)"),
    ] {
        assert_eq!(denied(pool, a, &sql).await, "42501", "{sql}");
    }
    // Forged claims cannot help: `app_role` in the token is not consulted.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("select set_config('request.jwt.claims', $1, true), set_config('role', 'authenticated', true)")
        .bind(format!(r#"{{"sub":"{a}","role":"authenticated","app_role":"admin","user_metadata":{{"role":"admin"}}}}"#))
        .execute(&mut *tx)
        .await
        .expect("claims");
    let err = sqlx::query("select app.admin_set_role($1, 'admin', null)")
        .bind(a)
        .execute(&mut *tx)
        .await
        .expect_err("forged claims must not make an admin");
    assert_eq!(
        stagepass_platform::db::sqlstate(&err).as_deref(),
        Some("42501")
    );
    drop(tx);

    assert_eq!(app.role_of(a).await.as_deref(), Some("fan"));
    assert_eq!(app.role_of(b).await.as_deref(), Some("fan"));
    assert_eq!(app.role_change_count(a).await, 0, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_claims_a_session_sees_no_private_rows_and_cannot_exist() {
    let app = TestApp::new().await;
    let _ = two_users(&app).await;
    let mut tx = app.db.app_pool.begin().await.expect("begin");
    sqlx::query("select set_config('role', 'authenticated', true)")
        .execute(&mut *tx)
        .await
        .expect("role");
    let n: i64 = sqlx::query_scalar("select count(*) from app.user_private")
        .fetch_one(&mut *tx)
        .await
        .expect("count");
    assert_eq!(n, 0);
    let err = sqlx::query("select * from app.ensure_current_user()")
        .execute(&mut *tx)
        .await
        .expect_err("no user without claims");
    assert_eq!(
        stagepass_platform::db::sqlstate(&err).as_deref(),
        Some("28000")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_app_login_itself_can_read_nothing() {
    let app = TestApp::new().await;
    let _ = two_users(&app).await;
    let pool = &app.db.app_pool;
    // Each probe in a transaction of its own, as everything the functions
    // run (through a transaction pooler a bare statement may be split
    // across server connections: STAGEPASS_TEST_DB_PROXY).
    let mut tx = pool.begin().await.expect("begin");
    let who: String = sqlx::query_scalar("select current_user::text")
        .fetch_one(&mut *tx)
        .await
        .expect("current_user");
    drop(tx);
    assert_eq!(who, "stagepass_app");
    for sql in [
        "select * from app.users",
        "select * from app.user_private",
        "select * from app.role_changes",
        "update app.users set role = 'admin'",
        "select app.operator_set_role(gen_random_uuid(), 'admin', 'x', null)",
    ] {
        let mut tx = pool.begin().await.expect("begin");
        let err = sqlx::query(sql)
            .execute(&mut *tx)
            .await
            .expect_err(&format!("stagepass_app must not run `{sql}`"));
        assert_eq!(
            stagepass_platform::db::sqlstate(&err).as_deref(),
            Some("42501"),
            "{sql}: {err}"
        );
    }
    // It cannot become a superuser-ish role either.
    for role in ["postgres", "pg_read_all_data", "pg_write_all_data"] {
        let mut tx = pool.begin().await.expect("begin");
        let err = sqlx::query("select set_config('role', $1, false)")
            .bind(role)
            .execute(&mut *tx)
            .await
            .expect_err(&format!("stagepass_app must not SET ROLE {role}"));
        assert_eq!(
            stagepass_platform::db::sqlstate(&err).as_deref(),
            Some("42501"),
            "{role}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_login_or_request_role_bypasses_rls() {
    let app = TestApp::new().await;
    let rows: Vec<(String, bool, bool, bool, bool)> = sqlx::query_as(
        "select rolname::text, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb from pg_roles \
         where rolname in ('stagepass_app', 'authenticated', 'stagepass_service', 'anon') \
         order by rolname",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("pg_roles");
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "anon",
            "authenticated",
            "stagepass_app",
            "stagepass_service"
        ]
    );
    for (name, sup, bypass, createrole, createdb) in &rows {
        assert!(!sup, "{name} is a superuser");
        assert!(!bypass, "{name} bypasses RLS");
        assert!(!createrole, "{name} can create roles");
        assert!(!createdb, "{name} can create databases");
    }
    // RLS is enabled and forced on every table in schema app.
    let unprotected: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where n.nspname = 'app' and c.relkind = 'r' \
         and not (c.relrowsecurity and c.relforcerowsecurity)",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("pg_class");
    assert!(
        unprotected.is_empty(),
        "tables without forced RLS: {unprotected:?}"
    );
    // stagepass_app owns nothing in the database.
    let owned: i64 = sqlx::query_scalar(
        "select count(*) from pg_class c join pg_roles r on r.oid = c.relowner \
         where r.rolname = 'stagepass_app'",
    )
    .fetch_one(&app.db.admin_pool)
    .await
    .expect("owned");
    assert_eq!(owned, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_are_transaction_local_and_do_not_leak_to_the_next_request() {
    let app = TestApp::new().await;
    let (a, _) = two_users(&app).await;
    // One connection, so the next transaction is guaranteed to reuse it.
    let mut conn = app.db.app_pool.acquire().await.expect("acquire");
    {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("begin");
        sqlx::query("select set_config('request.jwt.claims', $1, true), set_config('role', 'authenticated', true)")
            .bind(format!(r#"{{"sub":"{a}","role":"authenticated"}}"#))
            .execute(&mut *tx)
            .await
            .expect("switch");
        tx.commit().await.expect("commit");
    }
    let (user, claims): (String, Option<String>) = sqlx::query_as(
        "select current_user::text, nullif(current_setting('request.jwt.claims', true), '')",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("probe");
    assert_eq!(user, "stagepass_app");
    assert_eq!(claims, None);
}

/// The one-statement reads (issue 13, migration 22) set the claims and the
/// `authenticated` role for their own implicit transaction only: the next
/// statement on the same pooled connection is the bare login again. Only
/// the login may call them (`authenticated` could pass claims of its
/// choosing), and what they read is the claims' user under RLS.
#[tokio::test(flavor = "multi_thread")]
async fn one_statement_reads_confine_their_claims_to_the_statement() {
    let app = TestApp::new().await;
    let (a, b) = two_users(&app).await;
    let claims = |u: Uuid| format!(r#"{{"sub":"{u}","role":"authenticated"}}"#);
    let mut conn = app.db.app_pool.acquire().await.expect("acquire");
    let (id, role): (Uuid, String) = sqlx::query_as("select id, role from app.read_me($1)")
        .bind(claims(a))
        .fetch_one(&mut *conn)
        .await
        .expect("read me");
    assert_eq!((id, role.as_str()), (a, "fan"));
    let (user, after): (String, Option<String>) = sqlx::query_as(
        "select current_user::text, nullif(current_setting('request.jwt.claims', true), '')",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("probe");
    assert_eq!(user, "stagepass_app", "the role ended with the statement");
    assert_eq!(after, None, "the claims ended with the statement");
    // Another user's read sees only them.
    let balance: Option<i64> = sqlx::query_scalar("select balance from app.read_balance($1)")
        .bind(claims(b))
        .fetch_optional(&mut *conn)
        .await
        .expect("read balance");
    assert_eq!(balance, Some(0));
    // A money request the same way (migration 25): a refused tip (b is no
    // creator) fails whole and records nothing, and its claims and role end
    // with it too.
    let refused = sqlx::query(
        "select outcome from app.money_request($1, 'POST /api/v1/tips', 'rls-key', 'f', 24, \
           201::smallint, 'tip', $2::jsonb)",
    )
    .bind(claims(a))
    .bind(serde_json::json!({"tip_id": Uuid::now_v7(), "recipient_id": b, "amount": 1}).to_string())
    .execute(&mut *conn)
    .await
    .expect_err("a tip to a fan is refused");
    assert!(refused.to_string().contains("not a creator"), "{refused}");
    let (user, after): (String, Option<String>) = sqlx::query_as(
        "select current_user::text, nullif(current_setting('request.jwt.claims', true), '')",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("probe");
    assert_eq!((user.as_str(), after), ("stagepass_app", None));
    let recorded: i64 = sqlx::query_scalar("select count(*) from app.idempotency_keys")
        .fetch_one(&app.db.admin_pool)
        .await
        .expect("records");
    assert_eq!(recorded, 0, "a refusal in one statement records nothing");
    // Not callable as `authenticated` (nor by anyone but the login).
    for f in [
        "app.read_me(text)",
        "app.read_balance(text)",
        "app.read_entries(text, bigint, integer)",
        "app.read_upcoming_classes(text, uuid, timestamptz, uuid, bigint)",
        "app.read_class(text, uuid)",
        "app.read_schedule(text, timestamptz, timestamptz, bigint)",
        "app.money_request(text, text, text, text, integer, smallint, text, jsonb)",
        "app.money_request_refused(text, text, text, text, integer, smallint, jsonb)",
    ] {
        for role in ["authenticated", "anon", "stagepass_service"] {
            let allowed: bool = sqlx::query_scalar(
                "select has_function_privilege($1, $2::regprocedure, 'execute')",
            )
            .bind(role)
            .bind(f)
            .fetch_one(&app.db.admin_pool)
            .await
            .expect("privilege");
            assert!(!allowed, "{role} may execute {f}");
        }
    }
    let mut tx = as_user(&app.db.app_pool, a).await;
    let refused = sqlx::query("select * from app.read_me($1)")
        .bind(claims(b))
        .execute(&mut *tx)
        .await
        .expect_err("authenticated cannot impersonate through read_me");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
    drop(tx);
    // No BEGIN carries the timeout of such a statement: the login's own
    // default does (5 s), whatever the connection's startup options (a
    // transaction pooler sends none).
    let defaults: Vec<String> = sqlx::query_scalar(
        "select unnest(rolconfig) from pg_roles where rolname = 'stagepass_app'",
    )
    .fetch_all(&app.db.admin_pool)
    .await
    .expect("role defaults");
    assert!(
        defaults.contains(&"statement_timeout=5s".to_owned()),
        "{defaults:?}"
    );
}
