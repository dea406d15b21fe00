//! `stagepass bench me`: a warm authenticated read (issue 13). `GET
//! /api/v1/me` through the `v1_me` function binary — one process, its
//! Postgres pool at `--pool` connections (default 4, the deployed
//! `DATABASE_MAX_CONNECTIONS`), `--connections` keep-alive clients (default
//! 32) in a closed loop — for `--seconds`, against a throwaway migrated
//! database on the local cluster.
//!
//! In the same run, on the same database and as the same login
//! (`stagepass_app`), the baseline: `pgbench -M prepared` running the
//! transaction the route runs today, statement for statement (BEGIN; claims
//! and role; `app.ensure_current_user()`; the select; COMMIT), with as many
//! clients as the function has pooled connections. The ratio of the two is
//! issue 13's target (≥ 1.5×).
//!
//! The script is fixed here on purpose rather than shared with
//! `crates/routes/src/me.rs`: it is *today's* five-statement transaction,
//! the yardstick the one-round-trip read is measured against, and must not
//! change when the route does. Before pgbench runs, the same statements run
//! once through sqlx as `stagepass_app` and the select must return the
//! benchmark user, so the baseline provably does the route's work.
//!
//! The run fails (exit 1) on any answer other than 200, any connection
//! error, a pgbench client that aborted or a failed pgbench transaction. The
//! target is printed as PASS/FAIL and does not change the exit code (a
//! benchmark proves speed; a busy machine must not break anything).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use stagepass_platform::auth::testing::{mint_hs256_claims, standard_claims};
use stagepass_platform::testing::TestDb;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{JWT_SECRET, Running, SUPABASE_URL, Target, http, latency, load, money};
use crate::error::{Context as _, Result, fail};

pub struct MeOptions {
    pub json: bool,
    pub seconds: u64,
    pub connections: usize,
    /// The function's `DATABASE_MAX_CONNECTIONS`, and pgbench's clients.
    pub pool: usize,
    pub bin_dir: PathBuf,
    /// A round trip added between the database and everything that talks
    /// to it under measurement, the function and pgbench alike
    /// (`--db-rtt-us`; [`super::latency`]). None: loopback.
    pub db_rtt: Option<Duration>,
}

/// Issue 13: the function at ≥ 1.5× pgbench running today's transaction.
const TARGET_RATIO: f64 = 1.5;
/// Untimed: fills the pool and the caches (and the user exists after the
/// first request).
const WARM_UP: Duration = Duration::from_secs(1);
/// pgbench's worker threads (`-j`), at most one per client.
const PGBENCH_THREADS: usize = 2;

/// What the HTTP load saw.
#[derive(Debug, Serialize)]
pub struct Load {
    pub connections: usize,
    pub pool: usize,
    pub seconds: f64,
    /// Answers per HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Connections that broke (refused, reset, timed out, unframed answer).
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Load {
    fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0)
    }

    /// Why the load does not count, if it does not: every answer must be a
    /// 200 and no connection may break.
    fn problem(&self) -> Option<String> {
        let other: Vec<String> = self
            .statuses
            .iter()
            .filter(|(status, _)| **status != 200)
            .map(|(status, n)| format!("{n} × HTTP {status}"))
            .collect();
        if !other.is_empty() || self.errors > 0 {
            return Some(format!(
                "not every answer was 200: {}{} connection error(s)",
                other.iter().map(|s| format!("{s}, ")).collect::<String>(),
                self.errors
            ));
        }
        if self.ok() == 0 {
            return Some("no answer at all".to_owned());
        }
        None
    }
}

/// What pgbench reported.
#[derive(Debug, PartialEq, Serialize)]
pub struct Pgbench {
    pub clients: usize,
    pub threads: usize,
    pub tps: f64,
    pub transactions: u64,
    pub failed: u64,
}

