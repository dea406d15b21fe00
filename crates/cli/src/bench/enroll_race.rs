//! `stagepass bench enroll-race`: many fans racing for the seats of one
//! class through the release `v1_classes_enrollments` function against a
//! real Postgres (issue 5; SPEC §3, DESIGN.md §6).
//!
//! Each run, on a fresh migrated database: one creator, one class (starting
//! in three days, `seats` seats at `PRICE` tokens), `fans` funded fans. All
//! fans try to enrol at once over `connections` keep-alive connections —
//! every connection takes the next fan who has not tried yet, so each fan
//! sends exactly one request. Measured: seats sold, refusals, time from the
//! first request to the last seat sold (sell-out) and to the last answer,
//! latency percentiles. Then, with the function stopped, the invariants are
//! checked ([`check`]): as many active enrolments as seats, escrow = seats ×
//! price, every enrolled fan charged exactly once, every refused fan charged
//! nothing, the answers agreeing with the database, and the ledger audit
//! clean. Rate limits are off (`RATE_LIMITS=off`): this measures the
//! enrolment path under contention on one class row, not the limiter.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use stagepass_platform::auth::testing::mint_hs256;
use tokio::sync::Barrier;
use uuid::Uuid;

use super::report::{Summary, machine};
use super::{JWT_SECRET, Running, SUPABASE_URL, Target, http, load, money};
use crate::error::{Context as _, Result, fail};

/// The class's price in tokens.
pub const PRICE: i64 = 10;
const FUNCTION: &str = "v1_classes_enrollments";
/// The route's path pattern (its `FUNCTIONS` entry).
const ROUTE: &str = "/api/v1/classes/{id}/enrollments";

pub struct RaceOptions {
    pub json: bool,
    pub runs: usize,
    pub connections: usize,
    pub fans: usize,
    pub seats: usize,
    pub bin_dir: PathBuf,
}

/// How one fan's request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 201: a seat, paid.
    Enrolled,
    /// 409 `class_full`.
    ClassFull,
    /// Anything else: `"<status> <code>"`, or `"error: …"` when no response
    /// arrived (connection failure, timeout).
    Other(String),
}

/// One answer as the harness saw it.
struct Answer {
    fan: usize,
    sent: Instant,
    answered: Instant,
    outcome: Outcome,
}

/// One invariant that does not hold: which, how many times (fans, rows,
/// accounts), and an example or the numbers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub count: usize,
    pub detail: String,
}

/// One race's results.
#[derive(Serialize)]
struct RunResult {
    run: usize,
    /// 1-minute load average before the run (the machine is shared).
    load_average: Option<f64>,
    seats_sold: usize,
    refused_class_full: usize,
    /// Other answers by `"<status> <code>"` or error; fans without any answer.
    other: BTreeMap<String, usize>,
    /// First request sent → the last seat's 201 received; `None` if the
    /// class did not sell out.
    sell_out_ms: Option<f64>,
    /// First request sent → the last answer received.
    all_answered_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    p50_enrolled_ms: f64,
    p99_enrolled_ms: f64,
    violations: Vec<Violation>,
}

impl RunResult {
    fn violation_count(&self) -> usize {
        self.violations.iter().map(|v| v.count).sum()
    }
}

