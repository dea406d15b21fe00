//! `stagepass bench cold-start`: what a serverless instance costs, measured
//! on the release binaries Vercel would run (DESIGN.md §6).
//!
//! - cold start: spawn → first HTTP 200, `runs` times, for `health` (no I/O)
//!   and `v1_me` (token verification plus the first Postgres connection);
//! - the process-spawn floor (`/bin/true`), to read the above against;
//! - the size of every function binary;
//! - warm keep-alive throughput and latency, and the peak resident memory
//!   of the function process under that load.
//!
//! Every child process is owned by a guard that kills it on drop, and every
//! loop is bounded by time, so the benchmark always stops by itself.

pub mod calls;
pub mod crash;
pub mod enroll_race;
mod http;
pub mod latency;
mod load;
pub mod me;
mod money;
pub mod payouts;
mod report;
pub mod soak;
pub mod tips;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use stagepass_platform::auth::testing::mint_hs256;
use stagepass_platform::testing::{TestDb, admin_url};
use stagepass_routes::FUNCTIONS;

use crate::error::{Context as _, Result, fail};
use report::{Measurements, Summary};

pub struct Options {
    pub json: bool,
    pub runs: usize,
    pub bin_dir: Option<PathBuf>,
    /// Added to `v1_me`'s `DATABASE_URL` (TLS to Postgres costs a
    /// handshake on the first connection).
    pub sslmode: Option<String>,
    /// Measure `v1_me` against this (migrated) database, connecting as the
    /// functions' login, instead of a throwaway local one.
    pub database_url: Option<String>,
}

/// How long one function may take to answer its first 200.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Between connection attempts while a function starts: short against
/// milliseconds of start-up, long enough not to steal its CPU.
const POLL_INTERVAL: Duration = Duration::from_micros(100);

/// The benchmark's stand-in Supabase project (HS256; no network is used).
const SUPABASE_URL: &str = "https://bench.supabase.invalid";
const JWT_SECRET: &str = "bench-only-supabase-jwt-secret-0123456789abcdef";

/// A function binary and how to call it.
struct Target {
    name: &'static str,
    path: &'static str,
    binary: PathBuf,
    env: Vec<(&'static str, String)>,
    request: Vec<u8>,
}

pub async fn run(opts: Options) -> Result<ExitCode> {
    let bin_dir = bin_dir(opts.bin_dir.clone())?;
    let sizes = binary_sizes(&bin_dir);
    // A throwaway migrated database unless one is given (e.g. a real
    // Supabase project, to include the network and TLS).
    let db = match &opts.database_url {
        Some(_) => None,
        None => Some(throwaway_database().await?),
    };
    let base_url = match (&opts.database_url, &db) {
        (Some(url), _) => url.clone(),
        (None, Some(db)) => db.app_url(),
        (None, None) => return fail("no database"),
    };
    let database_url = with_sslmode(&base_url, opts.sslmode.as_deref());
    let (health, me) = targets(&bin_dir, &database_url);

    if !opts.json {
        eprintln!("measuring (about a minute)…");
    }
    // A target that fails (does not start, answers errors) is reported as
    // such; the others are still measured.
    let spawn_floor = spawn_floor(opts.runs)?;
    let cold_health = cold_starts(&health, opts.runs).map_err(|e| e.to_string());
    let cold_me = cold_starts(&me, opts.runs).map_err(|e| e.to_string());
    let warm_health = load::warm(&health).await.map_err(|e| e.to_string());
    let warm_me = load::warm(&me).await.map_err(|e| e.to_string());

    let m = Measurements {
        bin_dir,
        runs: opts.runs,
        load_average: load_average(),
        rust_log: std::env::var("RUST_LOG").ok(),
        database: describe_database(&database_url),
        sslmode: opts.sslmode.clone(),
        spawn_floor,
        cold: vec![
            (health.name, health.path, cold_health),
            (me.name, me.path, cold_me),
        ],
        sizes,
        warm: vec![(health.name, warm_health), (me.name, warm_me)],
    };
    if opts.json {
        println!("{}", report::json(&m)?);
    } else {
        report::print(&m);
    }
    if let Some(db) = db {
        // Close our sessions cleanly before TestDb's Drop drops the database.
        db.app_pool.close().await;
        db.admin_pool.close().await;
        drop(db);
    }
    Ok(if m.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A fresh migrated database on the local cluster (`DATABASE_ADMIN_URL`).
async fn throwaway_database() -> Result<TestDb> {
    // A clear message first: TestDb's helpers panic on failure.
    crate::migrate::connect(&admin_url())
        .await
        .context(
            "the benchmark needs the local PostgreSQL (DATABASE_ADMIN_URL, \
             default postgres://postgres@127.0.0.1:5432/postgres) or --database-url",
        )?
        .close()
        .await;
    Ok(TestDb::new().await)
}

/// The 1-minute load average before measuring: on a shared machine, a
/// reader's hint of how much else was running.
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// `user@host:port/database` (never the password).
fn describe_database(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}@{}:{}{}",
            u.username(),
            u.host_str().unwrap_or(""),
            u.port().unwrap_or(5432),
            u.path()
        ),
        Err(_) => "(unparseable URL)".to_owned(),
    }
}

