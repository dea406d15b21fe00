//! Starting compiled function binaries and local stand-ins for end-to-end tests.
// Shared by several test binaries; each uses a part of it.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use stagepass_platform::auth::testing::{
    TEST_ISSUER, TEST_ISSUER_BASE, TEST_JWT_SECRET, mint_hs256,
};
use stagepass_platform::testing::TestDb;
use tokio::process::{Child, Command};

/// The path of a function binary built by Cargo for this test run.
fn binary(name: &str) -> &'static str {
    match name {
        "health" => env!("CARGO_BIN_EXE_health"),
        "health_ready" => env!("CARGO_BIN_EXE_health_ready"),
        "v1_me" => env!("CARGO_BIN_EXE_v1_me"),
        "v1_openapi" => env!("CARGO_BIN_EXE_v1_openapi"),
        "v1_auth_access_token_hook" => env!("CARGO_BIN_EXE_v1_auth_access_token_hook"),
        "v1_admin_users_role" => env!("CARGO_BIN_EXE_v1_admin_users_role"),
        "v1_admin_flags" => env!("CARGO_BIN_EXE_v1_admin_flags"),
        "v1_admin_flags_key" => env!("CARGO_BIN_EXE_v1_admin_flags_key"),
        "v1_tokens_packages" => env!("CARGO_BIN_EXE_v1_tokens_packages"),
        "v1_tokens_balance" => env!("CARGO_BIN_EXE_v1_tokens_balance"),
        "v1_tokens_ledger" => env!("CARGO_BIN_EXE_v1_tokens_ledger"),
        "v1_tips" => env!("CARGO_BIN_EXE_v1_tips"),
        "v1_tokens_purchases" => env!("CARGO_BIN_EXE_v1_tokens_purchases"),
        "webhooks_stripe" => env!("CARGO_BIN_EXE_webhooks_stripe"),
        "cron_ledger_audit" => env!("CARGO_BIN_EXE_cron_ledger_audit"),
        "cron_cleanup" => env!("CARGO_BIN_EXE_cron_cleanup"),
        "cron_reconcile_purchases" => env!("CARGO_BIN_EXE_cron_reconcile_purchases"),
        "v1_classes" => env!("CARGO_BIN_EXE_v1_classes"),
        "v1_classes_id" => env!("CARGO_BIN_EXE_v1_classes_id"),
        "v1_classes_enrollments" => env!("CARGO_BIN_EXE_v1_classes_enrollments"),
        "v1_classes_enrollments_me" => env!("CARGO_BIN_EXE_v1_classes_enrollments_me"),
        "v1_classes_cancel" => env!("CARGO_BIN_EXE_v1_classes_cancel"),
        "v1_schedule" => env!("CARGO_BIN_EXE_v1_schedule"),
        "cron_settle_classes" => env!("CARGO_BIN_EXE_cron_settle_classes"),
        "v1_schedule_feed" => env!("CARGO_BIN_EXE_v1_schedule_feed"),
        "v1_schedule_feed_token" => env!("CARGO_BIN_EXE_v1_schedule_feed_token"),
        "v1_realtime_token" => env!("CARGO_BIN_EXE_v1_realtime_token"),
        "jobs_class_reminder" => env!("CARGO_BIN_EXE_jobs_class_reminder"),
        "cron_deliver_outbox" => env!("CARGO_BIN_EXE_cron_deliver_outbox"),
        "v1_calls" => env!("CARGO_BIN_EXE_v1_calls"),
        "v1_calls_id" => env!("CARGO_BIN_EXE_v1_calls_id"),
        "v1_calls_action" => env!("CARGO_BIN_EXE_v1_calls_action"),
        "v1_calls_token" => env!("CARGO_BIN_EXE_v1_calls_token"),
        "v1_me_calls" => env!("CARGO_BIN_EXE_v1_me_calls"),
        "v1_me_call_settings" => env!("CARGO_BIN_EXE_v1_me_call_settings"),
        "v1_creators_call_settings" => env!("CARGO_BIN_EXE_v1_creators_call_settings"),
        "cron_bill_calls" => env!("CARGO_BIN_EXE_cron_bill_calls"),
        "jobs_call_tick" => env!("CARGO_BIN_EXE_jobs_call_tick"),
        "webhooks_agora" => env!("CARGO_BIN_EXE_webhooks_agora"),
        "v1_me_payout_account" => env!("CARGO_BIN_EXE_v1_me_payout_account"),
        "v1_me_payout_requests" => env!("CARGO_BIN_EXE_v1_me_payout_requests"),
        "v1_me_payouts" => env!("CARGO_BIN_EXE_v1_me_payouts"),
        "v1_me_payouts_id" => env!("CARGO_BIN_EXE_v1_me_payouts_id"),
        "v1_me_payouts_earnings" => env!("CARGO_BIN_EXE_v1_me_payouts_earnings"),
        "v1_admin_payout_holds" => env!("CARGO_BIN_EXE_v1_admin_payout_holds"),
        "cron_payouts" => env!("CARGO_BIN_EXE_cron_payouts"),
        "jobs_payout_transfer" => env!("CARGO_BIN_EXE_jobs_payout_transfer"),
        "webhooks_stripe_connect" => env!("CARGO_BIN_EXE_webhooks_stripe_connect"),
        other => panic!("unknown function binary {other}"),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A function binary running on its own port; killed when dropped.
pub struct Function {
    pub port: u16,
    _child: Child,
    client: reqwest::Client,
}

fn command(name: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary(name));
    // A clean environment: only what the test gives (plus PATH), so the
    // developer's or CI's variables cannot change the outcome.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

impl Function {
    pub async fn start(name: &str, env: &[(&str, &str)]) -> Function {
        let port = free_port();
        let child = command(name, env)
            .env("VERCEL_DEV_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn function binary");
        wait_for_port(port).await;
        Function {
            port,
            _child: child,
            client: reqwest::Client::new(),
        }
    }

    /// Runs a binary that is expected to exit (bad configuration).
    pub async fn run_to_exit(name: &str, env: &[(&str, &str)]) -> std::process::Output {
        let child = command(name, env)
            .env("VERCEL_DEV_PORT", free_port().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("the binary should exit on a broken environment")
            .expect("output")
    }

    /// The function's process id.
    pub fn pid(&self) -> u32 {
        self._child.id().expect("the function is running")
    }

    /// Whether the process is alive (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid())).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, token, None).await
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        json_body: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = json_body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        req.send().await.expect("request")
    }
}

pub async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("nothing listens on port {port}");
}

