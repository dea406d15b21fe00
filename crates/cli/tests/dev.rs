//! `stagepass dev` as a newcomer runs it: the demo fan can spend at once
//! (an audited promotional grant, given once per database), and with a
//! Stripe stand-in configured (localstripe) a card purchase is credited end
//! to end through the dev server's own webhook route.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stagepass_integrations::testing::{CARD_SUCCEEDS, LocalStripe, SECRET_KEY};
use stagepass_platform::testing::{TestDb, admin_url};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEMO_CREATOR: &str = "00000000-0000-4000-8000-0000000dec01";
const WEBHOOK_SECRET: &str = "whsec_stagepass_dev_test";

/// A running `stagepass dev` (killed on drop) and what it printed.
struct Dev {
    _child: Child,
    base: String,
    fan_token: String,
    money: String,
}

async fn start_dev(db: &TestDb, extra: &[(&str, String)]) -> Dev {
    let mut admin = url::Url::parse(&admin_url()).expect("admin url");
    admin.set_path(&format!("/{}", db.name));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stagepass"));
    cmd.arg("dev")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", db.app_url())
        .env("DATABASE_ADMIN_URL", admin.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start stagepass dev");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut base, mut fan_token, mut money) = (None, None, None);
    let mut after_fan = false;
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(b) = line.strip_prefix("Stagepass dev server: ") {
                base = Some(b.trim().to_owned());
            }
            if let Some(m) = line.strip_prefix("money: ") {
                money = Some(m.to_owned());
            }
            if after_fan {
                fan_token = line
                    .split("Bearer ")
                    .nth(1)
                    .and_then(|t| t.split('"').next())
                    .map(str::to_owned);
                after_fan = false;
            }
            if line.contains("# fan (@demo_fan)") {
                after_fan = true;
            }
            if line.contains("Ctrl-C stops the server.") {
                return;
            }
        }
        panic!("stagepass dev exited before it was ready");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("stagepass dev ready within 60 s");
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Dev {
        _child: child,
        base: base.expect("banner with the base URL"),
        fan_token: fan_token.expect("the demo fan's token"),
        money: money.expect("the money line"),
    }
}

impl Dev {
    async fn balance(&self, http: &reqwest::Client) -> i64 {
        let r = http
            .get(format!("{}/api/v1/tokens/balance", self.base))
            .bearer_auth(&self.fan_token)
            .send()
            .await
            .expect("balance");
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.expect("json")["balance"]
            .as_i64()
            .expect("balance")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_fan_can_spend_at_once_and_buy_through_localstripe() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let stripe = LocalStripe::start().await;
    let stripe_env: Vec<(&str, String)> = match &stripe {
        Some(s) => vec![
            ("STRIPE_API_BASE", s.base_url().to_string()),
            ("STRIPE_SECRET_KEY", SECRET_KEY.to_owned()),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()),
        ],
        None => Vec::new(),
    };
    let dev = start_dev(&db, &stripe_env).await;
    assert!(
        dev.money
            .starts_with("granted 1000 promotional tokens to @demo_fan"),
        "{}",
        dev.money
    );
    assert_eq!(dev.balance(&http).await, 1_000);
    let actor: String = sqlx::query_scalar("select actor from app.token_grants")
        .fetch_one(&db.admin_pool)
        .await
        .expect("the grant is audited");
    assert_eq!(actor, "operator:stagepass-dev");

    // Spend at once: tip the demo creator.
    let tip = http
        .post(format!("{}/api/v1/tips", dev.base))
        .bearer_auth(&dev.fan_token)
        .header("idempotency-key", "dev-test-tip")
        .json(&json!({"recipient_id": DEMO_CREATOR, "amount": 25}))
        .send()
        .await
        .expect("tip");
    assert_eq!(tip.status(), 201, "{:?}", tip.text().await);
    assert_eq!(dev.balance(&http).await, 975);

    // A card purchase, when a Stripe stand-in is there: the dev server
    // passes STRIPE_* through, localstripe sends the signed webhook to it.
    if let Some(stripe) = &stripe {
        stripe
            .register_webhook(&format!("{}/api/webhooks/stripe", dev.base), WEBHOOK_SECRET)
            .await
            .expect("register the webhook");
        let bought = http
            .post(format!("{}/api/v1/tokens/purchases", dev.base))
            .bearer_auth(&dev.fan_token)
            .header("idempotency-key", "dev-test-purchase")
            .json(&json!({"package": "small"}))
            .send()
            .await
            .expect("purchase");
        assert_eq!(bought.status(), 201);
        let bought: Value = bought.json().await.expect("json");
        let intent = bought["payment_intent_id"].as_str().expect("pi");
        stripe
            .client()
            .confirm_payment_intent(intent, Some(CARD_SUCCEEDS))
            .await
            .expect("confirm");
        let deadline = Instant::now() + Duration::from_secs(15);
        while dev.balance(&http).await != 975 + 200 {
            assert!(Instant::now() < deadline, "the webhook never credited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(dev);

    // A second run on the same database does not grant again.
    let again = start_dev(&db, &[]).await;
    assert!(again.money.contains("on an earlier run"), "{}", again.money);
    let grants: i64 = sqlx::query_scalar("select count(*) from app.token_grants")
        .fetch_one(&db.admin_pool)
        .await
        .expect("count");
    assert_eq!(grants, 1);
    drop(again);

    // The operator's own grant, through the same SQL function.
    let mut admin = url::Url::parse(&admin_url()).expect("admin url");
    admin.set_path(&format!("/{}", db.name));
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_stagepass"))
            .args(args)
            .env_clear()
            .env("USER", "tester")
            .env("DATABASE_ADMIN_URL", admin.as_str())
            .output()
            .expect("run stagepass")
    };
    let fan = "00000000-0000-4000-8000-0000000dfa01";
    let out = cli(&["users", "grant", fan, "50", "--reason", "support case 42"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("+50 tokens"), "{stdout}");
    let refused = cli(&["users", "grant", fan, "50"]);
    assert!(!refused.status.success(), "a reason is required");
    let actors: Vec<String> =
        sqlx::query_scalar("select actor from app.token_grants order by granted_at")
            .fetch_all(&db.admin_pool)
            .await
            .expect("actors");
    assert_eq!(actors, ["operator:stagepass-dev", "operator:tester"]);
    let mut conn = db.admin_pool.acquire().await.expect("conn");
    let report = stagepass_ledger::audit::audit(&mut conn)
        .await
        .expect("audit");
    assert!(report.is_clean(), "{report:?}");
}
