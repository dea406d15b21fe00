//! `stagepass dev`: every function's routes on one port (DESIGN.md §5).
//!
//! Order matters: signals are caught first (so Ctrl-C during setup still
//! removes the throwaway cluster), the port is bound before the slow steps
//! (a busy port fails at once, and `SUPABASE_URL` can name the real port),
//! then the database is prepared, then the router is composed from the same
//! `FUNCTIONS` the deployed binaries use.

use std::collections::BTreeMap;
use std::process::ExitCode;

use base64::Engine as _;
use sqlx::PgPool;
use stagepass_platform::auth::testing::mint_hs256;
use stagepass_platform::config::{CoreConfig, DbConfig, Loader};
use stagepass_platform::serve::{Resources, compose, serve_local};
use stagepass_platform::telemetry;
use stagepass_routes::FUNCTIONS;
use stagepass_routes::outbox::Outbox;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::error::{Context as _, Result};
use crate::pgcluster::Cluster;

/// Fixed ids, so re-running against the same database reuses the demo users.
const DEMO_CREATOR: uuid::Uuid = uuid::uuid!("00000000-0000-4000-8000-0000000dec01");
const DEMO_FAN: uuid::Uuid = uuid::uuid!("00000000-0000-4000-8000-0000000dfa01");
/// The demo fan's promotional grant: a fixed id, so it is given once per
/// database (the ledger refuses a second `('promotion', id)` journal).
const DEMO_GRANT: uuid::Uuid = uuid::uuid!("00000000-0000-4000-8000-0000000d9a01");
const DEMO_GRANT_TOKENS: i64 = 1_000;
const DEMO_GRANT_REASON: &str = "stagepass dev: demo tokens to try tips and classes";
/// An admin, so the admin routes can be tried (and fuzzed) locally too.
const DEMO_ADMIN: uuid::Uuid = uuid::uuid!("00000000-0000-4000-8000-0000000dad01");
const TOKEN_TTL_SECONDS: i64 = 24 * 3600;

pub async fn run(tokens_file: Option<std::path::PathBuf>) -> Result<ExitCode> {
    let mut signals = Signals::install()?;
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".to_owned());
    let listener = tokio::net::TcpListener::bind(format!("{host}:{port}"))
        .await
        .with_context(|| format!("binding {host}:{port} (set PORT to use another port)"))?;
    let port = listener.local_addr()?.port();

    // Dropping this future on a signal drops any cluster it started (cleanup).
    let prepared = tokio::select! {
        prepared = prepare_database() => prepared?,
        _ = signals.recv() => {
            eprintln!("interrupted during setup");
            return Ok(ExitCode::from(130));
        }
    };
    let vars = dev_environment(port, &prepared.app_url)?;
    let env = || Loader::from_map(vars.clone());
    telemetry::init("stagepass-dev", &CoreConfig::load(&mut env()));
    let resources = Resources::default();
    let (router, failures) = compose(FUNCTIONS, env, &resources);

    let base = format!("http://127.0.0.1:{port}");
    print_banner(&base, &prepared, &failures);
    deliver_outbox_in_background(&mut env(), &resources);
    let tokens = demo_tokens(&prepared.admin_pool, &vars).await?;
    let grant = grant_demo_tokens(&prepared.admin_pool).await?;
    print_tokens(&base, &tokens);
    print_money(&base, &tokens, &grant, &vars);
    if let Some(path) = &tokens_file {
        write_tokens_file(path, &base, &tokens)?;
    }
    prepared.admin_pool.close().await;

    serve_local(listener, router, async move { signals.recv().await })
        .await
        .context("serving")?;
    if let Some(cluster) = prepared.cluster {
        let dir = cluster.dir().to_owned();
        drop(cluster);
        println!(
            "stopped the throwaway PostgreSQL and removed {}",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What Vercel Cron and QStash do in a deployment, done here by a ticker:
/// every 5 seconds the outbox is delivered — realtime messages to Ably when
/// `ABLY_API_KEY` is set (else marked unsent), jobs to QStash when
/// `QSTASH_TOKEN` is set, else run inline once due.
fn deliver_outbox_in_background(l: &mut Loader, resources: &Resources) {
    let pool = DbConfig::load(l).and_then(|c| resources.db(&c));
    let Some(outbox) = Outbox::load(l, resources, pool) else {
        println!("outbox: not delivered (Ably/QStash settings incomplete)");
        return;
    };
    let ably = if l.get("ABLY_API_KEY").is_some() {
        "published to Ably"
    } else {
        "not sent (no ABLY_API_KEY)"
    };
    let jobs = if l.get("QSTASH_TOKEN").is_some() {
        "sent to QStash"
    } else {
        "run inline when due"
    };
    println!("outbox: every 5 s; realtime messages {ably}; jobs {jobs}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(e) = outbox.deliver_pending(20).await {
                tracing::warn!(error = %e, "dev outbox delivery failed");
            }
        }
    });
}