pub async fn run(opts: RaceOptions) -> Result<ExitCode> {
    let binary = opts.bin_dir.join(FUNCTION);
    if !binary.is_file() {
        return fail(format!(
            "{} is missing: build it first with `cargo build --release --bin {FUNCTION}` \
             (with the same CARGO_TARGET_DIR, or pass --bin-dir)",
            binary.display()
        ));
    }
    if !opts.json {
        eprintln!(
            "{} runs of {} fans racing for {} seats…",
            opts.runs, opts.fans, opts.seats
        );
    }
    let mut runs = Vec::with_capacity(opts.runs);
    for n in 1..=opts.runs {
        runs.push(race(&opts, &binary, n).await?);
    }
    print(&opts, &binary, &runs)?;
    Ok(if runs.iter().all(|r| r.violation_count() == 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One race on a fresh database.
async fn race(opts: &RaceOptions, binary: &std::path::Path, n: usize) -> Result<RunResult> {
    let load_average = super::load_average();
    let db = super::throwaway_database().await?;
    let creator = Uuid::new_v4();
    let fans: Vec<Uuid> = (0..opts.fans).map(|_| Uuid::new_v4()).collect();
    money::seed(&db, &fans, &[creator]).await?;
    let class = money::create_class(&db, creator, "Enrolment race", opts.seats, PRICE).await?;

    let path = ROUTE.replace("{id}", &class.to_string());
    let target = Target {
        name: FUNCTION,
        path: ROUTE,
        binary: binary.to_path_buf(),
        env: money::function_env(db.app_url()),
        // Without a token: 401 once the function is up, and nothing written.
        request: http::request("POST", &path, None, &[]),
    };
    let mut running = Running::spawn(&target)?;
    running.wait_for_status(&target.request, 401, Instant::now())?;
    let stderr = running.drain_stderr();

    // Tokens and requests before the race, so it measures only the function.
    let issuer = format!("{SUPABASE_URL}/auth/v1");
    let requests: Vec<Vec<u8>> = fans
        .iter()
        .enumerate()
        .map(|(i, fan)| {
            let token = mint_hs256(JWT_SECRET, &issuer, *fan, None, 3600);
            let key = format!("race-{n}-{i}");
            http::request(
                "POST",
                &path,
                Some(&token),
                &[("Idempotency-Key", key.as_str())],
            )
        })
        .collect();
    let answers = race_all(running.addr, requests, opts.connections).await;
    // Stopped before checking: no transaction is still in flight.
    drop(running);
    let stderr = stderr.join().unwrap_or_default();

    let mut outcomes: Vec<Option<Outcome>> = vec![None; opts.fans];
    for a in &answers {
        outcomes[a.fan] = Some(a.outcome.clone());
    }
    let expected = Expected {
        class,
        seats: opts.seats,
        price: PRICE,
        funded: money::FUNDED_TOKENS,
        fans: &fans,
        outcomes: &outcomes,
    };
    let violations = {
        let mut conn = db.admin_pool.acquire().await.context("check connection")?;
        check(&mut conn, &expected).await?
    };
    db.app_pool.close().await;
    db.admin_pool.close().await;
    drop(db);
    if !violations.is_empty() && !stderr.trim().is_empty() && !opts.json {
        eprintln!("{FUNCTION}'s stderr during run {n}:\n{stderr}");
    }
    Ok(measure(n, load_average, opts.seats, &answers, violations))
}

/// Every request once, over `connections` keep-alive connections opened
/// before the start; each connection sends the next fan's request as soon
/// as its previous answer is in.
async fn race_all(addr: SocketAddr, requests: Vec<Vec<u8>>, connections: usize) -> Vec<Answer> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(connections + 1));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..connections {
        set.spawn(racer(
            addr,
            Arc::clone(&requests),
            Arc::clone(&next),
            Arc::clone(&start),
        ));
    }
    start.wait().await;
    let mut answers = Vec::with_capacity(requests.len());
    while let Some(joined) = set.join_next().await {
        // A task that panicked leaves its fans unanswered; check() counts them.
        if let Ok(mut a) = joined {
            answers.append(&mut a);
        }
    }
    answers
}

async fn racer(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    next: Arc<AtomicUsize>,
    start: Arc<Barrier>,
) -> Vec<Answer> {
    let connect = || async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        // Requests are one write each; no reason to let Nagle hold them.
        let _ = stream.set_nodelay(true);
        Some(stream)
    };
    let mut stream = connect().await;
    start.wait().await;
    let mut answers = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    loop {
        let fan = next.fetch_add(1, Ordering::Relaxed);
        let Some(request) = requests.get(fan) else {
            break;
        };
        let sent = Instant::now();
        if stream.is_none() {
            buf.clear();
            stream = connect().await;
        }
        let outcome = match stream.as_mut() {
            None => Outcome::Other("error: cannot connect".to_owned()),
            Some(s) => {
                let exchanged = tokio::time::timeout(
                    load::RESPONSE_TIMEOUT,
                    http::exchange_response(s, request, &mut buf, true),
                )
                .await;
                match exchanged {
                    Ok(Ok(response)) => classify(&response),
                    // The connection's state is unknown: a new one for the
                    // next fan. This fan is not retried (once per fan).
                    Ok(Err(e)) => {
                        stream = None;
                        Outcome::Other(format!("error: {e}"))
                    }
                    Err(_) => {
                        stream = None;
                        Outcome::Other("error: timed out".to_owned())
                    }
                }
            }
        };
        answers.push(Answer {
            fan,
            sent,
            answered: Instant::now(),
            outcome,
        });
    }
    answers
}

