//! `stagepass bench payouts` (issue 12): one payout cycle for `--creators`
//! eligible creators (default 2,000) against the project's Stripe Connect
//! fake enforcing Stripe's live-mode limit of 25 requests/s per endpoint
//! (429 beyond it), on a throwaway migrated database of the local cluster.
//!
//! Seeded in SQL (untimed): creators with an onboarded Express account at
//! the fake (transfers active), 1,000–1,999 earned tokens each (tip
//! journals from a funded fan), and an opt-in for the coming cycle. The
//! test clock is then moved to 02:00 UTC of the next cycle day.
//!
//! Timed:
//! 1. the run, as `GET /api/cron/payouts` does it (`run_payouts`): the
//!    platform balance, statements frozen, tokens held, jobs queued;
//! 2. the transfers: `--workers` deliveries at once (as QStash would
//!    deliver the queued jobs), each running the job's whole work
//!    (`transfer_payout`: the shared pacer, the attempt, Stripe, the
//!    record). A payout whose answer was not seen (a 429) is delivered
//!    again when due, as its delayed message would be.
//!
//! Reported: the achieved transfer rate as a share of the 25/s limit (the
//! bound is creators / 25 s), the 429s, payouts not sent, duplicates at
//! Stripe, and the ledger audit. Issue 12's target: ≥ 85 % of the limit
//! with 0 duplicates and every 429 retried (printed PASS/FAIL; violations
//! exit 1).

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeZone, Utc};
use serde_json::json;
use stagepass_integrations::testing::connect::{self, ConnectFake, FakeOptions};
use stagepass_platform::config::Loader;
use stagepass_platform::serve::Resources;
use stagepass_platform::testing::TestDb;
use stagepass_routes::payouts::{RunState, TransferOutcome, transfer_payout};
use uuid::Uuid;

use super::money::ledger_violations;
use crate::error::{Context as _, Result, fail};

pub struct PayoutsOptions {
    pub json: bool,
    pub creators: usize,
    pub workers: usize,
}

/// Stripe's default live-mode limit per endpoint.
const STRIPE_LIMIT: u32 = 25;
/// Issue 12: at least 85 % of the limit.
const TARGET_SHARE: f64 = 0.85;
/// Deliveries give up after this long (the benchmark stops by itself).
const DEADLINE: Duration = Duration::from_secs(600);

