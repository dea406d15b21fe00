//! `stagepass bench tips`: tips per second through the release `v1_tips`
//! function against a real Postgres, in two shapes (DESIGN.md §6):
//!
//! - `hot`: many fans tipping **one** creator (the creator's wallet row is
//!   the contended one);
//! - `pairs`: each fan tipping their own creator (no shared rows).
//!
//! In the same run, the physical baseline on the same Postgres: `pgbench`
//! single-row updates (random rows, and one hot row) and TPC-B-like
//! transactions, so results read as ratios. After each scenario the ledger
//! invariants are checked (0 violations expected).
//!
//! Rate limits are off for the function under test (`RATE_LIMITS=off`):
//! this measures the ledger path, not the limiter (which has its own
//! benchmark), and a handful of load-generating users would otherwise be
//! refused after two tips a second.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use stagepass_platform::auth::testing::mint_hs256;
use stagepass_platform::testing::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use super::{JWT_SECRET, SUPABASE_URL, free_port, latency, money};
use crate::error::{Context as _, Result, fail};

pub struct TipsOptions {
    pub json: bool,
    pub seconds: u64,
    pub connections: usize,
    pub fans: usize,
    pub bin_dir: std::path::PathBuf,
    /// Added to the function's `DATABASE_URL` (`disable` separates the cost
    /// of TLS to Postgres from the ledger path's own).
    pub sslmode: Option<String>,
    /// A round trip added in front of the database for the function and
    /// pgbench alike (`--db-rtt-us`; [`super::latency`]). None: loopback.
    pub db_rtt: Option<Duration>,
}

struct Scenario {
    name: &'static str,
    tips_per_second: f64,
    ok: u64,
    refused: u64,
    p50_ms: f64,
    p99_ms: f64,
    violations: usize,
}