/// SIGINT and SIGTERM, registered once: from then on neither kills the
/// process outright, so cleanup always runs.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

struct Prepared {
    /// The throwaway cluster, when we started one.
    cluster: Option<Cluster>,
    /// Superuser (or owner) connection: migrations and demo fixtures.
    admin_pool: PgPool,
    /// What the functions connect with.
    app_url: String,
    /// Where the database came from, for the banner.
    origin: String,
}

async fn prepare_database() -> Result<Prepared> {
    let configured = std::env::var("DATABASE_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    match configured {
        Some(app_url) => {
            // Migrations create roles: they need the owner, not the app login.
            let admin_url = std::env::var("DATABASE_ADMIN_URL").unwrap_or_else(|_| app_url.clone());
            migrated(None, &admin_url, app_url, "DATABASE_URL".to_owned()).await
        }
        None => {
            println!("DATABASE_URL is not set: starting a throwaway PostgreSQL cluster…");
            let cluster = Cluster::start()?;
            let origin = format!(
                "throwaway cluster in {} (removed on exit)",
                cluster.dir().display()
            );
            let (admin_url, app_url) = (cluster.admin_url(), cluster.app_url());
            migrated(Some(cluster), &admin_url, app_url, origin).await
        }
    }
}

/// Connects as the owner and applies the migrations. Takes the cluster so
/// that a failure here drops (and removes) it.
async fn migrated(
    cluster: Option<Cluster>,
    admin_url: &str,
    app_url: String,
    origin: String,
) -> Result<Prepared> {
    let admin_pool = crate::migrate::connect(admin_url).await?;
    let applied = crate::migrate::apply(&admin_pool).await?;
    println!("migrations: {} newly applied", applied.len());
    Ok(Prepared {
        cluster,
        admin_pool,
        app_url,
        origin,
    })
}

/// The process environment plus development defaults for what is unset
/// (an empty value counts as unset, as in `Loader::get`).
fn dev_environment(port: u16, app_url: &str) -> Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    let mut default = |key: &str, value: String| {
        if vars.get(key).is_none_or(|v| v.trim().is_empty()) {
            vars.insert(key.to_owned(), value);
        }
    };
    default("APP_ENV", "development".to_owned());
    default("DATABASE_URL", app_url.to_owned());
    default("SUPABASE_URL", format!("http://127.0.0.1:{port}"));
    default("PUBLIC_BASE_URL", format!("http://127.0.0.1:{port}"));
    // Where Stripe's hosted onboarding returns a creator (payouts).
    default("APP_BASE_URL", format!("http://127.0.0.1:{port}"));
    // Per-run random secrets: nothing minted by one run works in another.
    default("SUPABASE_JWT_SECRET", random_alphanumeric(48)?);
    default(
        "AUTH_HOOK_SECRET",
        format!("v1,whsec_{}", random_base64(32)?),
    );
    Ok(vars)
}