fn with_sslmode(url: &str, sslmode: Option<&str>) -> String {
    match sslmode {
        Some(mode) => {
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}sslmode={mode}")
        }
        None => url.to_owned(),
    }
}

/// `--bin-dir`, else `$CARGO_TARGET_DIR/release`, else `target/release`.
/// The two measured binaries must exist; the others are only weighed.
fn bin_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let dir = given.unwrap_or_else(|| match std::env::var_os("CARGO_TARGET_DIR") {
        Some(target) => PathBuf::from(target).join("release"),
        None => PathBuf::from("target/release"),
    });
    let missing: Vec<&str> = MEASURED
        .iter()
        .copied()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if !missing.is_empty() {
        return fail(format!(
            "release function binaries missing in {} ({}).\n{BUILD_HINT}",
            dir.display(),
            missing.join(", ")
        ));
    }
    Ok(dir)
}

/// The functions whose start-up and load are measured.
const MEASURED: [&str; 2] = ["health", "v1_me"];

const BUILD_HINT: &str =
    "Build them first at the workspace root (fat LTO: several minutes), then run this again:
    cargo build --release --bins
(with the same CARGO_TARGET_DIR, or pass --bin-dir)";

/// Bytes of every function binary (named after its `Function`, like the
/// root manifest's `[[bin]]` entries); `None` for one not built.
fn binary_sizes(dir: &Path) -> Vec<(&'static str, Option<u64>)> {
    FUNCTIONS
        .iter()
        .map(|f| {
            (
                f.name,
                std::fs::metadata(dir.join(f.name)).ok().map(|m| m.len()),
            )
        })
        .collect()
}