pub async fn run(opts: TipsOptions) -> Result<std::process::ExitCode> {
    let binary = opts.bin_dir.join("v1_tips");
    if !binary.exists() {
        return fail(format!(
            "{} is missing: build it first with `cargo build --release --bin v1_tips`",
            binary.display()
        ));
    }
    let mut scenarios = Vec::new();
    for (name, creators) in [("hot", 1), ("pairs", opts.fans)] {
        scenarios.push(scenario(&opts, &binary, name, creators).await?);
    }
    let baseline = pgbench(&opts).await?;
    print(&opts, &scenarios, &baseline);
    let clean = scenarios.iter().all(|s| s.violations == 0);
    Ok(if clean {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// One scenario on a fresh database: `fans` funded fans, `creators`
/// creators; fan `i` tips creator `i % creators`.
async fn scenario(
    opts: &TipsOptions,
    binary: &std::path::Path,
    name: &'static str,
    creators: usize,
) -> Result<Scenario> {
    let db = TestDb::new().await;
    let fans: Vec<Uuid> = (0..opts.fans).map(|_| Uuid::new_v4()).collect();
    let hosts: Vec<Uuid> = (0..creators).map(|_| Uuid::new_v4()).collect();
    money::seed(&db, &fans, &hosts).await?;
    let port = free_port()?;
    let issuer = format!("{SUPABASE_URL}/auth/v1");
    // Kept until the function is stopped: its pool connects through it.
    let hop = latency::Hop::to(opts.db_rtt, &db.app_url())?;
    let database_url = match &opts.sslmode {
        Some(mode) => format!("{}?sslmode={mode}", hop.url),
        None => hop.url.clone(),
    };
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .env("VERCEL_DEV_PORT", port.to_string())
        .envs(money::function_env(database_url))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn v1_tips")?;
    wait_for(port).await?;
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..opts.connections {
        let work: Vec<(String, String)> = (0..opts.fans)
            .filter(|i| i % opts.connections == c)
            .map(|i| {
                let token = mint_hs256(JWT_SECRET, &issuer, fans[i], None, 3600);
                let body = json!({"recipient_id": hosts[i % creators], "amount": 1}).to_string();
                (token, body)
            })
            .collect();
        if work.is_empty() {
            continue;
        }
        tasks.push(tokio::spawn(drive(port, c, work, deadline)));
    }
    let (mut ok, mut refused, mut samples) = (0u64, 0u64, Vec::new());
    for t in tasks {
        let (o, r, s) = t.await.context("load task")??;
        ok += o;
        refused += r;
        samples.extend(s);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = child.kill().await;
    drop(hop);
    let violations = audit(&db, &hosts, ok).await?;
    Ok(Scenario {
        name,
        tips_per_second: ok as f64 / elapsed,
        ok,
        refused,
        p50_ms: percentile_ms(&mut samples, 0.50),
        p99_ms: percentile_ms(&mut samples, 0.99),
        violations,
    })
}

/// One keep-alive connection sending tips until the deadline.
async fn drive(
    port: u16,
    connection: usize,
    work: Vec<(String, String)>,
    deadline: Instant,
) -> Result<(u64, u64, Vec<Duration>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    stream.set_nodelay(true).context("nodelay")?;
    let (mut ok, mut refused, mut samples) = (0, 0, Vec::new());
    let mut seq = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < deadline {
        let (token, body) = &work[usize::try_from(seq).unwrap_or(0) % work.len()];
        seq += 1;
        let request = format!(
            "POST /api/v1/tips HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nIdempotency-Key: bench-{connection}-{seq}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        stream
            .write_all(request.as_bytes())
            .await
            .context("write")?;
        let status = read_response(&mut stream, &mut buf).await?;
        samples.push(sent.elapsed());
        if status == 201 {
            ok += 1;
        } else {
            refused += 1;
        }
    }
    Ok((ok, refused, samples))
}

/// Reads one response (headers + Content-Length body); returns the status.
async fn read_response(stream: &mut TcpStream, buf: &mut [u8]) -> Result<u16> {
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await.context("read")?;
        if n == 0 {
            return fail("the function closed the connection");
        }
        filled += n;
        let text = String::from_utf8_lossy(&buf[..filled]);
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if filled >= end + 4 + length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Ok(status);
            }
        }
        if filled == buf.len() {
            return fail("response larger than the buffer");
        }
    }
}

async fn wait_for(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fail("v1_tips did not start")
}

/// Ledger invariants after the run, plus: the creators received exactly the
/// tips that were answered 201.
async fn audit(db: &TestDb, hosts: &[Uuid], ok: u64) -> Result<usize> {
    let mut conn = db.admin_pool.acquire().await.context("audit connection")?;
    let mut violations = money::ledger_violations(&mut conn).await?.len();
    let received: i64 = sqlx::query_scalar(
        "select coalesce(sum(balance), 0)::bigint from ledger.balances where kind = 'wallet' and owner_id = any($1)",
    )
    .bind(hosts)
    .fetch_one(&mut *conn)
    .await
    .context("creator balances")?;
    if u64::try_from(received).unwrap_or(0) != ok {
        violations += 1;
    }
    Ok(violations)
}

struct Baseline {
    /// The relay's round trip next to loopback's (`--db-rtt-us`).
    distance: Option<latency::Distance>,
    update_random_tps: f64,
    update_hot_row_tps: f64,
    tpcb_tps: f64,
}

/// `pgbench` on a scratch database of the same cluster, same duration and
/// client count as the scenarios.
async fn pgbench(opts: &TipsOptions) -> Result<Baseline> {
    let db = TestDb::new().await;
    let setup_url = scratch_url(&db)?;
    run_pgbench(&["-i", "-q", "-s", "1", &setup_url])?;
    // The measured runs go the function's way (the relay, if any).
    let hop = latency::Hop::to(opts.db_rtt, &setup_url)?;
    let distance = hop.distance(&setup_url).await?;
    let url = &hop.url;
    let dir = std::env::temp_dir().join(format!("stagepass-pgbench-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).context("temp dir")?;
    let random = dir.join("update-random.sql");
    std::fs::write(
        &random,
        "\\set aid random(1, 100000)\nupdate pgbench_accounts set abalance = abalance + 1 where aid = :aid;\n",
    )
    .context("script")?;
    let hot = dir.join("update-hot.sql");
    std::fs::write(
        &hot,
        "update pgbench_accounts set abalance = abalance + 1 where aid = 1;\n",
    )
    .context("script")?;
    let clients = opts.connections.to_string();
    let seconds = opts.seconds.to_string();
    let common = ["-c", &clients, "-j", "2", "-T", &seconds, "-n"];
    let tps = |extra: &[&str]| -> Result<f64> {
        let mut args: Vec<&str> = common.to_vec();
        args.extend_from_slice(extra);
        args.push(url);
        parse_tps(&run_pgbench(&args)?)
    };
    let baseline = Baseline {
        distance,
        update_random_tps: tps(&["-f", random.to_str().unwrap_or_default()])?,
        update_hot_row_tps: tps(&["-f", hot.to_str().unwrap_or_default()])?,
        tpcb_tps: tps(&[])?,
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(baseline)
}

/// The superuser URL of a test database (pgbench creates its tables).
fn scratch_url(db: &TestDb) -> Result<String> {
    let mut url =
        url::Url::parse(&stagepass_platform::testing::admin_url()).context("admin url")?;
    url.set_path(&format!("/{}", db.name));
    Ok(url.to_string())
}

fn percentile_ms(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = (q * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)].as_secs_f64() * 1000.0
}

fn run_pgbench(args: &[&str]) -> Result<String> {
    let out = Command::new("pgbench")
        .args(args)
        .output()
        .context("run pgbench (Debian package postgresql-contrib / postgresql-client)")?;
    if !out.status.success() {
        return fail(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_tps(output: &str) -> Result<f64> {
    output
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench output: {output}").into())
}

fn print(opts: &TipsOptions, scenarios: &[Scenario], b: &Baseline) {
    if opts.json {
        let doc = json!({
            "connections": opts.connections, "seconds": opts.seconds, "fans": opts.fans,
            "database_distance": latency::Distance::json(b.distance.as_ref()),
            "scenarios": scenarios.iter().map(|s| json!({
                "name": s.name, "tips_per_second": s.tips_per_second, "ok": s.ok,
                "refused": s.refused, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
                "ledger_violations": s.violations,
                "ratio_to_pgbench_update": s.tips_per_second / b.update_random_tps,
                "ratio_to_pgbench_tpcb": s.tips_per_second / b.tpcb_tps,
            })).collect::<Vec<_>>(),
            "pgbench": {"update_random_tps": b.update_random_tps,
                        "update_hot_row_tps": b.update_hot_row_tps, "tpcb_tps": b.tpcb_tps},
        });
        println!("{doc:#}");
        return;
    }
    println!(
        "tips through release v1_tips: {} connections, {} s, {} fans, sslmode {}",
        opts.connections,
        opts.seconds,
        opts.fans,
        opts.sslmode.as_deref().unwrap_or("default (prefer)")
    );
    println!("{}", latency::Distance::describe(b.distance.as_ref()));
    for s in scenarios {
        println!(
            "  {:<6} {:>8.0} tips/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ok {} refused {}  ledger violations {}",
            s.name, s.tips_per_second, s.p50_ms, s.p99_ms, s.ok, s.refused, s.violations
        );
    }
    println!(
        "pgbench (same Postgres, same clients): update random row {:.0} tps, update one hot row {:.0} tps, TPC-B-like {:.0} tps",
        b.update_random_tps, b.update_hot_row_tps, b.tpcb_tps
    );
    for s in scenarios {
        println!(
            "  {} = {:.2}× pgbench random-row update, {:.2}× hot-row update, {:.2}× TPC-B-like",
            s.name,
            s.tips_per_second / b.update_random_tps,
            s.tips_per_second / b.update_hot_row_tps,
            s.tips_per_second / b.tpcb_tps
        );
    }
}