pub async fn run(opts: MeOptions) -> Result<ExitCode> {
    let binary = opts.bin_dir.join("v1_me");
    if !binary.is_file() {
        return fail(format!(
            "{} is missing: build it first with `cargo build --release --bin v1_me` \
             (or pass --bin-dir, e.g. $CARGO_TARGET_DIR/debug after `cargo build --bin v1_me`)",
            binary.display()
        ));
    }
    let load_average = super::load_average();
    let db = super::throwaway_database().await?;
    let outcome = measure(&opts, &binary, &db).await;
    db.app_pool.close().await;
    db.admin_pool.close().await;
    drop(db);
    let (load, pgbench, distance) = outcome?;
    let report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        load_average,
        binary: binary.display().to_string(),
        distance,
        load,
        pgbench,
    };
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.text());
    }
    match report.load.problem() {
        Some(why) => {
            eprintln!("error: {why}");
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn measure(
    opts: &MeOptions,
    binary: &Path,
    db: &TestDb,
) -> Result<(Load, Pgbench, Option<latency::Distance>)> {
    let user = Uuid::new_v4();
    let claims = standard_claims(
        &format!("{SUPABASE_URL}/auth/v1"),
        user,
        Some("bench@example.test"),
        3600,
    );
    let token = mint_hs256_claims(JWT_SECRET, &claims);
    // Started before the function and kept to the end: the function's pool
    // and pgbench's clients both connect through it.
    let hop = latency::Hop::to(opts.db_rtt, &db.app_url())?;
    let distance = hop.distance(&db.app_url()).await?;
    let mut env = money::function_env(hop.url.clone());
    for (name, value) in &mut env {
        if *name == "DATABASE_MAX_CONNECTIONS" {
            *value = opts.pool.to_string();
        }
    }
    let target = Target {
        name: "v1_me",
        path: "/api/v1/me",
        binary: binary.to_path_buf(),
        env,
        request: http::get_request("/api/v1/me", Some(&token)),
    };
    if !opts.json {
        eprintln!(
            "GET /api/v1/me: {} connections, pool {}, {} s; then pgbench, {} s…",
            opts.connections, opts.pool, opts.seconds, opts.seconds
        );
    }
    let mut running = Running::spawn(&target)?;
    // The first 200 is the user's first sight: from here on every request
    // is a warm read of an existing user, like pgbench's.
    running.wait_for_200(&target.request, Instant::now())?;
    let stderr = running.drain_stderr();
    let addr = running.addr;
    let warm_up = closed_loop(addr, &target.request, opts.connections, WARM_UP).await;
    if let Some(why) = summarise(opts.connections, opts.pool, WARM_UP, warm_up).problem() {
        // Stopped first: its stderr ends only when it exits.
        drop(running);
        let stderr = stderr.join().unwrap_or_default();
        return fail(format!(
            "during the warm-up, {why}\nv1_me's stderr:\n{stderr}"
        ));
    }
    let started = Instant::now();
    let results = closed_loop(
        addr,
        &target.request,
        opts.connections,
        Duration::from_secs(opts.seconds),
    )
    .await;
    let elapsed = started.elapsed();
    drop(running);
    let stderr = stderr.join().unwrap_or_default();
    let load = summarise(opts.connections, opts.pool, elapsed, results);
    if load.problem().is_some() && !stderr.trim().is_empty() && !opts.json {
        eprintln!("v1_me's stderr:\n{stderr}");
    }

    // The claims exactly as the function sets them (the token's payload).
    let claims = claims.to_string();
    verify_script(db, &claims, user).await?;
    let pgbench = pgbench(&hop.url, &claims, opts.pool, opts.seconds)?;
    drop(hop);
    Ok((load, pgbench, distance))
}

/// What one connection saw.
#[derive(Default)]
struct ConnectionResult {
    statuses: BTreeMap<u16, u64>,
    /// Microseconds per answer, whatever its status.
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn closed_loop(
    addr: SocketAddr,
    request: &[u8],
    connections: usize,
    duration: Duration,
) -> Vec<ConnectionResult> {
    let deadline = tokio::time::Instant::now() + duration;
    let mut set = JoinSet::new();
    for _ in 0..connections {
        set.spawn(connection(addr, request.to_vec(), deadline));
    }
    let mut results = Vec::with_capacity(connections);
    while let Some(joined) = set.join_next().await {
        results.push(joined.unwrap_or_else(|_| ConnectionResult {
            errors: 1,
            ..ConnectionResult::default()
        }));
    }
    results
}

/// One keep-alive connection sending the next request as soon as the
/// previous answer is in, until `deadline`. A broken connection ends it and
/// is counted.
async fn connection(
    addr: SocketAddr,
    request: Vec<u8>,
    deadline: tokio::time::Instant,
) -> ConnectionResult {
    let mut result = ConnectionResult::default();
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        result.errors += 1;
        return result;
    };
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    while tokio::time::Instant::now() < deadline {
        let sent = Instant::now();
        let exchanged = tokio::time::timeout(
            load::RESPONSE_TIMEOUT,
            http::exchange(&mut stream, &request, &mut buf),
        )
        .await;
        match exchanged {
            Ok(Ok(status)) => {
                let us = sent.elapsed().as_micros();
                result
                    .latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
                *result.statuses.entry(status).or_default() += 1;
            }
            Ok(Err(_)) | Err(_) => {
                result.errors += 1;
                break;
            }
        }
    }
    result
}

fn summarise(
    connections: usize,
    pool: usize,
    elapsed: Duration,
    results: Vec<ConnectionResult>,
) -> Load {
    let mut statuses = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for r in results {
        for (status, n) in r.statuses {
            *statuses.entry(status).or_default() += n;
        }
        latencies.extend(r.latencies_us);
        errors += r.errors;
    }
    latencies.sort_unstable();
    let (p50_ms, p99_ms) = if latencies.is_empty() {
        (0.0, 0.0)
    } else {
        (
            load::percentile_ms(&latencies, 0.50),
            load::percentile_ms(&latencies, 0.99),
        )
    };
    let seconds = elapsed.as_secs_f64();
    let ok = statuses.get(&200).copied().unwrap_or(0);
    Load {
        connections,
        pool,
        seconds,
        statuses,
        errors,
        requests_per_second: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_ms,
        p99_ms,
    }
}

/// Today's `GET /api/v1/me` transaction (crates/routes/src/me.rs and
/// `db::begin_user` as of issue 13), one statement per entry: BEGIN; claims
/// and role; first sight; the select; COMMIT. The claims and the role are
/// pgbench variables (`-D`), which `-M prepared` sends as bind parameters,
/// as `begin_user` does; nothing else in the script may contain a `:`.
/// (`begin_user`'s BEGIN also sets `statement_timeout` in the same round
/// trip; a timeout that never fires costs nothing here.)
pub const STATEMENTS: [&str; 5] = [
    "begin",
    "select set_config('request.jwt.claims', :claims, true), set_config('role', :role, true)",
    "select 1 from app.ensure_current_user()",
    "select u.id, u.role, u.handle, u.display_name, p.email, \
     coalesce(p.email_verified, false) as email_verified, u.created_at \
     from app.users u left join app.user_private p on p.user_id = u.id \
     where u.id = auth.uid()",
    "commit",
];

/// The role `begin_user` sets.
const ROLE: &str = "authenticated";

/// A pgbench script: one statement per line, each ended by `;`.
pub fn pgbench_script(statements: &[&str]) -> String {
    statements.iter().map(|s| format!("{s};\n")).collect()
}

/// Runs the statements once as `stagepass_app`, the variables bound as
/// pgbench binds them; the select must answer exactly the benchmark user, so
/// pgbench measures the route's real work.
async fn verify_script(db: &TestDb, claims: &str, user: Uuid) -> Result<()> {
    let mut conn = db.app_pool.acquire().await.context("app connection")?;
    let mut selected = None;
    for (i, statement) in STATEMENTS.iter().enumerate() {
        let sql = statement.replace(":claims", "$1").replace(":role", "$2");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if statement.contains(":claims") {
            query = query.bind(claims).bind(ROLE);
        }
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .with_context(|| format!("pgbench script, statement {}", i + 1))?;
        if i == 3 {
            selected = Some(
                rows.iter()
                    .map(|row| sqlx::Row::try_get::<Uuid, _>(row, "id"))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .context("the select's id")?,
            );
        }
    }
    match selected {
        Some(ids) if ids == [user] => Ok(()),
        other => fail(format!(
            "the pgbench script's select answered {other:?}, not the benchmark user {user}"
        )),
    }
}

/// `pgbench -M prepared` with the script, `clients` clients, for `seconds`,
/// connected as the function's login to the same database, by the same
/// route (`database_url`: the function's).
fn pgbench(database_url: &str, claims: &str, clients: usize, seconds: u64) -> Result<Pgbench> {
    let mut url = url::Url::parse(database_url).context("app url")?;
    // A pooler hint for sqlx, not a libpq parameter.
    url.set_query(None);
    let script = std::env::temp_dir().join(format!("stagepass-bench-me-{}.sql", Uuid::new_v4()));
    std::fs::write(&script, pgbench_script(&STATEMENTS)).context("writing the pgbench script")?;
    let threads = clients.min(PGBENCH_THREADS);
    let out = Command::new(pgbench_binary())
        .args(["-n", "-M", "prepared", "-f"])
        .arg(&script)
        .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-T", &seconds.to_string()])
        .arg("-D")
        .arg(format!("claims={claims}"))
        .arg("-D")
        .arg(format!("role={ROLE}"))
        .arg(url.as_str())
        .output();
    let _ = std::fs::remove_file(&script);
    let out = out.context("run pgbench (Debian package postgresql-client)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // A client whose transaction failed is aborted; pgbench exits 2.
        return fail(format!(
            "pgbench failed ({}):\n{stderr}{stdout}",
            out.status
        ));
    }
    let result = parse_pgbench(&stdout, clients, threads)?;
    if result.failed > 0 || result.transactions == 0 {
        return fail(format!(
            "pgbench: {} transactions, {} failed:\n{stderr}{stdout}",
            result.transactions, result.failed
        ));
    }
    Ok(result)
}

/// `pgbench` on `PATH`, else the newest `/usr/lib/postgresql/*/bin/pgbench`
/// (Debian installs it there and links only some versions into `PATH`).
fn pgbench_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("pgbench").is_file()))
        .unwrap_or(false);
    if on_path {
        return PathBuf::from("pgbench");
    }
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let binary = entry.path().join("bin/pgbench");
            binary.is_file().then_some((version, binary))
        })
        .collect();
    installed.sort();
    installed
        .pop()
        .map_or_else(|| PathBuf::from("pgbench"), |(_, binary)| binary)
}