/// `health` as deployed (production: JSON log line per request, to a
/// discarded stdout). `v1_me` in development with `RATE_LIMITS=off`: in
/// production it needs Upstash, and one Upstash round trip per request is
/// the rate-limit scenario's to measure, not this one's (and a single
/// benchmark user would be throttled at once).
fn targets(bin_dir: &Path, database_url: &str) -> (Target, Target) {
    // RUST_LOG passes through (e.g. RUST_LOG=warn measures the cost of the
    // per-request log line); by default the functions log as deployed.
    let rust_log = std::env::var("RUST_LOG").ok();
    let with_log = |mut env: Vec<(&'static str, String)>| {
        env.extend(rust_log.clone().map(|v| ("RUST_LOG", v)));
        env
    };
    let health = Target {
        name: "health",
        path: "/api/health",
        binary: bin_dir.join("health"),
        env: with_log(vec![
            ("APP_ENV", "production".to_owned()),
            (
                "ALLOWED_ORIGINS",
                "https://bench.stagepass.invalid".to_owned(),
            ),
        ]),
        request: http::get_request("/api/health", None),
    };
    let me_env = with_log(vec![
        ("APP_ENV", "development".to_owned()),
        ("RATE_LIMITS", "off".to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("SUPABASE_URL", SUPABASE_URL.to_owned()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
    ]);
    let user = uuid::Uuid::new_v4();
    let token = mint_hs256(
        JWT_SECRET,
        &format!("{SUPABASE_URL}/auth/v1"),
        user,
        Some("bench@example.test"),
        3600,
    );
    let me = Target {
        name: "v1_me",
        path: "/api/v1/me",
        binary: bin_dir.join("v1_me"),
        env: me_env,
        request: http::get_request("/api/v1/me", Some(&token)),
    };
    (health, me)
}

/// A running function, killed when dropped.
struct Running {
    child: Child,
    addr: SocketAddr,
    name: &'static str,
}

impl Running {
    fn spawn(target: &Target) -> Result<Running> {
        let port = free_port()?;
        let child = Command::new(&target.binary)
            .env_clear()
            .envs(target.env.iter().map(|(k, v)| (k, v)))
            .env("VERCEL_DEV_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Only panics and start-up failures go to stderr; read on failure.
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", target.binary.display()))?;
        Ok(Running {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            name: target.name,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until `request` is answered with 200; fails if the process
    /// exits or `START_TIMEOUT` passes.
    fn wait_for_200(&mut self, request: &[u8], since: Instant) -> Result<()> {
        self.wait_for_status(request, 200, since)
    }

    /// Polls until `request` is answered with `expected` (a probe without
    /// side effects, e.g. 401 for a money route called without a token).
    fn wait_for_status(&mut self, request: &[u8], expected: u16, since: Instant) -> Result<()> {
        let mut last = String::from("no connection yet");
        while since.elapsed() < START_TIMEOUT {
            if let Some(status) = self.child.try_wait()? {
                let stderr = self.stderr();
                return fail(format!(
                    "{} exited ({status}) before answering:\n{stderr}",
                    self.name
                ));
            }
            match TcpStream::connect(self.addr) {
                Ok(mut stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(START_TIMEOUT))?;
                    match http::exchange_blocking(&mut stream, request) {
                        Ok(status) if status == expected => return Ok(()),
                        Ok(status) => last = format!("HTTP {status}"),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        fail(format!(
            "{} did not answer {expected} within {START_TIMEOUT:?} (last: {last})",
            self.name
        ))
    }

    /// Reads the child's stderr on a thread from now on (so a chatty
    /// function never blocks on a full pipe); joined, the text it wrote
    /// (the last 64 KiB).
    fn drain_stderr(&mut self) -> std::thread::JoinHandle<String> {
        const KEEP: usize = 64 * 1024;
        let pipe = self.child.stderr.take();
        std::thread::spawn(move || {
            let Some(mut pipe) = pipe else {
                return String::new();
            };
            let mut kept = Vec::new();
            let mut chunk = [0u8; 8192];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut chunk) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > KEEP {
                    kept.drain(..kept.len() - KEEP);
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        })
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free right now on 127.0.0.1 (the OS picks it; we release it for
/// the child to bind — a tiny race, acceptable on a benchmark machine).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Spawn → first 200 → kill, `runs` times.
fn cold_starts(target: &Target, runs: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let mut running = Running::spawn(target)?;
        running.wait_for_200(&target.request, started)?;
        samples.push(started.elapsed());
        drop(running);
    }
    Ok(Summary::of(&samples))
}

/// What spawning a process costs at all on this machine.
fn spawn_floor(runs: usize) -> Result<Summary> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = Command::new("/bin/true")
            .status()
            .context("running /bin/true")?;
        samples.push(started.elapsed());
        if !status.success() {
            return fail("/bin/true failed");
        }
    }
    Ok(Summary::of(&samples))
}
