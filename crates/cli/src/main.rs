//! `stagepass`: the operator CLI.
//!
//! - `dev`: every route on one port, with a throwaway Postgres when none is configured.
//! - `migrate`: the embedded migrations, at deploy time (never on a cold start).
//! - `users set-role`: bootstraps the first admin and changes roles outside the API.
//! - `users grant`: promotional tokens by the operator, audited like an admin's grant.
//! - `flags list|show|create|set|history`: feature flags, audited like an admin's change.
//! - `openapi`: prints the OpenAPI document every deployment serves at `/api/v1/openapi.json`.
//! - `check-env`: validates a deployment's environment per function, without printing values.
//! - `bench cold-start`: cold start, binary size, warm throughput and memory of the release binaries.
//! - `bench tips`, `bench enroll-race`: money scenarios through release functions, with invariant checks.
//! - `bench me`: warm `GET /api/v1/me` against pgbench running the same transaction (issue 13).
//! - `bench calls`: one billing sweep of many active calls against pgbench's single-row inserts (issue 11).
//! - `bench payouts`: one payout cycle against the Connect fake's 25 requests/s limit (issue 12).
//! - `bench crash`: SIGKILL during money requests, retried with the same keys: 0 lost, 0 doubled.
//!
//! Arguments are parsed by hand ([`args`]) to keep the build small.

mod args;
mod bench;
mod check_env;
mod dev;
mod dotenv;
mod error;
mod flags;
mod lambda;
mod migrate;
mod pgcluster;
mod users;

#[cfg(test)]
mod db_tls_tests;

use std::process::ExitCode;

use crate::args::Parsed;
use crate::error::{Context as _, Result, fail};

const USAGE: &str = "\
stagepass — Stagepass operator CLI