/// Reads tps, processed and failed transactions from pgbench's summary.
pub fn parse_pgbench(output: &str, clients: usize, threads: usize) -> Result<Pgbench> {
    let value = |prefix: &str| -> Option<&str> {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
    };
    let tps = value("tps = ").and_then(|v| v.parse::<f64>().ok());
    let transactions =
        value("number of transactions actually processed:").and_then(|v| v.parse::<u64>().ok());
    // pgbench 15 and later; older versions abort instead of counting.
    let failed = match value("number of failed transactions:") {
        None => Some(0),
        Some(v) => v.parse::<u64>().ok(),
    };
    match (tps, transactions, failed) {
        (Some(tps), Some(transactions), Some(failed)) => Ok(Pgbench {
            clients,
            threads,
            tps,
            transactions,
            failed,
        }),
        _ => fail(format!("unexpected pgbench output:\n{output}")),
    }
}

/// One run's results.
pub struct Report {
    pub date: String,
    pub load_average: Option<f64>,
    pub binary: String,
    pub distance: Option<latency::Distance>,
    pub load: Load,
    pub pgbench: Pgbench,
}

impl Report {
    fn ratio(&self) -> f64 {
        if self.pgbench.tps > 0.0 {
            self.load.requests_per_second / self.pgbench.tps
        } else {
            0.0
        }
    }