fn print_banner(
    base: &str,
    prepared: &Prepared,
    failures: &[(&'static str, stagepass_platform::config::ConfigErrors)],
) {
    println!();
    println!("Stagepass dev server: {base}");
    println!("database: {}", prepared.origin);
    println!();
    println!("routes:");
    for function in FUNCTIONS {
        for path in function.paths {
            println!("  {base}{path:<40}  ({})", function.name);
        }
    }
    if !failures.is_empty() {
        println!();
        println!("not configured (these answer 503 not_configured):");
        for (name, errors) in failures {
            // Problems name variables and rules, never values.
            for p in &errors.0 {
                println!("  {name}: {}: {}", p.variable, p.problem);
            }
        }
    }
}

struct DemoToken {
    id: uuid::Uuid,
    label: &'static str,
    handle: &'static str,
    token: String,
}

/// Creates (or reuses) a demo creator, fan and admin and mints 24-hour
/// HS256 tokens for them with the dev secret.
async fn demo_tokens(admin: &PgPool, vars: &BTreeMap<String, String>) -> Result<Vec<DemoToken>> {
    let loader = Loader::from_map(vars.clone());
    let secret = loader.get("SUPABASE_JWT_SECRET").unwrap_or_default();
    let supabase_url = loader.get("SUPABASE_URL").unwrap_or_default();
    let issuer = format!("{}/auth/v1", supabase_url.trim_end_matches('/'));
    let mut tokens = Vec::new();
    for (id, role, handle, label) in [
        (DEMO_CREATOR, "creator", "demo_creator", "creator"),
        (DEMO_FAN, "fan", "demo_fan", "fan"),
        (DEMO_ADMIN, "admin", "demo_admin", "admin"),
    ] {
        ensure_demo_user(admin, id, role, handle).await?;
        let email = format!("{handle}@example.test");
        tokens.push(DemoToken {
            id,
            label,
            handle,
            token: mint_hs256(&secret, &issuer, id, Some(&email), TOKEN_TTL_SECONDS),
        });
    }
    Ok(tokens)
}

async fn ensure_demo_user(admin: &PgPool, id: uuid::Uuid, role: &str, handle: &str) -> Result<()> {
    crate::users::apply_role(admin, id, role, "stagepass-dev", Some("demo user")).await?;
    // The handle is a fixture: set directly as the superuser. Another user
    // holding it already is not worth failing the dev server for.
    let updated = sqlx::query(
        "update app.users set handle = $2 where id = $1 and handle is distinct from $2",
    )
    .bind(id)
    .bind(handle)
    .execute(admin)
    .await;
    if let Err(e) = updated {
        eprintln!("warning: could not give the demo user the handle {handle}: {e}");
    }
    Ok(())
}

fn print_tokens(base: &str, tokens: &[DemoToken]) {
    println!();
    println!("demo bearer tokens (valid 24 h, this run only):");
    for t in tokens {
        println!("  # {} (@{})", t.label, t.handle);
        println!(
            "  curl -H \"Authorization: Bearer {}\" {base}/api/v1/me",
            t.token
        );
    }
}

/// What the demo fan can do with money right away, and whether card
/// purchases work here (a Stripe stand-in or test keys configured).
fn print_money(base: &str, tokens: &[DemoToken], grant: &str, vars: &BTreeMap<String, String>) {
    println!();
    println!("money: {grant}");
    if let Some(fan) = tokens.iter().find(|t| t.label == "fan") {
        println!("  # tip the demo creator 25 tokens");
        println!(
            "  curl -X POST -H \"Authorization: Bearer {}\" -H \"Idempotency-Key: demo-tip-1\" \\\n    \
             -H \"Content-Type: application/json\" -d '{{\"recipient_id\":\"{DEMO_CREATOR}\",\"amount\":25}}' \\\n    \
             {base}/api/v1/tips",
            fan.token
        );
    }
    let stripe = |k: &str| vars.get(k).is_some_and(|v| !v.trim().is_empty());
    if stripe("STRIPE_SECRET_KEY") && stripe("STRIPE_WEBHOOK_SECRET") {
        let api = vars
            .get("STRIPE_API_BASE")
            .map_or("https://api.stripe.com (test keys?)", String::as_str);
        println!("card purchases: Stripe at {api}; webhooks to {base}/api/webhooks/stripe");
    } else {
        println!(
            "card purchases: off (set STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET and, for \
             localstripe, STRIPE_API_BASE; see README \"Try the money features\")"
        );
    }
    if stripe("STRIPE_SECRET_KEY") && stripe("STRIPE_CONNECT_WEBHOOK_SECRET") {
        println!("payouts: Stripe Connect; Connect webhooks to {base}/api/webhooks/stripe-connect");
    } else {
        println!(
            "payouts: off (set STRIPE_SECRET_KEY and STRIPE_CONNECT_WEBHOOK_SECRET; \
             localstripe has no Connect: use Stripe test keys; docs/PAYOUTS.md)"
        );
    }
    println!();
    println!("Ctrl-C stops the server.");
}

/// Gives the demo fan promotional tokens through the same audited SQL
/// function as the admin route (`app.apply_token_grant`, as
/// `operator:stagepass-dev`), once per database. Returns what to print.
async fn grant_demo_tokens(admin: &PgPool) -> Result<String> {
    use stagepass_ledger::LedgerError;
    use stagepass_ledger::grants::{self, MAX_GRANT, MIN_GRANT};
    let amount = stagepass_ledger::TokenAmount::parse(DEMO_GRANT_TOKENS, MIN_GRANT, MAX_GRANT)
        .context("the demo grant amount")?;
    let mut conn = admin
        .acquire()
        .await
        .context("connecting for the demo grant")?;
    let granted = grants::operator_grant(
        &mut conn,
        DEMO_GRANT.into(),
        DEMO_FAN.into(),
        amount,
        DEMO_GRANT_REASON,
        "stagepass-dev",
    )
    .await;
    match granted {
        Ok(g) => Ok(format!(
            "granted {} promotional tokens to @demo_fan (audited in app.token_grants as \
             operator:stagepass-dev, journal {}); balance {}",
            g.amount, g.journal_id, g.balance
        )),
        Err(LedgerError::AlreadyApplied) => {
            let balance: i64 = sqlx::query_scalar(
                "select balance from ledger.balances where kind = 'wallet' \
                 and owner_id = $1 and reference is null",
            )
            .bind(DEMO_FAN)
            .fetch_one(&mut *conn)
            .await
            .context("reading the demo fan's balance")?;
            Ok(format!(
                "@demo_fan received its {DEMO_GRANT_TOKENS} promotional tokens on an earlier \
                 run; balance {balance}"
            ))
        }
        Err(e) => Err(format!("granting the demo fan tokens: {e}").into()),
    }
}

/// `{"base_url": …, "creator": {"id", "handle", "token"}, "fan": {…}}`,
/// written to a temporary file and renamed, so a script polling for the
/// file never reads half of it. The listener is bound already: requests made
/// once the file exists wait for the server at most until it is serving.
fn write_tokens_file(path: &std::path::Path, base: &str, tokens: &[DemoToken]) -> Result<()> {
    let mut doc = serde_json::Map::new();
    doc.insert("base_url".into(), base.into());
    for t in tokens {
        doc.insert(
            t.label.into(),
            serde_json::json!({ "id": t.id, "handle": t.handle, "token": t.token }),
        );
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::Value::Object(doc).to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    println!("tokens written to {}", path.display());
    Ok(())
}

fn random_alphanumeric(len: usize) -> Result<String> {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    Ok(random_bytes(len)?
        .into_iter()
        // 256 % 62 != 0: a slight bias, irrelevant for a per-run dev secret.
        .map(|b| char::from(CHARS[usize::from(b) % CHARS.len()]))
        .collect())
}

fn random_base64(len: usize) -> Result<String> {
    Ok(base64::engine::general_purpose::STANDARD.encode(random_bytes(len)?))
}

fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).context("reading the OS random generator")?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokens_file_is_json_with_the_base_url_and_each_demo_user() {
        let dir = std::env::temp_dir().join(format!("stagepass-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tokens.json");
        let tokens = [
            DemoToken {
                id: DEMO_CREATOR,
                label: "creator",
                handle: "demo_creator",
                token: "c.t.s".into(),
            },
            DemoToken {
                id: DEMO_FAN,
                label: "fan",
                handle: "demo_fan",
                token: "f.t.s".into(),
            },
        ];
        write_tokens_file(&path, "http://127.0.0.1:3000", &tokens).expect("written");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        assert_eq!(doc["base_url"], "http://127.0.0.1:3000");
        assert_eq!(doc["creator"]["token"], "c.t.s");
        assert_eq!(doc["creator"]["id"], DEMO_CREATOR.to_string());
        assert_eq!(doc["fan"]["handle"], "demo_fan");
        assert!(
            !path.with_extension("tmp").exists(),
            "the temporary file is renamed"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