USAGE:
  stagepass dev [--tokens-file PATH]
      Serve every route on one port (HOST, default 127.0.0.1; PORT, default 3000).
      Without DATABASE_URL, starts a throwaway PostgreSQL cluster and removes it on exit.
      --tokens-file writes the base URL and the demo users' (creator, fan, admin) ids and
      tokens as JSON
      once the server accepts requests (for scripts such as scripts/ci/fuzz.sh).
  stagepass migrate
      Run the embedded migrations against DATABASE_ADMIN_URL (or DATABASE_URL).
  stagepass users set-role <user-id> <fan|creator|admin> [--reason TEXT]
      Change a user's role (creates the user row if needed). Uses DATABASE_URL
      (or DATABASE_ADMIN_URL); the operator name is $USER.
  stagepass users grant <user-id> <tokens> --reason TEXT
      Grant 1-10,000 promotional tokens (journal from the promotions account, audited
      in app.token_grants as operator:$USER). Uses DATABASE_ADMIN_URL (the owner).
  stagepass flags list
  stagepass flags show <key>
  stagepass flags history <key>
  stagepass flags create <key> --description TEXT --reason TEXT [FIELDS]
  stagepass flags set <key> --reason TEXT FIELDS
      Feature flags (docs/adr/0016-feature-flags.md). FIELDS: --enabled on|off,
      --rollout PERCENT (0-100, up to 2 decimals), --roles fan,creator,admin|none,
      --allow UUID,...|none, --deny UUID,...|none, --description TEXT (lists replace
      the stored ones). Changes are audited in app.feature_flag_changes as
      operator:$USER; functions see them within FLAGS_CACHE_SECONDS (default 5).
      Uses DATABASE_URL (or DATABASE_ADMIN_URL).
  stagepass openapi
      Print the OpenAPI 3.1 document (the one served at /api/v1/openapi.json).
  stagepass check-env [--env-file PATH] [--function NAME] [--production]
      Check each function's configuration; exit 1 if any is incomplete.
  stagepass lambda template [--arch arm64|x86_64] [--code-root DIR] [--output FILE]
      The AWS SAM template of the Lambda target (JSON): one function per binary
      (code in DIR/<binary>/, default target/lambda, as `cargo lambda build` lays
      it out), HTTP API routes, the crons as EventBridge schedules, parameters.
  stagepass bench tips [--json] [--seconds S] [--connections C] [--fans N] [--bin-dir DIR]
                       [--sslmode MODE] [--db-rtt-us U]
      Tips/s and p50/p99 through the release v1_tips with many fans tipping one
      creator (hot) and across pairs, the ledger invariants after each, and
      pgbench on the same Postgres as the baseline. --db-rtt-us as for bench me.
  stagepass bench me [--json] [--seconds S] [--connections C] [--pool P] [--bin-dir DIR]
                     [--db-rtt-us U]
      Warm GET /api/v1/me through the v1_me binary (--bin-dir, default
      $CARGO_TARGET_DIR/release) with C keep-alive connections (default 32) and
      DATABASE_MAX_CONNECTIONS=P (default 4) for S seconds (default 10) on a
      throwaway database: requests/s, p50/p99, statuses; then pgbench -M prepared,
      P clients, running today's five-statement transaction of the route as
      stagepass_app on the same database, and the ratio (issue 13: >= 1.5x).
      --db-rtt-us adds U microseconds to every round trip to the database, for
      the function and pgbench alike (a relay on 127.0.0.1; deployed, a function
      and its database are about 1000 us apart). Default: loopback.
      Exit 1 on any non-200 answer or a failed pgbench transaction.
  stagepass bench calls [--json] [--calls N]
      One billing sweep of N active calls (default 5000) with a minute due each,
      against pgbench's single-row inserts on the same database (issue 11).
  stagepass bench payouts [--json] [--creators N] [--workers W]
      One payout cycle for N eligible creators (default 2000) against the
      Stripe Connect fake enforcing 25 requests/s per endpoint (429 beyond):
      the run (statements frozen, tokens held), then the transfers with W
      deliveries at once (default 8): the rate as a share of the limit (issue
      12: >= 85 %), 429s, duplicates, payouts not sent, the ledger audit.
      Exit 1 on any violation.
  stagepass bench enroll-race [--json] [--runs N] [--connections C] [--fans N] [--seats S]
                              [--bin-dir DIR]
      N fans (default 1000) racing for the S seats (default 100) of one class at
      10 tokens through the release v1_classes_enrollments, each fan enrolling
      once over C keep-alive connections (default 32), --runs times (default 3)
      on fresh databases: seats sold, class_full refusals, time to sell out and
      to the last answer, p50/p99, then the invariants (S active enrolments,
      escrow = S x price, each enrolled fan charged once, refused fans charged
      nothing, ledger audit clean). Exit 1 on any violation.
  stagepass bench crash [--json] [--kills N] [--seconds S] [--seed X] [--bin-dir DIR]
      Crash safety: SIGKILLs a money function (tips, enrolments, withdrawals,
      Stripe webhooks, class cancellation, the settlement cron) at random
      moments during batches of its requests (N kills, default 1000, within
      S seconds, default 600; seeded, the seed is printed), restarts it, retries each
      request with the same Idempotency-Key / event id until definitive, then checks
      a fresh database against the model: one journal per applied request, wallet
      balances, ledger audit, outbox. Binaries from --bin-dir (default
      $CARGO_TARGET_DIR/debug). Exit 1 on any lost or doubled effect.
  stagepass bench soak [--json] [--minutes N | --seconds S] [--rate R]
                       [--statements] [--keep]
      Mixed traffic over every route family (reads, tips, classes, enrolments,
      withdrawals, schedule, realtime tokens, Stripe webhooks, the audit cron)
      through `stagepass dev` on a throwaway cluster, at R req/s (default 80 %
      of the capacity measured for 10 s first), for N minutes (default 10):
      statuses, p50/p99 per window (a minute; 15 s under two minutes) overall
      and per route family, the server's VmRSS at start and end, the ledger
      audit. Exit 1 on any 5xx, an unclean audit, memory growth beyond 16 MiB
      + 25 %, or the last window's p99 above 3 × the first's + 50 ms
      (docs/RELIABILITY.md, Soak). --statements loads pg_stat_statements and
      lists the costliest statements with their mean time per window; --keep
      keeps the cluster for EXPLAIN until Ctrl-C.
  stagepass bench cold-start [--json] [--runs N] [--bin-dir DIR]
                             [--sslmode MODE] [--database-url URL]
      Cold start, binary size, warm throughput and peak memory of the release
      function binaries (build them first: cargo build --release --bins).
      v1_me runs against a throwaway migrated database on the local cluster,
      or against --database-url (migrated; the functions' login).
      --sslmode (disable|prefer|require) is added to v1_me's DATABASE_URL;
      unset, the driver's default (prefer) applies.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(argv: &[String]) -> Result<ExitCode> {
    let Some((command, rest)) = argv.split_first() else {
        eprint!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    match command.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "dev" => {
            let p = parse(rest, &["--tokens-file"], &[])?;
            no_positionals(&p)?;
            multi_thread()?.block_on(dev::run(p.value("--tokens-file").map(Into::into)))
        }
        "migrate" => {
            no_positionals(&parse(rest, &[], &[])?)?;
            current_thread()?.block_on(migrate::run())
        }
        "users" => users_command(rest),
        "flags" => flags_command(rest),
        "openapi" => {
            no_positionals(&parse(rest, &[], &[])?)?;
            // The very bytes the function serves, plus a final newline. A
            // closed pipe (`| head`) is not an error worth a panic.
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{}", stagepass_routes::openapi::document())
                .and_then(|()| out.flush())
            {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
                Err(e) => Err(e.into()),
            }
        }
        "check-env" => {
            let p = parse(rest, &["--env-file", "--function"], &["--production"])?;
            no_positionals(&p)?;
            let opts = check_env::Options {
                env_file: p.value("--env-file").map(Into::into),
                function: p.value("--function").map(Into::into),
                production: p.switch("--production"),
            };
            // A runtime because building a router creates (lazy) pools, whose
            // maintenance tasks need one.
            current_thread()?.block_on(async { check_env::run(&opts) })
        }
        "bench" => bench_command(rest),
        "lambda" => lambda_command(rest),
        other => fail(format!("unknown command '{other}' (see stagepass --help)")),
    }
}