    fn pass(&self) -> bool {
        self.load.problem().is_none() && self.ratio() >= TARGET_RATIO
    }

    pub fn text(&self) -> String {
        let l = &self.load;
        let p = &self.pgbench;
        let load_average = self
            .load_average
            .map_or("unknown".to_owned(), |a| format!("{a:.2}"));
        let statuses = l
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let verdict = if self.pass() { "PASS" } else { "FAIL" };
        let database = latency::Distance::describe(self.distance.as_ref());
        format!(
            "stagepass bench me — {date} — load average at start {load_average}\n\
             function: {binary}\n\
             {database}\n\
             GET /api/v1/me  {conns} keep-alive connections, pool {pool}, {secs:.1} s\n  \
             {rps:>8.0} requests/s  p50 {p50:.2} ms  p99 {p99:.2} ms  statuses {{{statuses}}}  connection errors {errors}\n\
             pgbench -M prepared, today's 5-statement transaction as stagepass_app, -c {clients} -j {threads}\n  \
             {tps:>8.0} transactions/s  ({transactions} transactions, {failed} failed)\n\
             ratio {ratio:.2}× pgbench\n\
             {verdict}  issue 13: GET /api/v1/me ≥ {TARGET_RATIO}× pgbench\n",
            date = self.date,
            binary = self.binary,
            conns = l.connections,
            pool = l.pool,
            secs = l.seconds,
            rps = l.requests_per_second,
            p50 = l.p50_ms,
            p99 = l.p99_ms,
            errors = l.errors,
            clients = p.clients,
            threads = p.threads,
            tps = p.tps,
            transactions = p.transactions,
            failed = p.failed,
            ratio = self.ratio(),
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "date": self.date,
            "load_average_at_start": self.load_average,
            "binary": self.binary,
            "database_distance": latency::Distance::json(self.distance.as_ref()),
            "me": self.load,
            "pgbench": self.pgbench,
            "ratio_to_pgbench": self.ratio(),
            "target": { "ratio_at_least": TARGET_RATIO, "pass": self.pass() },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH_15: &str = "\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: /tmp/stagepass-bench-me.sql
scaling factor: 1
query mode: prepared
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 65550
number of failed transactions: 3 (0.005%)
latency average = 0.610 ms
initial connection time = 9.871 ms
tps = 6555.012345 (without initial connection time)
";

    #[test]
    fn reads_pgbench_15_summary() {
        let p = parse_pgbench(PGBENCH_15, 4, 2).expect("parses");
        assert_eq!(
            p,
            Pgbench {
                clients: 4,
                threads: 2,
                tps: 6555.012345,
                transactions: 65550,
                failed: 3,
            }
        );
    }

    #[test]
    fn older_pgbench_without_a_failed_line_counts_none() {
        let old = PGBENCH_15.replace("number of failed transactions: 3 (0.005%)\n", "");
        assert_eq!(parse_pgbench(&old, 4, 2).expect("parses").failed, 0);
    }

    #[test]
    fn a_summary_without_tps_is_an_error() {
        let cut = PGBENCH_15.replace("tps = ", "tp = ");
        assert!(parse_pgbench(&cut, 4, 2).is_err());
        let garbled = PGBENCH_15.replace("failed transactions: 3", "failed transactions: x");
        assert!(parse_pgbench(&garbled, 4, 2).is_err());
    }

    #[test]
    fn the_script_is_todays_five_statements_with_two_variables() {
        assert_eq!(STATEMENTS[0], "begin");
        assert!(STATEMENTS[1].contains("set_config('request.jwt.claims', :claims, true)"));
        assert!(STATEMENTS[1].contains("set_config('role', :role, true)"));
        assert_eq!(STATEMENTS[2], "select 1 from app.ensure_current_user()");
        assert!(STATEMENTS[3].ends_with("where u.id = auth.uid()"));
        assert_eq!(STATEMENTS[4], "commit");
        // pgbench reads any `:word` as a variable: only the two given.
        let script = pgbench_script(&STATEMENTS);
        let colons: Vec<&str> = script.split(':').skip(1).collect();
        assert_eq!(colons.len(), 2);
        assert!(colons[0].starts_with("claims,") && colons[1].starts_with("role,"));
        assert_eq!(script.lines().count(), 5);
        assert!(script.lines().all(|l| l.ends_with(';')));
    }

    fn connection(statuses: &[(u16, u64)], latencies_ms: &[u32], errors: u64) -> ConnectionResult {
        ConnectionResult {
            statuses: statuses.iter().copied().collect(),
            latencies_us: latencies_ms.iter().map(|ms| ms * 1000).collect(),
            errors,
        }
    }

    #[test]
    fn summary_merges_connections() {
        let load = summarise(
            2,
            4,
            Duration::from_secs(2),
            vec![
                connection(&[(200, 3)], &[1, 2, 3], 0),
                connection(&[(200, 1)], &[10], 0),
            ],
        );
        assert_eq!(load.statuses, BTreeMap::from([(200, 4)]));
        assert_eq!(load.requests_per_second, 2.0);
        assert_eq!((load.p50_ms, load.p99_ms), (2.0, 10.0));
        assert_eq!(load.problem(), None);
    }

    #[test]
    fn anything_but_200_fails_the_load() {
        let with_401 = summarise(
            1,
            4,
            Duration::from_secs(1),
            vec![connection(&[(200, 5), (401, 2)], &[1; 7], 0)],
        );
        assert_eq!(with_401.requests_per_second, 5.0);
        let why = with_401.problem().expect("fails");
        assert!(why.contains("2 × HTTP 401"), "{why}");

        let broken = summarise(
            1,
            4,
            Duration::from_secs(1),
            vec![connection(&[(200, 5)], &[1; 5], 1)],
        );
        assert!(
            broken
                .problem()
                .expect("fails")
                .contains("1 connection error")
        );

        let silent = summarise(1, 4, Duration::from_secs(1), vec![connection(&[], &[], 0)]);
        assert_eq!(silent.problem().as_deref(), Some("no answer at all"));
    }

    /// A report over one second, so requests/s = the number of 200s.
    fn report(tps: f64, statuses: &[(u16, u64)]) -> Report {
        Report {
            date: "2026-11-30T00:00:00Z".to_owned(),
            load_average: Some(1.5),
            binary: "target/release/v1_me".to_owned(),
            distance: None,
            load: summarise(
                32,
                4,
                Duration::from_secs(1),
                vec![connection(statuses, &[], 0)],
            ),
            pgbench: Pgbench {
                clients: 4,
                threads: 2,
                tps,
                transactions: 1000,
                failed: 0,
            },
        }
    }

    #[test]
    fn the_ratio_and_the_verdict() {
        let today = report(6555.0, &[(200, 2721)]);
        assert!((today.ratio() - 0.415).abs() < 0.001);
        assert!(!today.pass());
        let text = today.text();
        assert!(text.contains("ratio 0.42× pgbench"), "{text}");
        assert!(text.contains("FAIL  issue 13"), "{text}");
        assert!(text.contains("statuses {200: 2721}"), "{text}");

        let target = report(6555.0, &[(200, 9833)]);
        assert!(target.pass());
        assert_eq!(target.json()["target"]["pass"], json!(true));
        assert_eq!(target.json()["me"]["statuses"]["200"], json!(9833));

        // Fast but not all 200: never a PASS.
        let with_500 = report(6555.0, &[(200, 9833), (500, 1)]);
        assert!(!with_500.pass());
    }
}