/// Agora's own test inputs (reference §1.2, as in the route tests): the
/// call token function signs with them, the tests decode with them.
pub const AGORA_APP_ID: &str = "970CA35de60c44645bbae8a215061b33";
pub const AGORA_APP_CERTIFICATE: &str = "5CFd2fd1755d40ecb72977518be15d3b";
/// Signs the Agora notifications the webhook function verifies.
pub const AGORA_NOTIFICATION_SECRET: &str = "agora-ncs-secret-for-e2e-tests-0";

/// The environment of a function that needs the database and auth (and
/// Agora's test credentials, read only by the call token function).
pub fn env_for(db: &TestDb) -> Vec<(&'static str, &'static str)> {
    // Leaked once per test: the values must outlive the spawned process's env.
    let url: &'static str = Box::leak(db.app_url().into_boxed_str());
    vec![
        ("APP_ENV", "test"),
        ("DATABASE_URL", url),
        ("SUPABASE_URL", TEST_ISSUER_BASE),
        ("SUPABASE_JWT_SECRET", TEST_JWT_SECRET),
        ("AGORA_APP_ID", AGORA_APP_ID),
        ("AGORA_APP_CERTIFICATE", AGORA_APP_CERTIFICATE),
    ]
}

pub fn mint(user: uuid::Uuid, email: Option<&str>) -> String {
    mint_hs256(TEST_JWT_SECRET, TEST_ISSUER, user, email, 3600)
}

/// The `kent` fake Sentry server (PyPI), installed by `.ci/run`.
pub struct Kent {
    port: u16,
    _child: Child,
}

impl Kent {
    /// `None` (with a loud note) only outside CI when kent is missing.
    pub async fn start() -> Option<Kent> {
        let bin = std::env::var("KENT_BIN").ok().or_else(|| {
            let home = std::env::var("HOME").ok()?;
            let path = format!("{home}/.cache/stagepass/venv/bin/kent-server");
            std::path::Path::new(&path).exists().then_some(path)
        });
        let Some(bin) = bin else {
            assert!(
                std::env::var("CI").is_err(),
                "kent-server is required in CI (set KENT_BIN; .ci/run installs it)"
            );
            eprintln!("SKIPPED: kent-server not installed; run `bash .ci/run` to install it");
            return None;
        };
        let port = free_port();
        let child = Command::new(bin)
            .args(["run", "--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kent-server");
        wait_for_port(port).await;
        Some(Kent {
            port,
            _child: child,
        })
    }

    pub fn dsn(&self) -> String {
        format!("http://public@127.0.0.1:{}/1", self.port)
    }

    /// Waits (bounded) for at least `n` events and returns their payloads.
    pub async fn wait_for_events(&self, n: usize) -> Vec<Value> {
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let list: Value = client
                .get(format!("{base}/api/eventlist/"))
                .send()
                .await
                .expect("eventlist")
                .json()
                .await
                .expect("json");
            let ids: Vec<String> = list["events"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if ids.len() >= n || Instant::now() > deadline {
                let mut events = Vec::new();
                for id in ids {
                    let e: Value = client
                        .get(format!("{base}/api/event/{id}"))
                        .send()
                        .await
                        .expect("event")
                        .json()
                        .await
                        .expect("json");
                    events.push(e);
                }
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