pub async fn run(opts: PayoutsOptions) -> Result<ExitCode> {
    let fake = ConnectFake::start_with(FakeOptions {
        rate_limit_per_second: Some(STRIPE_LIMIT),
        platform_available_cents: connect::DEFAULT_PLATFORM_AVAILABLE_CENTS,
    })
    .await;
    let db = TestDb::new().await;
    let n = opts.creators;
    let accounts = fake.seed_active_accounts(n);
    let seeded = Instant::now();
    seed(&db, &accounts).await?;
    let seed_time = seeded.elapsed();
    // 02:00 UTC of the next cycle day: the run's hour.
    let now: chrono::DateTime<Utc> = sqlx::query_scalar("select app.now()")
        .fetch_one(&db.admin_pool)
        .await
        .context("now")?;
    let mut day = now.date_naive() + chrono::Duration::days(1);
    while day.day() != 1 && day.day() != 15 {
        day += chrono::Duration::days(1);
    }
    let Some(two) = day.and_hms_opt(2, 0, 0) else {
        return fail("02:00 is a time");
    };
    let run_at = Utc.from_utc_datetime(&two);
    db.advance_clock(run_at - now).await;

    let state = run_state(&db, &fake)?;
    let started = Instant::now();
    let run = stagepass_routes::payouts::run_payouts(&state)
        .await
        .map_err(|e| format!("the run failed: {e}"))?;
    let freeze_time = started.elapsed();

    let ids: Vec<Uuid> = sqlx::query_scalar("select id from app.payouts order by frozen_at, id")
        .fetch_all(&db.admin_pool)
        .await
        .context("payouts")?;
    let transfers_started = Instant::now();
    let outcomes = deliver(&state, ids, opts.workers).await;
    let transfer_time = transfers_started.elapsed();

    // What happened, at Stripe and here.
    let sent_at_stripe = fake.transfers().len();
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for t in fake.transfers() {
        *groups
            .entry(t["transfer_group"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let duplicates = groups.values().filter(|c| **c > 1).count();
    let limited = fake.beyond_limit_count();
    let (sent, not_sent, wrong_amount): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where status = 'sent'), count(*) filter (where status <> 'sent'), \
                count(*) filter (where amount_cents <> tokens * 5) from app.payouts",
    )
    .fetch_one(&db.admin_pool)
    .await
    .context("payout states")?;
    let mut violations = Vec::new();
    if run.frozen != i64::try_from(n).context("n")? {
        violations.push(format!("{} of {n} payouts frozen", run.frozen));
    }
    if sent_at_stripe != n || usize::try_from(sent).unwrap_or(0) != n {
        violations.push(format!(
            "{sent_at_stripe} transfers at Stripe, {sent} recorded as sent, {n} creators"
        ));
    }
    if duplicates > 0 {
        violations.push(format!("{duplicates} payouts transferred more than once"));
    }
    if not_sent > 0 {
        violations.push(format!(
            "{not_sent} payouts not sent (a 429 never retried, or a refusal)"
        ));
    }
    if wrong_amount > 0 {
        violations.push(format!("{wrong_amount} payouts not tokens × 5 cents"));
    }
    let mut conn = db.admin_pool.acquire().await.context("audit connection")?;
    violations.extend(ledger_violations(&mut conn).await?);

    let rate = n as f64 / transfer_time.as_secs_f64();
    let share = rate / f64::from(STRIPE_LIMIT);
    let bound = n as f64 / f64::from(STRIPE_LIMIT);
    let pass = share >= TARGET_SHARE && violations.is_empty();
    if opts.json {
        println!(
            "{}",
            json!({
                "creators": n,
                "workers": opts.workers,
                "seed_seconds": seed_time.as_secs_f64(),
                "run_seconds": freeze_time.as_secs_f64(),
                "frozen": run.frozen,
                "transfer_seconds": transfer_time.as_secs_f64(),
                "bound_seconds": bound,
                "transfers_per_second": rate,
                "share_of_limit": share,
                "stripe_limit_per_second": STRIPE_LIMIT,
                "paced_at_per_second": stagepass_routes::payouts::TRANSFERS_PER_SECOND,
                "answered_429": limited,
                "outcomes": outcomes,
                "duplicates": duplicates,
                "not_sent": not_sent,
                "violations": violations,
                "target": {"share_min": TARGET_SHARE, "pass": pass},
            })
        );
    } else {
        println!(
            "payouts: {n} eligible creators, 1,000–1,999 tokens each (seeded in {seed_time:.1?})"
        );
        println!(
            "the run (freeze, hold, queue): {freeze_time:.2?}, {} statements frozen",
            run.frozen
        );
        println!(
            "transfers: {n} in {:.1} s with {} deliveries at once = {rate:.1}/s; \
             the bound at {STRIPE_LIMIT}/s is {bound:.0} s",
            transfer_time.as_secs_f64(),
            opts.workers
        );
        println!(
            "  = {:.1} % of Stripe's limit (paced at {}/s); 429s answered: {limited}; outcomes: {outcomes:?}",
            share * 100.0,
            stagepass_routes::payouts::TRANSFERS_PER_SECOND
        );
        println!("duplicates at Stripe: {duplicates}; payouts not sent: {not_sent}");
        println!("invariant violations: {}", violations.len());
        for v in &violations {
            println!("  {v}");
        }
        println!(
            "target (issue 12): ≥ 85 % of the limit, 0 duplicates, every 429 retried {}",
            if pass { "PASS" } else { "FAIL" }
        );
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Creators, their accounts, their earnings and opt-ins, in SQL.
async fn seed(db: &TestDb, accounts: &[String]) -> Result<()> {
    let mut tx = db.admin_pool.begin().await.context("seed")?;
    sqlx::query(
        "create temporary table seeded on commit drop as \
           select gen_random_uuid() as creator, a as account, 1000 + (random() * 999)::bigint as earned \
             from unnest($1::text[]) a",
    )
    .bind(accounts)
    .execute(&mut *tx)
    .await
    .context("seed table")?;
    let fan = Uuid::new_v4();
    let steps = [
        "insert into app.users (id, role) select creator, 'creator' from seeded",
        "insert into app.connect_accounts (creator_id, stripe_account_id, livemode, details_submitted, \
           payouts_enabled, transfers, transfers_state_at, account_state_at) \
         select creator, account, false, true, true, 'active', 1, 1 from seeded",
        "insert into app.users (id) values ('{fan}')",
        "select ledger.post('purchase', 'bench-{fan}', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', '{fan}')], \
           array[-(select sum(earned) from seeded)::bigint, (select sum(earned) from seeded)::bigint], null)",
        "select ledger.post_many(array_agg('tip'::text order by creator), \
           array_agg('bench-' || creator order by creator), \
           array_agg(ledger.account_of('wallet', '{fan}') order by creator), \
           array_agg(ledger.account_of('wallet', creator) order by creator), \
           array_agg(earned order by creator), array_agg(0::bigint)) from seeded",
        "insert into app.payout_requests (id, creator_id, cycle) \
         select gen_random_uuid(), creator, app.payout_cycle_at(app.now()) from seeded",
    ];
    for sql in steps {
        // Only a UUID we made is formatted in.
        let sql = sql.replace("{fan}", &fan.to_string());
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

/// The run's state as the cron and the job build it, pointed at the fake.
fn run_state(db: &TestDb, fake: &ConnectFake) -> Result<RunState> {
    let env = [
        ("APP_ENV", "test".to_owned()),
        ("STRIPE_SECRET_KEY", connect::SECRET_KEY.to_owned()),
        ("STRIPE_API_BASE", fake.base_url().to_string()),
    ];
    let mut l = Loader::from_map(env.iter().map(|(k, v)| (*k, v.clone())));
    let mut resources = Resources::with_pool(db.app_pool.clone());
    resources.clock = db.clock.clone();
    let Some(connect) = stagepass_routes::payouts::Connect::load(&mut l, &resources) else {
        return fail("the Stripe settings of the benchmark do not load");
    };
    let Some(outbox) =
        stagepass_routes::outbox::Outbox::load(&mut l, &resources, Some(db.app_pool.clone()))
    else {
        return fail("the outbox does not load");
    };
    Ok(RunState {
        pool: db.app_pool.clone(),
        connect,
        outbox,
    })
}

/// `workers` deliveries at once until every payout is settled (sent,
/// abandoned) or the deadline passes. A payout answered otherwise is
/// delivered again: at once when another delivery held it or no pacing
/// slot was free, after its retry delay when Stripe's answer was not seen.
async fn deliver(state: &RunState, ids: Vec<Uuid>, workers: usize) -> BTreeMap<String, usize> {
    let queue: Arc<Mutex<VecDeque<(Uuid, Instant)>>> = Arc::new(Mutex::new(
        ids.into_iter().map(|id| (id, Instant::now())).collect(),
    ));
    let outcomes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let deadline = Instant::now() + DEADLINE;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, outcomes, state) = (queue.clone(), outcomes.clone(), state.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let next = queue.lock().map(|mut q| q.pop_front()).unwrap_or(None);
                let Some((id, due)) = next else { break };
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
                    if let Ok(mut q) = queue.lock() {
                        q.push_back((id, due));
                    }
                    continue;
                }
                let outcome = transfer_payout(&state, id).await;
                let label = match &outcome {
                    Ok(o) => format!("{o:?}").to_lowercase(),
                    Err(e) => format!("error: {e}"),
                };
                if let Ok(mut o) = outcomes.lock() {
                    *o.entry(label).or_default() += 1;
                }
                let again = match outcome {
                    Ok(
                        TransferOutcome::Busy | TransferOutcome::Paced | TransferOutcome::NotDue,
                    ) => Some(Instant::now() + Duration::from_millis(50)),
                    // The delayed message of an unseen answer (30 s first).
                    Ok(TransferOutcome::Retrying) | Err(_) => {
                        Some(Instant::now() + Duration::from_secs(31))
                    }
                    Ok(_) => None,
                };
                if let Some(at) = again
                    && let Ok(mut q) = queue.lock()
                {
                    q.push_back((id, at));
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    outcomes.lock().map(|o| o.clone()).unwrap_or_default()
}