fn lambda_command(rest: &[String]) -> Result<ExitCode> {
    let p = parse(rest, &["--arch", "--code-root", "--output"], &[])?;
    if p.positional.as_slice() != ["template"] {
        return fail(
            "usage: stagepass lambda template [--arch arm64|x86_64] [--code-root DIR] [--output FILE]",
        );
    }
    let opts = lambda::Options {
        arch: lambda::Arch::parse(p.value("--arch").unwrap_or("arm64"))?,
        code_root: p.value("--code-root").unwrap_or("target/lambda").to_owned(),
    };
    // A runtime because building a router creates (lazy) pools.
    let text = current_thread()?.block_on(async { lambda::run(&opts) })?;
    match p.value("--output") {
        Some(path) => std::fs::write(path, text).context(path)?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn flags_command(rest: &[String]) -> Result<ExitCode> {
    let p = parse(rest, &flags::VALUE_OPTIONS, &[])?;
    let positional: Vec<&str> = p.positional.iter().map(String::as_str).collect();
    match positional.as_slice() {
        ["list"] => current_thread()?.block_on(flags::list(None)),
        ["show", key] => current_thread()?.block_on(flags::list(Some(key))),
        ["history", key] => current_thread()?.block_on(flags::history(key)),
        [sub @ ("create" | "set"), key] => {
            let change = flags::FlagChange::parse(key, *sub == "create", &p)?;
            current_thread()?.block_on(flags::change(change))
        }
        _ => fail(
            "usage: stagepass flags list | show <key> | history <key>\n       \
             stagepass flags create <key> --description TEXT --reason TEXT [FIELDS]\n       \
             stagepass flags set <key> --reason TEXT FIELDS  (see stagepass --help)",
        ),
    }
}

fn users_command(rest: &[String]) -> Result<ExitCode> {
    let p = parse(rest, &["--reason"], &[])?;
    match p.positional.as_slice() {
        [sub, user, role] if sub == "set-role" => {
            let change = users::RoleChange::parse(user, role, p.value("--reason"))?;
            current_thread()?.block_on(users::set_role(change))
        }
        [sub, user, tokens] if sub == "grant" => {
            let grant = users::GrantRequest::parse(user, tokens, p.value("--reason"))?;
            current_thread()?.block_on(users::grant(grant))
        }
        _ => fail(
            "usage: stagepass users set-role <user-id> <fan|creator|admin> [--reason TEXT]\n       \
             stagepass users grant <user-id> <tokens> --reason TEXT",
        ),
    }
}

fn bench_command(rest: &[String]) -> Result<ExitCode> {
    match rest.first().map(String::as_str) {
        Some("tips") => return bench_tips(&rest[1..]),
        Some("enroll-race") => return bench_enroll_race(&rest[1..]),
        Some("me") => return bench_me(&rest[1..]),
        Some("calls") => return bench_calls(&rest[1..]),
        Some("payouts") => return bench_payouts(&rest[1..]),
        Some("crash") => return bench_crash(&rest[1..]),
        Some("soak") => return bench_soak(&rest[1..]),
        _ => {}
    }
    let p = parse(
        rest,
        &["--runs", "--bin-dir", "--sslmode", "--database-url"],
        &["--json"],
    )?;
    if p.positional.as_slice() != ["cold-start"] {
        return fail(
            "usage: stagepass bench cold-start [--json] [--runs N] [--bin-dir DIR] \
             [--sslmode MODE] [--database-url URL]",
        );
    }
    let sslmode = match p.value("--sslmode") {
        None => None,
        Some(m @ ("disable" | "prefer" | "require")) => Some(m.to_owned()),
        Some(_) => return fail("--sslmode must be disable, prefer or require"),
    };
    let runs = p.count_usize("--runs", 20, 1000)?;
    let opts = bench::Options {
        json: p.switch("--json"),
        runs,
        bin_dir: p.value("--bin-dir").map(Into::into),
        sslmode,
        database_url: p.value("--database-url").map(Into::into),
    };
    // One thread: the function under test is single-threaded too, so on a
    // 2-core machine the load generator and the server get one core each.
    current_thread()?.block_on(bench::run(opts))
}

/// `stagepass bench soak`: mixed traffic through `stagepass dev` (see
/// `bench/soak.rs`).
fn bench_soak(rest: &[String]) -> Result<ExitCode> {
    let p = parse(
        rest,
        &["--minutes", "--seconds", "--rate"],
        &["--json", "--statements", "--keep"],
    )?;
    no_positionals(&p)?;
    let minutes = match p.value("--minutes") {
        None => 10,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=600).contains(&n) => n,
            _ => return fail("--minutes must be an integer from 1 to 600"),
        },
    };
    let seconds = match p.value("--seconds") {
        None => minutes * 60,
        Some(_) if p.value("--minutes").is_some() => {
            return fail("give --minutes or --seconds, not both");
        }
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (30..=36_000).contains(&n) => n,
            _ => return fail("--seconds must be an integer from 30 to 36000"),
        },
    };
    let rate = match p.value("--rate") {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(r) if (1.0..=20_000.0).contains(&r) => Some(r),
            _ => return fail("--rate must be a number of requests per second from 1 to 20000"),
        },
    };
    let opts = bench::soak::SoakOptions {
        seconds,
        rate,
        json: p.switch("--json"),
        statements: p.switch("--statements"),
        keep: p.switch("--keep"),
    };
    // The load generator on two threads: one would fall behind the rate.
    multi_thread()?.block_on(bench::soak::run(opts))
}

