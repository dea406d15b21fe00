//! `stagepass bench calls` (issue 11): one billing sweep over `--calls`
//! active calls (default 5,000) that each have a minute due, on a throwaway
//! migrated database of the local cluster.
//!
//! The database is as migrations leave it, with production's clock.
//! Seeded in SQL (set-based, untimed), exactly as the call functions leave
//! such calls: funded fans, creators, each call active for 61 s with minute
//! 1 charged and minute 2 held in escrow (journals 'call_minute' and
//! 'call_hold' posted by `ledger.post_many`), both parties seen just now.
//! Timed: one `app.sweep_calls` transaction as the service role through the
//! functions' login, commit included — what `GET /api/cron/bill-calls`
//! runs. It must charge every due minute (minute 2 of each call) and top
//! every escrow up (minute 3), and afterwards the ledger audit and the
//! call invariants must hold (0 violations, or exit 1).
//!
//! In the same run, the ceiling: `pgbench` inserting as many single rows,
//! one per transaction, into a scratch table of the same database with two
//! clients. Issue 11's targets: one sweep of 5,000 due minutes ≤ 2 s, and
//! minutes billed per second ≥ 30 % of pgbench's inserts per second
//! (printed as PASS/FAIL; a busy machine does not change the exit code).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde_json::json;
use stagepass_platform::testing::TestDb;
use uuid::Uuid;

use super::money::ledger_violations;
use crate::error::{Context as _, Result, fail};

pub struct CallsOptions {
    pub json: bool,
    pub calls: usize,
}

/// Issue 11: one sweep of 5,000 due minutes within 2 s…
const TARGET_SWEEP: Duration = Duration::from_secs(2);
/// …and at least 30 % of pgbench's single-row inserts per second.
const TARGET_SHARE: f64 = 0.30;
const PRICE: i64 = 10;
const FUNDED: i64 = 10_000;