fn classify(response: &http::Response) -> Outcome {
    let code = serde_json::from_slice::<serde_json::Value>(&response.body)
        .ok()
        .and_then(|v| v.get("code")?.as_str().map(str::to_owned));
    match (response.status, code.as_deref()) {
        (201, _) => Outcome::Enrolled,
        (409, Some("class_full")) => Outcome::ClassFull,
        (status, code) => Outcome::Other(format!("{status} {}", code.unwrap_or("-"))),
    }
}

fn measure(
    run: usize,
    load_average: Option<f64>,
    seats: usize,
    answers: &[Answer],
    violations: Vec<Violation>,
) -> RunResult {
    let first = answers.iter().map(|a| a.sent).min();
    let since_first = |t: Instant| first.map_or(0.0, |f| ms(t.duration_since(f)));
    let mut enrolled_at: Vec<Instant> = answers
        .iter()
        .filter(|a| a.outcome == Outcome::Enrolled)
        .map(|a| a.answered)
        .collect();
    enrolled_at.sort_unstable();
    let mut other = BTreeMap::new();
    for a in answers {
        if let Outcome::Other(what) = &a.outcome {
            *other.entry(what.clone()).or_insert(0) += 1;
        }
    }
    let latencies = |only_enrolled: bool| -> Vec<u32> {
        let mut us: Vec<u32> = answers
            .iter()
            .filter(|a| !only_enrolled || a.outcome == Outcome::Enrolled)
            .map(|a| {
                u32::try_from(a.answered.duration_since(a.sent).as_micros()).unwrap_or(u32::MAX)
            })
            .collect();
        us.sort_unstable();
        us
    };
    let percentile = |sorted: &[u32], q: f64| {
        if sorted.is_empty() {
            0.0
        } else {
            load::percentile_ms(sorted, q)
        }
    };
    let (all, enrolled) = (latencies(false), latencies(true));
    RunResult {
        run,
        load_average,
        seats_sold: enrolled_at.len(),
        refused_class_full: answers
            .iter()
            .filter(|a| a.outcome == Outcome::ClassFull)
            .count(),
        other,
        sell_out_ms: (enrolled_at.len() >= seats && seats > 0)
            .then(|| since_first(enrolled_at[seats - 1])),
        all_answered_ms: answers
            .iter()
            .map(|a| a.answered)
            .max()
            .map_or(0.0, since_first),
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        p50_enrolled_ms: percentile(&enrolled, 0.50),
        p99_enrolled_ms: percentile(&enrolled, 0.99),
        violations,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a correct race leaves behind.
pub struct Expected<'a> {
    pub class: Uuid,
    pub seats: usize,
    pub price: i64,
    /// What every fan was funded with before the race.
    pub funded: i64,
    pub fans: &'a [Uuid],
    /// Per fan (same order): the answer, `None` if none arrived.
    pub outcomes: &'a [Option<Outcome>],
}

/// Every invariant of a finished race, read from the database as the
/// superuser (run it with the function stopped). Empty means all hold.
pub async fn check(conn: &mut sqlx::PgConnection, e: &Expected<'_>) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    let mut expect = |check: &'static str, actual: i64, wanted: i64| {
        if actual != wanted {
            out.push(Violation {
                check,
                count: 1,
                detail: format!("{actual}, expected {wanted}"),
            });
        }
    };
    let seats = i64::try_from(e.seats).context("seats")?;
    let fans = i64::try_from(e.fans.len()).context("fans")?;
    let count = |wanted: fn(&Outcome) -> bool| {
        e.outcomes.iter().flatten().filter(|o| wanted(o)).count() as i64
    };

    // The answers.
    expect(
        "answers 201 (seats sold)",
        count(|o| *o == Outcome::Enrolled),
        seats,
    );
    expect(
        "answers 409 class_full",
        count(|o| *o == Outcome::ClassFull),
        fans - seats,
    );
    expect(
        "other answers and errors",
        count(|o| matches!(o, Outcome::Other(_))),
        0,
    );
    expect(
        "fans without an answer",
        e.outcomes.iter().filter(|o| o.is_none()).count() as i64,
        0,
    );

    // The class, its enrolments, its escrow and calendar.
    let (seats_taken, active, rows, escrow, attendees): (i32, i64, i64, Option<i64>, i64) =
        sqlx::query_as(
            "select c.seats_taken, \
               (select count(*) from app.enrollments e where e.class_id = c.id and e.status = 'enrolled'), \
               (select count(*) from app.enrollments e where e.class_id = c.id), \
               (select balance from ledger.accounts a where a.kind = 'escrow' \
                  and a.reference = 'class:' || c.id::text), \
               (select count(*) from app.calendar_events ev where ev.source_kind = 'class' \
                  and ev.source_id = c.id and ev.role = 'attendee' and ev.status = 'confirmed') \
             from app.classes c where c.id = $1",
        )
        .bind(e.class)
        .fetch_one(&mut *conn)
        .await
        .context("read the class")?;
    expect("class seats_taken", i64::from(seats_taken), seats);
    expect(
        "class seats_taken against its active enrolments",
        i64::from(seats_taken),
        active,
    );
    expect("active enrolments", active, seats);
    expect("enrolment rows (any status)", rows, seats);
    expect("escrow balance", escrow.unwrap_or(-1), seats * e.price);
    expect("attendee calendar copies", attendees, seats);

    // Every fan: seats held, class charges on their wallet, balance.
    let per_fan: Vec<(Uuid, Option<i64>, i64, i64, i64)> = sqlx::query_as(
        "select f.id, w.balance, \
           (select count(*) from app.enrollments e where e.class_id = $1 and e.user_id = f.id \
              and e.status = 'enrolled'), \
           (select count(*) from ledger.entries en join ledger.journals j on j.id = en.journal_id \
              where en.account_id = w.id and j.kind = 'class_enrollment'), \
           (select coalesce(sum(-en.amount), 0)::bigint from ledger.entries en \
              join ledger.journals j on j.id = en.journal_id \
              where en.account_id = w.id and j.kind = 'class_enrollment') \
         from unnest($2::uuid[]) with ordinality f(id, n) \
         left join ledger.balances w on w.kind = 'wallet' and w.owner_id = f.id \
           and w.reference is null \
         order by f.n",
    )
    .bind(e.class)
    .bind(e.fans)
    .fetch_all(&mut *conn)
    .await
    .context("read the fans")?;
    let mut fan_checks: BTreeMap<&'static str, (usize, Uuid)> = BTreeMap::new();
    let mut flag = |check: &'static str, fan: Uuid| {
        fan_checks.entry(check).or_insert((0, fan)).0 += 1;
    };
    for ((fan, balance, held, charges, charged), outcome) in per_fan.iter().zip(e.outcomes) {
        let (fan, held) = (*fan, *held);
        if held > 1 {
            flag("fans holding more than one seat", fan);
        }
        if held == 1 && (*charges != 1 || *charged != e.price) {
            flag("enrolled fans not charged exactly once", fan);
        }
        if held == 0 && *charges != 0 {
            flag("fans charged without a seat", fan);
        }
        if *balance != Some(e.funded - held * e.price) {
            flag("fans whose wallet is not funded − price × seats", fan);
        }
        match outcome {
            Some(Outcome::Enrolled) if held != 1 => flag("fans answered 201 without a seat", fan),
            Some(Outcome::ClassFull) if held != 0 || *charges != 0 => flag(
                "fans refused (class_full) but holding a seat or charged",
                fan,
            ),
            _ => {}
        }
    }
    out.extend(
        fan_checks
            .into_iter()
            .map(|(check, (count, fan))| Violation {
                check,
                count,
                detail: format!("e.g. fan {fan}"),
            }),
    );
    if per_fan.len() != e.fans.len() {
        out.push(Violation {
            check: "fans read back",
            count: 1,
            detail: format!("{} of {}", per_fan.len(), e.fans.len()),
        });
    }

    // SPEC §2 over the whole database.
    let ledger = money::ledger_violations(conn).await?;
    if let Some(first) = ledger.first() {
        out.push(Violation {
            check: "ledger audit",
            count: ledger.len(),
            detail: first.clone(),
        });
    }
    Ok(out)
}