/// `stagepass bench tips`: hot-creator and pairs scenarios with a pgbench
/// baseline (see `bench/tips.rs`).
fn bench_tips(rest: &[String]) -> Result<ExitCode> {
    let p = parse(
        rest,
        &[
            "--seconds",
            "--connections",
            "--fans",
            "--bin-dir",
            "--sslmode",
            "--db-rtt-us",
        ],
        &["--json"],
    )?;
    no_positionals(&p)?;
    let opts = bench::tips::TipsOptions {
        json: p.switch("--json"),
        seconds: p.count("--seconds", 10, 120)?,
        connections: p.count_usize("--connections", 16, 256)?,
        fans: p.count_usize("--fans", 64, 10_000)?,
        bin_dir: p.release_bin_dir(),
        sslmode: match p.value("--sslmode") {
            None => None,
            Some(m @ ("disable" | "prefer" | "require")) => Some(m.to_owned()),
            Some(_) => return fail("--sslmode must be disable, prefer or require"),
        },
        db_rtt: db_rtt(&p)?,
    };
    current_thread()?.block_on(bench::tips::run(opts))
}

/// `stagepass bench me`: warm `GET /api/v1/me` with its pgbench baseline
/// (see `bench/me.rs`).
fn bench_me(rest: &[String]) -> Result<ExitCode> {
    let p = parse(
        rest,
        &[
            "--seconds",
            "--connections",
            "--pool",
            "--bin-dir",
            "--db-rtt-us",
        ],
        &["--json"],
    )?;
    no_positionals(&p)?;
    let opts = bench::me::MeOptions {
        json: p.switch("--json"),
        seconds: p.count("--seconds", 10, 600)?,
        connections: p.count_usize("--connections", 32, 1024)?,
        // DATABASE_MAX_CONNECTIONS accepts 1 to 32.
        pool: p.count_usize("--pool", 4, 32)?,
        bin_dir: p.release_bin_dir(),
        db_rtt: db_rtt(&p)?,
    };
    // One thread, like the other benchmarks: the load generator takes at
    // most one core from the function and Postgres.
    current_thread()?.block_on(bench::me::run(opts))
}