pub async fn run(opts: CallsOptions) -> Result<ExitCode> {
    // As migrations leave it: `app.now()` is the transaction's start, as in
    // production (a test database's movable clock reads a table each time).
    let db = TestDb::production().await;
    let n = i64::try_from(opts.calls).context("--calls")?;
    let seeded = Instant::now();
    seed(&db, n).await?;
    let seed_time = seeded.elapsed();

    let started = Instant::now();
    let mut tx = stagepass_platform::db::begin_service(&db.app_pool)
        .await
        .map_err(|e| format!("begin the sweep: {e}"))?;
    let limit = i32::try_from(opts.calls).context("--calls")?;
    let swept = stagepass_ledger::calls::sweep(&mut tx, limit, None)
        .await
        .map_err(|e| format!("the sweep failed: {e}"))?;
    let before_commit = started.elapsed();
    tx.commit().await.context("commit the sweep")?;
    let sweep_time = started.elapsed();
    // The commit runs the deferred check that every journal balances.
    let commit_time = sweep_time - before_commit;

    let mut violations = Vec::new();
    if i64::from(swept.charged_minutes) != n || i64::from(swept.swept_calls) != n {
        violations.push(format!(
            "the sweep advanced {} calls and charged {} minutes; {n} of each were due",
            swept.swept_calls, swept.charged_minutes
        ));
    }
    let mut conn = db.admin_pool.acquire().await.context("audit connection")?;
    violations.extend(ledger_violations(&mut conn).await?);
    violations.extend(call_violations(&db, n).await?);

    let pgbench = pgbench_inserts(&db, opts.calls)?;
    let minutes_per_second = n as f64 / sweep_time.as_secs_f64();
    let share = minutes_per_second / pgbench.inserts_per_second;
    let pass_time = opts.calls < 5000 || sweep_time <= TARGET_SWEEP;
    let pass_share = share >= TARGET_SHARE;
    if opts.json {
        println!(
            "{}",
            json!({
                "calls": n,
                "seed_seconds": seed_time.as_secs_f64(),
                "sweep_seconds": sweep_time.as_secs_f64(),
                "commit_seconds": commit_time.as_secs_f64(),
                "minutes_billed": swept.charged_minutes,
                "minutes_per_second": minutes_per_second,
                "pgbench": {"inserts": opts.calls, "clients": pgbench.clients,
                            "seconds": pgbench.seconds,
                            "inserts_per_second": pgbench.inserts_per_second},
                "share_of_pgbench": share,
                "violations": violations,
                "target": {"sweep_seconds_max": TARGET_SWEEP.as_secs_f64(),
                           "share_min": TARGET_SHARE,
                           "pass": pass_time && pass_share},
            })
        );
    } else {
        println!("calls: {n} active calls, one minute due each (seeded in {seed_time:.1?})");
        println!(
            "one sweep: {sweep_time:.2?} (commit {commit_time:.2?}), {} minutes charged, \
             {minutes_per_second:.0} minutes/s (and {} escrows topped up)",
            swept.charged_minutes, swept.swept_calls
        );
        println!(
            "pgbench, same database: {} single-row inserts ({} clients) in {:.2} s = {:.0} inserts/s",
            opts.calls, pgbench.clients, pgbench.seconds, pgbench.inserts_per_second
        );
        println!("  sweep = {:.0} % of the pgbench ceiling", share * 100.0);
        println!("invariant violations: {}", violations.len());
        for v in &violations {
            println!("  {v}");
        }
        println!(
            "target (issue 11): sweep ≤ 2 s {}, ≥ 30 % of pgbench {}",
            if pass_time { "PASS" } else { "FAIL" },
            if pass_share { "PASS" } else { "FAIL" }
        );
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `n` active calls between `n` funded fans and `n` creators, 61 s in:
/// minute 1 charged, minute 2 held, both parties seen now.
async fn seed(db: &TestDb, n: i64) -> Result<()> {
    let mut tx = db.admin_pool.begin().await.context("seed")?;
    let steps = [
        // Integers only are formatted in; nothing here comes from outside.
        "create temporary table pairs on commit drop as \
           select gen_random_uuid() as fan, gen_random_uuid() as creator, \
                  gen_random_uuid() as call from generate_series(1, {n})",
        "insert into app.users (id) select fan from pairs",
        "insert into app.users (id, role) select creator, 'creator' from pairs",
        "insert into app.user_private (user_id, daily_spend_limit_tokens) \
           select fan, 10000000 from pairs",
        "select ledger.post_many(array_agg('purchase'::text order by fan), \
           array_agg('bench-' || fan order by fan), \
           array_agg(ledger.singleton('stripe_clearing') order by fan), \
           array_agg(ledger.account_of('wallet', fan) order by fan), \
           array_agg({FUNDED}::bigint order by fan), array_agg(0::bigint)) from pairs",
        "insert into app.calls (id, fan_id, creator_id, media, price_per_minute, status, channel, \
           fan_uid, creator_uid, requested_at, ring_until, accepted_at, join_until, \
           fan_joined_at, creator_joined_at, started_at, fan_seen_at, creator_seen_at, \
           funded_minutes, billed_minutes) \
         select call, fan, creator, 'video', {PRICE}, 'active', 'call_' || replace(call::text, '-', ''), \
           nextval('app.agora_uids'), nextval('app.agora_uids'), \
           app.now() - interval '90 seconds', app.now() + interval '30 seconds', \
           app.now() - interval '80 seconds', app.now() + interval '40 seconds', \
           app.now() - interval '61 seconds', app.now() - interval '61 seconds', \
           app.now() - interval '61 seconds', app.now(), app.now(), 2, 1 \
         from pairs",
        "insert into ledger.accounts (kind, owner_id, reference) \
           select 'escrow', fan, 'call:' || call from pairs",
        "select ledger.post_many(array_agg('call_hold'::text order by call), \
           array_agg(call || ':2' order by call), \
           array_agg(ledger.account_of('wallet', fan) order by call), \
           array_agg(ledger.call_escrow(call) order by call), \
           array_agg(2 * {PRICE}::bigint order by call), array_agg(0::bigint)) from pairs",
        "select ledger.post_many(array_agg('call_minute'::text order by call), \
           array_agg(call || ':1' order by call), \
           array_agg(ledger.call_escrow(call) order by call), \
           array_agg(ledger.account_of('wallet', creator) order by call), \
           array_agg({PRICE}::bigint order by call), array_agg(0::bigint)) from pairs",
    ];
    for sql in steps {
        let sql = sql
            .replace("{n}", &n.to_string())
            .replace("{FUNDED}", &FUNDED.to_string())
            .replace("{PRICE}", &PRICE.to_string());
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await
            .map_err(|e| format!("seed step failed: {e}\n{sql}"))?;
    }
    tx.commit().await.context("commit the seed")?;
    sqlx::query("analyze")
        .execute(&db.admin_pool)
        .await
        .context("analyze")?;
    Ok(())
}

/// The call invariants after the sweep: every call billed 2 and funded 3,
/// its escrow exactly its held minute, its minute journals exactly 1 and 2.
async fn call_violations(db: &TestDb, n: i64) -> Result<Vec<String>> {
    let (wrong_state, drifted, minute_journals): (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from app.calls \
                  where status <> 'active' or billed_minutes <> 2 or funded_minutes <> 3), \
                (select count(*) from app.calls c join ledger.accounts a \
                    on a.kind = 'escrow' and a.reference = 'call:' || c.id \
                  where a.balance <> (c.funded_minutes - c.billed_minutes) * c.price_per_minute), \
                (select count(*) from ledger.journals where kind = 'call_minute')",
    )
    .fetch_one(&db.admin_pool)
    .await
    .context("call invariants")?;
    let mut out = Vec::new();
    if wrong_state != 0 {
        out.push(format!("{wrong_state} calls not at minute 2 of 3 funded"));
    }
    if drifted != 0 {
        out.push(format!("{drifted} escrows differ from their held minutes"));
    }
    if minute_journals != 2 * n {
        out.push(format!("{minute_journals} minute journals, not {}", 2 * n));
    }
    Ok(out)
}

struct Inserts {
    clients: usize,
    seconds: f64,
    inserts_per_second: f64,
}

/// `count` single-row inserts, one per transaction, by pgbench with two
/// clients, into a scratch table of the benchmark's database.
fn pgbench_inserts(db: &TestDb, count: usize) -> Result<Inserts> {
    let mut url =
        url::Url::parse(&stagepass_platform::testing::admin_url()).context("admin url")?;
    url.set_path(&format!("/{}", db.name));
    let url = url.to_string();
    let psql = Command::new("psql")
        .args([
            &url,
            "-qc",
            "create table bench_inserts (id bigserial primary key, call uuid not null, \
             minute integer not null, amount bigint not null, at timestamptz not null default now())",
        ])
        .output()
        .context("psql (Debian package postgresql-client)")?;
    if !psql.status.success() {
        return fail(format!(
            "creating the pgbench table failed: {}",
            String::from_utf8_lossy(&psql.stderr)
        ));
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("stagepass-bench-calls-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let script = dir.join("insert.sql");
    std::fs::write(
        &script,
        "insert into bench_inserts (call, minute, amount) values (gen_random_uuid(), 2, 10);\n",
    )
    .context("pgbench script")?;
    let clients = 2;
    let per_client = count.div_ceil(clients).to_string();
    let started = Instant::now();
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &per_client,
            "-f",
            script.to_str().unwrap_or_default(),
            &url,
        ])
        .output()
        .context("run pgbench (Debian package postgresql-contrib / postgresql-client)")?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return fail(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    // pgbench's own rate (excluding its connection set-up), if it printed one.
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(count as f64 / seconds);
    Ok(Inserts {
        clients,
        seconds: count as f64 / tps,
        inserts_per_second: tps,
    })
}