fn print(opts: &RaceOptions, binary: &std::path::Path, runs: &[RunResult]) -> Result<()> {
    let summary = |f: &dyn Fn(&RunResult) -> Option<f64>| {
        let samples: Vec<Duration> = runs
            .iter()
            .filter_map(f)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        (!samples.is_empty()).then(|| Summary::of(&samples))
    };
    let medians = [
        ("sell_out_ms", summary(&|r| r.sell_out_ms)),
        ("all_answered_ms", summary(&|r| Some(r.all_answered_ms))),
        ("p50_ms", summary(&|r| Some(r.p50_ms))),
        ("p99_ms", summary(&|r| Some(r.p99_ms))),
        ("p50_enrolled_ms", summary(&|r| Some(r.p50_enrolled_ms))),
        ("p99_enrolled_ms", summary(&|r| Some(r.p99_enrolled_ms))),
    ];
    let violations: usize = runs.iter().map(RunResult::violation_count).sum();
    let pool = std::env::var("DATABASE_MAX_CONNECTIONS").unwrap_or_else(|_| "4".to_owned());
    let m = machine();
    if opts.json {
        let doc = json!({
            "scenario": "enroll-race",
            "date": chrono::Utc::now().to_rfc3339(),
            "machine": {"cpus": m.cpus, "cpu_model": m.cpu_model, "kernel": m.kernel},
            "binary": binary.display().to_string(),
            "fans": opts.fans, "seats": opts.seats, "price_tokens": PRICE,
            "connections": opts.connections, "pool_size": pool,
            "runs": runs,
            "summary": medians.iter()
                .map(|(name, s)| (name.to_string(), json!(s)))
                .collect::<serde_json::Map<_, _>>(),
            "violations": violations,
            "pass": violations == 0,
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!(
        "stagepass bench enroll-race — {} — {} CPU(s), {}, Linux {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        m.cpus,
        m.cpu_model,
        m.kernel
    );
    println!(
        "release {}: {} fans for {} seats at {PRICE} tokens, {} keep-alive connections, pool {pool}",
        binary.display(),
        opts.fans,
        opts.seats,
        opts.connections
    );
    println!();
    println!(
        "{:>4}{:>6}{:>6}{:>6}{:>7}{:>11}{:>11}{:>9}{:>9}{:>10}{:>10}{:>12}",
        "run",
        "load",
        "sold",
        "full",
        "other",
        "sell-out",
        "all done",
        "p50",
        "p99",
        "p50 201",
        "p99 201",
        "violations"
    );
    let opt_ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for r in runs {
        println!(
            "{:>4}{:>6}{:>6}{:>6}{:>7}{:>11}{:>11.1}{:>9.1}{:>9.1}{:>10.1}{:>10.1}{:>12}",
            r.run,
            r.load_average.map_or("-".to_owned(), |l| format!("{l:.2}")),
            r.seats_sold,
            r.refused_class_full,
            r.other.values().sum::<usize>(),
            opt_ms(r.sell_out_ms),
            r.all_answered_ms,
            r.p50_ms,
            r.p99_ms,
            r.p50_enrolled_ms,
            r.p99_enrolled_ms,
            r.violation_count()
        );
    }
    println!("(times in ms; sell-out = first request → the last seat's 201)");
    println!();
    println!(
        "{:<30}{:>9}{:>9}{:>9}",
        format!("over {} runs", runs.len()),
        "min",
        "median",
        "max"
    );
    for (name, s) in &medians {
        match s {
            Some(s) => println!(
                "  {name:<28}{:>9.1}{:>9.1}{:>9.1}",
                s.min_ms, s.median_ms, s.max_ms
            ),
            None => println!("  {name:<28}        -"),
        }
    }
    println!();
    for r in runs {
        for (what, n) in &r.other {
            println!("run {}: other answer {what}: {n}", r.run);
        }
        for v in &r.violations {
            println!(
                "run {}: VIOLATION {} ({}×): {}",
                r.run, v.check, v.count, v.detail
            );
        }
    }
    if violations == 0 {
        println!(
            "invariants: PASS — 0 violations in {} runs ({} seats sold each, escrow = seats × price, \
             each enrolled fan charged once, refused fans charged nothing, ledger audit clean)",
            runs.len(),
            opts.seats
        );
    } else {
        println!("invariants: FAIL — {violations} violations");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The checker must see a broken race. Each test seeds a small race's
    //! end state through SQL (2 seats, 3 fans), checks it is clean, then
    //! breaks one thing and asserts the checker names it.

    use super::*;
    use stagepass_platform::testing::TestDb;

    const SEATS: usize = 2;

    struct Fixture {
        db: TestDb,
        class: Uuid,
        fans: Vec<Uuid>,
    }

    impl Fixture {
        /// Fans 0 and 1 enrolled through `app.enroll` under their claims;
        /// fan 2 came too late.
        async fn new() -> Fixture {
            let db = TestDb::new().await;
            let creator = Uuid::new_v4();
            let fans: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
            money::seed(&db, &fans, &[creator]).await.expect("seed");
            let class = money::create_class(&db, creator, "Enrolment race", SEATS, PRICE)
                .await
                .expect("class");
            for fan in &fans[..SEATS] {
                let mut tx = db.admin_pool.begin().await.expect("begin");
                sqlx::query("select set_config('request.jwt.claims', $1, true)")
                    .bind(json!({"sub": fan}).to_string())
                    .execute(&mut *tx)
                    .await
                    .expect("claims");
                sqlx::query("select * from app.enroll($1, $2)")
                    .bind(class)
                    .bind(Uuid::new_v4())
                    .execute(&mut *tx)
                    .await
                    .expect("enrol");
                tx.commit().await.expect("commit");
            }
            Fixture { db, class, fans }
        }

        fn answers() -> Vec<Option<Outcome>> {
            vec![
                Some(Outcome::Enrolled),
                Some(Outcome::Enrolled),
                Some(Outcome::ClassFull),
            ]
        }

        async fn check(&self, outcomes: &[Option<Outcome>]) -> Vec<Violation> {
            let mut conn = self.db.admin_pool.acquire().await.expect("conn");
            check(
                &mut conn,
                &Expected {
                    class: self.class,
                    seats: SEATS,
                    price: PRICE,
                    funded: money::FUNDED_TOKENS,
                    fans: &self.fans,
                    outcomes,
                },
            )
            .await
            .expect("check")
        }

        /// A balanced journal moving the price from a fan's wallet into
        /// the class's escrow (what a second charge would look like).
        async fn charge(&self, fan: Uuid, reference: &str) {
            sqlx::query(
                "select ledger.post('class_enrollment', $1, \
                   array[ledger.account_of('wallet', $2), ledger.class_escrow($3)], \
                   array[-$4::bigint, $4::bigint], null)",
            )
            .bind(reference)
            .bind(fan)
            .bind(self.class)
            .bind(PRICE)
            .execute(&self.db.admin_pool)
            .await
            .expect("charge");
        }
    }

    fn names(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.check).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_correct_race_has_no_violations() {
        let f = Fixture::new().await;
        assert_eq!(f.check(&Fixture::answers()).await, vec![]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_double_charge_is_a_violation_though_the_ledger_balances() {
        let f = Fixture::new().await;
        f.charge(f.fans[0], "double-charge").await;
        let v = f.check(&Fixture::answers()).await;
        let found = names(&v);
        assert!(
            found.contains(&"enrolled fans not charged exactly once"),
            "{v:?}"
        );
        assert!(found.contains(&"escrow balance"), "{v:?}");
        assert!(
            found.contains(&"fans whose wallet is not funded − price × seats"),
            "{v:?}"
        );
        // Balanced, so the ledger audit alone would not see it.
        assert!(!found.contains(&"ledger audit"), "{v:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_seat_too_many_is_a_violation() {
        let f = Fixture::new().await;
        // The late fan gets a seat past capacity (written around app.enroll,
        // which would refuse), paid like a real one.
        let late = f.fans[2];
        let enrolment = Uuid::new_v4();
        f.charge(late, &enrolment.to_string()).await;
        sqlx::query(
            "insert into app.enrollments (id, class_id, user_id, price_tokens) \
             values ($1, $2, $3, $4)",
        )
        .bind(enrolment)
        .bind(f.class)
        .bind(late)
        .bind(PRICE)
        .execute(&f.db.admin_pool)
        .await
        .expect("extra enrolment");
        let v = f.check(&Fixture::answers()).await;
        let found = names(&v);
        for expected in [
            "active enrolments",
            "enrolment rows (any status)",
            "escrow balance",
            "class seats_taken against its active enrolments",
            "fans refused (class_full) but holding a seat or charged",
        ] {
            assert!(found.contains(&expected), "{expected} missing from {v:?}");
        }
        let active = v.iter().find(|v| v.check == "active enrolments");
        assert_eq!(
            active.map(|v| v.detail.as_str()),
            Some("3, expected 2"),
            "{v:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_that_disagree_with_the_database_are_violations() {
        let f = Fixture::new().await;
        let mut answers = Fixture::answers();
        answers[2] = Some(Outcome::Enrolled);
        answers[1] = Some(Outcome::Other("500 internal".to_owned()));
        let v = f.check(&answers).await;
        let found = names(&v);
        for expected in [
            "fans answered 201 without a seat",
            "answers 409 class_full",
            "other answers and errors",
        ] {
            assert!(found.contains(&expected), "{expected} missing from {v:?}");
        }
        let mut missing = Fixture::answers();
        missing[2] = None;
        assert!(names(&f.check(&missing).await).contains(&"fans without an answer"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unbalanced_ledger_is_a_violation() {
        let f = Fixture::new().await;
        // A stored balance that no entry explains (drift).
        sqlx::query(
            "update ledger.accounts set balance = balance + 1 \
             where kind = 'wallet' and owner_id = $1",
        )
        .bind(f.fans[2])
        .execute(&f.db.admin_pool)
        .await
        .expect("drift");
        let v = f.check(&Fixture::answers()).await;
        assert!(names(&v).contains(&"ledger audit"), "{v:?}");
    }

    #[test]
    fn problems_are_classified_by_code() {
        let response = |status, body: &str| http::Response {
            status,
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(classify(&response(201, "{}")), Outcome::Enrolled);
        assert_eq!(
            classify(&response(409, r#"{"code":"class_full"}"#)),
            Outcome::ClassFull
        );
        assert_eq!(
            classify(&response(409, r#"{"code":"idempotency_in_progress"}"#)),
            Outcome::Other("409 idempotency_in_progress".to_owned())
        );
        assert_eq!(
            classify(&response(500, "oops")),
            Outcome::Other("500 -".to_owned())
        );
    }
}