/// `stagepass bench calls`: one billing sweep over many active calls
/// against pgbench's single-row inserts (see `bench/calls.rs`).
fn bench_calls(rest: &[String]) -> Result<ExitCode> {
    let p = parse(rest, &["--calls"], &["--json"])?;
    no_positionals(&p)?;
    let opts = bench::calls::CallsOptions {
        json: p.switch("--json"),
        calls: p.count_usize("--calls", 5000, 100_000)?,
    };
    current_thread()?.block_on(bench::calls::run(opts))
}

/// `stagepass bench payouts`: one payout cycle against the Connect fake's
/// rate limit (see `bench/payouts.rs`).
fn bench_payouts(rest: &[String]) -> Result<ExitCode> {
    let p = parse(rest, &["--creators", "--workers"], &["--json"])?;
    no_positionals(&p)?;
    let opts = bench::payouts::PayoutsOptions {
        json: p.switch("--json"),
        creators: p.count_usize("--creators", 2000, 100_000)?,
        workers: p.count_usize("--workers", 8, 256)?,
    };
    // Several threads: the fake Stripe runs in this process too.
    multi_thread()?.block_on(bench::payouts::run(opts))
}

/// `stagepass bench enroll-race`: fans racing for one class's seats (see
/// `bench/enroll_race.rs`).
fn bench_enroll_race(rest: &[String]) -> Result<ExitCode> {
    let p = parse(
        rest,
        &["--runs", "--connections", "--fans", "--seats", "--bin-dir"],
        &["--json"],
    )?;
    no_positionals(&p)?;
    let fans = p.count_usize("--fans", 1000, 100_000)?;
    // A class holds at most 1,000 seats (classes_capacity_range).
    let seats = p.count_usize("--seats", 100, 1000)?;
    if seats > fans {
        return fail("--seats must not exceed --fans");
    }
    let opts = bench::enroll_race::RaceOptions {
        json: p.switch("--json"),
        runs: p.count_usize("--runs", 3, 100)?,
        connections: p.count_usize("--connections", 32, 1024)?,
        fans,
        seats,
        bin_dir: p.release_bin_dir(),
    };
    // One thread, like the other benchmarks: the load generator takes at
    // most one core from the function and Postgres.
    current_thread()?.block_on(bench::enroll_race::run(opts))
}

/// `stagepass bench crash`: SIGKILL during money requests, retries with the
/// same keys, then 0 lost and 0 doubled effects (see `bench/crash.rs`).
fn bench_crash(rest: &[String]) -> Result<ExitCode> {
    let p = parse(
        rest,
        &["--kills", "--seconds", "--seed", "--bin-dir"],
        &["--json"],
    )?;
    no_positionals(&p)?;
    let seed = match p.value("--seed") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return fail("--seed must be an unsigned 64-bit integer"),
        },
    };
    let opts = bench::crash::CrashOptions {
        json: p.switch("--json"),
        kills: p.count_usize("--kills", 1000, 100_000)?,
        seconds: p.count("--seconds", 600, 3600)?,
        seed,
        bin_dir: p
            .value("--bin-dir")
            .map(Into::into)
            .unwrap_or_else(bench::crash::default_bin_dir),
    };
    current_thread()?.block_on(bench::crash::run(opts))
}

/// Parses options; `--help` anywhere prints the usage.
fn parse(rest: &[String], values: &[&'static str], switches: &[&'static str]) -> Result<Parsed> {
    let parsed = args::parse(rest, values, switches)?;
    if parsed.help {
        print!("{USAGE}");
        std::process::exit(0);
    }
    Ok(parsed)
}

fn no_positionals(p: &Parsed) -> Result<()> {
    match p.positional.first() {
        Some(extra) => fail(format!("unexpected argument '{extra}'")),
        None => Ok(()),
    }
}

/// `--db-rtt-us` (1 to 100,000 µs): the round trip a benchmark adds in front
/// of the database (`bench::latency`); absent, loopback.
fn db_rtt(p: &Parsed) -> Result<Option<std::time::Duration>> {
    match p.value("--db-rtt-us") {
        None => Ok(None),
        Some(_) => Ok(Some(std::time::Duration::from_micros(p.count(
            "--db-rtt-us",
            1,
            100_000,
        )?))),
    }
}

fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn multi_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
