//! Outage: PostgreSQL restarted under load (issue 14, deliverable 4a).
//!
//! A throwaway cluster (never the shared one on :5432, which other tests
//! use), migrated; the compiled `v1_tips` function against it; four clients
//! tipping in a loop, each tip with its own `Idempotency-Key`; then
//! `pg_ctl restart -m fast` in the middle. Asserted:
//!
//! - every answer during the outage is 201 or a `503` problem+json, never a
//!   500 (a lost connection is `database_unavailable`, a pool that cannot
//!   connect in time `database_busy`);
//! - the same function process serves 201s again after the restart;
//! - nothing is half-written: every key that was refused is retried once
//!   and answers 201, after which the fan has paid exactly one token per
//!   key, the creator received as many, and the ledger audit is clean.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use stagepass_platform::auth::testing::{TEST_ISSUER_BASE, TEST_JWT_SECRET};
use support::{Function, free_port, mint};

/// A throwaway PostgreSQL cluster (as `crates/cli/src/pgcluster.rs`, which
/// lives in the CLI binary and cannot be linked here): `initdb`, `pg_ctl`
/// as the `postgres` OS user when we are root; stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn start() -> Cluster {
        let bindir = bindir();
        let as_postgres = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!(
            "stagepass-outage-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).expect("cluster dir");
        let cluster = Cluster {
            dir,
            bindir,
            port: free_port(),
            as_postgres,
        };
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cluster.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster dir to postgres");
        }
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        cluster.pg_ctl("start");
        cluster
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.join("data").display().to_string();
        let log = self.dir.join("postgres.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        // "fast": sessions are terminated (57P01) and open transactions
        // rolled back, as in a managed database's restart or failover.
        let mut args = vec![action, "-w", "-t", "30", "-m", "fast", "-D", &data];
        if action != "stop" {
            args.extend(["-l", &log, "-o", &options]);
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        self.run("pg_ctl", &args);
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
        let path = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run a PostgreSQL program");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn app_url(&self) -> String {
        format!("postgres://stagepass_app@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let path = self.bindir.join("pg_ctl");
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let _ = command
            .args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(&data)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pg_config --bindir` when it has the server programs, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn bindir() -> PathBuf {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql")
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    versions.pop().expect("initdb and pg_ctl").1
}

/// What one tip answered.
#[derive(Debug)]
struct Outcome {
    key: String,
    status: u16,
    code: Option<String>,
    content_type: String,
    at: Instant,
}

async fn tip(f: &Function, token: &str, creator: uuid::Uuid, key: &str) -> Outcome {
    let response = f
        .client()
        .post(f.url("/api/v1/tips"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .timeout(Duration::from_secs(20))
        .json(&json!({"recipient_id": creator, "amount": 1}))
        .send()
        .await
        .expect("the function answers (it must not hang or die)");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Outcome {
        key: key.to_owned(),
        status,
        code: body["code"].as_str().map(str::to_owned),
        content_type,
        at: Instant::now(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_under_load_gives_503s_then_recovers_with_nothing_half_written() {
    let cluster = Cluster::start();
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.admin_url())
        .await
        .expect("admin connection");
    stagepass_platform::db::MIGRATOR
        .run(&admin)
        .await
        .expect("migrations");

    let app_url = cluster.app_url();
    let env = [
        ("APP_ENV", "test"),
        ("DATABASE_URL", app_url.as_str()),
        ("SUPABASE_URL", TEST_ISSUER_BASE),
        ("SUPABASE_JWT_SECRET", TEST_JWT_SECRET),
        // The in-process limiter would refuse a loop of tips (money policy).
        ("RATE_LIMITS", "off"),
    ];
    let tips = Arc::new(Function::start("v1_tips", &env).await);
    let balances = Function::start("v1_tokens_balance", &env).await;
    let pid = tips.pid();

    let creator = uuid::Uuid::new_v4();
    let fan = uuid::Uuid::new_v4();
    let creator_token = mint(creator, Some("creator@example.com"));
    let fan_token = mint(fan, Some("fan@example.com"));
    let balance = |token: String| {
        let f = &balances;
        async move {
            let r = f.get("/api/v1/tokens/balance", Some(&token)).await;
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.expect("json")["balance"]
                .as_i64()
                .expect("balance")
        }
    };
    // Both users exist after their first request.
    assert_eq!(balance(creator_token.clone()).await, 0);
    assert_eq!(balance(fan_token.clone()).await, 0);
    sqlx::query("select app.operator_set_role($1, 'creator', 'outage test', null)")
        .bind(creator)
        .execute(&admin)
        .await
        .expect("creator");
    const FUNDED: i64 = 5_000;
    sqlx::query(
        "select ledger.post('purchase', 'outage-fund', \
           array[ledger.singleton('stripe_clearing'), ledger.account_of('wallet', $1)], \
           array[-$2, $2]::bigint[], null)",
    )
    .bind(fan)
    .bind(FUNDED)
    .execute(&admin)
    .await
    .expect("fund");
    admin.close().await;

    // Four clients, each tipping one token per request with a fresh key.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..4 {
        let (tips, stop, token) = (tips.clone(), stop.clone(), fan_token.clone());
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("outage-{client}-{n}");
                outcomes.push(tip(&tips, &token, creator, &key).await);
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restart_began = Instant::now();
    // pg_ctl blocks: run it off the async workers.
    tokio::task::block_in_place(|| cluster.pg_ctl("restart"));
    let restarted = Instant::now();
    // Long enough for every pooled connection to be found dead and
    // replaced, and for steady success after that.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.expect("client"));
    }
    eprintln!(
        "restart took {:?}; {} tips sent",
        restarted - restart_began,
        outcomes.len()
    );

    let mut unavailable = 0;
    for o in &outcomes {
        match o.status {
            201 => {}
            503 => {
                unavailable += 1;
                assert_eq!(o.content_type, "application/problem+json", "{o:?}");
                assert!(
                    matches!(
                        o.code.as_deref(),
                        Some("database_unavailable" | "database_busy")
                    ),
                    "{o:?}"
                );
            }
            _ => panic!("only 201 or 503 may be answered during the outage: {o:?}"),
        }
    }
    eprintln!("{unavailable} answered 503 during the restart");
    assert!(
        unavailable > 0,
        "the restart should have cut some requests (else this test tests nothing)"
    );
    // The same process recovered: the last second's tips all succeeded.
    let tail: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > restarted + Duration::from_secs(4))
        .collect();
    assert!(
        !tail.is_empty(),
        "tips were still being sent after the restart"
    );
    assert!(tail.iter().all(|o| o.status == 201), "{tail:?}");
    assert_eq!(tips.pid(), pid);
    assert!(
        tips.is_running(),
        "the function recovered without a restart"
    );

    // Nothing half-written: a refused key, retried, is applied exactly once.
    for o in outcomes.iter().filter(|o| o.status != 201) {
        let retry = tip(&tips, &fan_token, creator, &o.key).await;
        assert_eq!(retry.status, 201, "retry of {o:?}: {retry:?}");
    }
    let sent = outcomes.len() as i64;
    assert_eq!(balance(fan_token.clone()).await, FUNDED - sent);
    assert_eq!(balance(creator_token.clone()).await, sent);
    // The same keys again are replays: no further effect.
    for o in outcomes.iter().take(20) {
        let replay = tip(&tips, &fan_token, creator, &o.key).await;
        assert_eq!(replay.status, 201, "{replay:?}");
    }
    assert_eq!(balance(fan_token).await, FUNDED - sent);

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.admin_url())
        .await
        .expect("admin");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
    let stored: i64 = sqlx::query_scalar("select count(*) from app.idempotency_keys")
        .fetch_one(&mut conn)
        .await
        .expect("count keys");
    assert_eq!(stored, sent, "one stored answer per key, none half-written");
}
