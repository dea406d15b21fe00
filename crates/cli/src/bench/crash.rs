//! `stagepass bench crash`: crash safety, measured (issue 14).
//!
//! The money functions (`v1_tips`, `v1_classes_enrollments`,
//! `v1_classes_enrollments_me`, `webhooks_stripe`, `v1_classes_cancel`,
//! `cron_settle_classes`) run as real processes against a fresh migrated
//! database. Each round sends a small batch of money requests to one of
//! them — tips, class enrolments, withdrawals, signed
//! `payment_intent.succeeded` events, cancellations of full classes, the
//! settlement cron for classes moved into the past — and `SIGKILL`s the
//! process at a random moment (seeded RNG; the delay is
//! drawn from zero to twice the request's measured latency, so kills land
//! before, during and after the transaction). The function is restarted and
//! every request of the batch is sent again with the same `Idempotency-Key`
//! (or the same event id; withdrawals, cancellations and settlement carry
//! none, the state is their key) until it gets a definitive answer: 2xx applied, or
//! a 4xx refusal; 409 `idempotency_in_progress`, 5xx and broken connections
//! are retried.
//!
//! At the end, with every function stopped, the database is compared with
//! the model built from the definitive answers ([`check`]): each applied
//! request has exactly one journal (none for a refused one), each wallet
//! holds exactly what the model says, the ledger audit (the one
//! `cron_ledger_audit` runs) is clean, and the outbox told the truth (one
//! `tip.received` per committed tip, each wallet's last `balance.updated`
//! equal to its balance). Any difference is a lost or doubled effect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use stagepass_platform::auth::testing::mint_hs256;
use stagepass_platform::testing::TestDb;
use uuid::Uuid;

use super::{JWT_SECRET, Running, SUPABASE_URL, Target, http, money};
use crate::error::{Context as _, Result, fail};

pub struct CrashOptions {
    pub json: bool,
    pub kills: usize,
    /// The time cap of the kill loop (the final check comes after it).
    pub seconds: u64,
    pub seed: Option<u64>,
    pub bin_dir: PathBuf,
}

/// The stand-in webhook signing secret (the function's environment).
const WEBHOOK_SECRET: &str = "whsec_bench_crash_0123456789";
/// The stand-in cron secret.
const CRON_SECRET: &str = "bench-crash-cron-secret-0123456789";
/// Class price in tokens, and the tokens (and cents) of one purchase.
const PRICE: i64 = 7;
const PURCHASE_TOKENS: i64 = 500;
const PURCHASE_CENTS: i64 = 499;
const FANS: usize = 16;
/// Enrolments per class (consecutive fans) before the next class: small, so
/// full classes are there to cancel and settle often.
const CLASS_SIZE: usize = 4;
const CREATORS: usize = 3;
/// Requests of one batch, killed together.
const MAX_BATCH: usize = 4;
/// How long one request may take to reach a definitive answer, retries
/// included, before it counts as undecided (a violation).
const DECIDE_TIMEOUT: Duration = Duration::from_secs(30);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A small, seeded generator (splitmix64): the same seed replays the same
/// kinds, batches and delays (the timing of a kill still depends on the
/// machine).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Tip,
    Enrollment,
    Webhook,
    Cancellation,
    Settlement,
    Withdrawal,
}

const KINDS: [Kind; 6] = [
    Kind::Tip,
    Kind::Enrollment,
    Kind::Webhook,
    Kind::Cancellation,
    Kind::Settlement,
    Kind::Withdrawal,
];

impl Kind {
    fn function(self) -> &'static str {
        match self {
            Kind::Tip => "v1_tips",
            Kind::Enrollment => "v1_classes_enrollments",
            Kind::Webhook => "webhooks_stripe",
            Kind::Cancellation => "v1_classes_cancel",
            Kind::Settlement => "cron_settle_classes",
            Kind::Withdrawal => "v1_classes_enrollments_me",
        }
    }
}

/// One money request as the model knows it.
#[derive(Debug, Clone)]
pub enum Op {
    Tip {
        fan: Uuid,
        creator: Uuid,
        amount: i64,
    },
    Enrollment {
        fan: Uuid,
        class: Uuid,
    },
    /// `payment_intent.succeeded` for a pending purchase of `fan`.
    Purchase {
        fan: Uuid,
        payment_intent: String,
    },
    /// A fan leaves a class (before the cut-off) with a full refund.
    Withdrawal {
        fan: Uuid,
        class: Uuid,
    },
    /// The creator cancels a class whose enrolments are over: every
    /// enrolled fan refunded from escrow.
    Cancellation {
        class: Uuid,
    },
    /// A full class, moved into the past, then the settlement cron (with
    /// the cron secret): the escrow paid to the creator.
    Settlement {
        class: Uuid,
        creator: Uuid,
    },
}

/// How a request ended, once definitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 2xx; `reference` is the journal reference the answer names (tip or
    /// enrolment id; the PaymentIntent for a purchase).
    Applied { reference: String },
    /// A 4xx other than "in progress": nothing may have happened.
    Refused { status: u16 },
}

/// A request, its wire form, and its end.
struct Request {
    op: Op,
    kind: Kind,
    /// The `Idempotency-Key`, or the Stripe event id.
    key: String,
    /// The request for a given function address (the port changes on
    /// every restart, the bytes do not depend on it).
    bytes: Vec<u8>,
    decision: Option<Decision>,
}

/// One invariant that does not hold.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    kills: usize,
    requests: usize,
    /// Requests sent again after a kill (each counted once per send).
    retries: usize,
    /// Requests whose first attempt got no answer (the kill interrupted them).
    interrupted: usize,
    /// Interrupted, yet already committed when the process died (found by
    /// their idempotency record or processed event before the retry): the
    /// retry must replay them, not apply them again.
    committed_unanswered: usize,
    /// Answered before the kill, then replayed after the restart.
    replayed: usize,
    applied: usize,
    refused: usize,
    restarts_ms_total: u128,
    /// Requests under kill, by kind.
    by_kind: BTreeMap<Kind, usize>,
    /// Retries answered 409 `idempotency_in_progress`: the killed
    /// process's transaction still held the key.
    in_progress: usize,
    /// Transactions Postgres rolled back in the database during the kill
    /// loop (`pg_stat_database.xact_rollback`): mostly the killed ones.
    rolled_back: i64,
}

/// A money function that can be killed and restarted.
struct Function {
    target: Target,
    running: Option<Running>,
}

impl Function {
    fn start(&mut self) -> Result<SocketAddr> {
        let mut running = Running::spawn(&self.target)?;
        running.wait_for_status(
            &self.target.request,
            probe_status(&self.target),
            Instant::now(),
        )?;
        // Read stderr from now on so a chatty function never blocks; the
        // thread ends when the process dies.
        drop(running.drain_stderr());
        let addr = running.addr;
        self.running = Some(running);
        Ok(addr)
    }

    fn addr(&self) -> Option<SocketAddr> {
        self.running.as_ref().map(|r| r.addr)
    }

    /// SIGKILL (std's `Child::kill` on Unix) and reap.
    fn kill(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// The probe has no side effect: without a token the money routes answer
/// 401, and so does the webhook without a signature.
fn probe_status(_target: &Target) -> u16 {
    401
}

pub async fn run(opts: CrashOptions) -> Result<ExitCode> {
    let seed = opts.seed.unwrap_or_else(|| {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        u64::from_le_bytes(bytes)
    });
    eprintln!(
        "bench crash: seed {seed} (replay with --seed {seed}), up to {} kills in {} s",
        opts.kills, opts.seconds
    );
    let mut rng = Rng::new(seed);
    let db = super::throwaway_database().await?;
    let fans: Vec<Uuid> = (0..FANS).map(|_| Uuid::new_v4()).collect();
    let creators: Vec<Uuid> = (0..CREATORS).map(|_| Uuid::new_v4()).collect();
    money::seed(&db, &fans, &creators).await?;

    let mut functions: BTreeMap<Kind, Function> = BTreeMap::new();
    for kind in KINDS {
        let binary = opts.bin_dir.join(kind.function());
        if !binary.is_file() {
            return fail(format!(
                "{} missing; build it (cargo build --bins) or pass --bin-dir",
                binary.display()
            ));
        }
        let mut env = money::function_env(db.app_url());
        env.push(("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_owned()));
        env.push(("CRON_SECRET", CRON_SECRET.to_owned()));
        let (path, request) = match kind {
            Kind::Tip => (
                "/api/v1/tips",
                http::request("POST", "/api/v1/tips", None, &[]),
            ),
            Kind::Enrollment => {
                let p = format!("/api/v1/classes/{}/enrollments", Uuid::nil());
                (
                    "/api/v1/classes/{id}/enrollments",
                    http::request("POST", &p, None, &[]),
                )
            }
            Kind::Webhook => (
                "/api/webhooks/stripe",
                http::request("POST", "/api/webhooks/stripe", None, &[]),
            ),
            Kind::Withdrawal => {
                let p = format!("/api/v1/classes/{}/enrollments/me", Uuid::nil());
                (
                    "/api/v1/classes/{id}/enrollments/me",
                    http::request("DELETE", &p, None, &[]),
                )
            }
            Kind::Settlement => (
                "/api/cron/settle-classes",
                http::get_request("/api/cron/settle-classes", None),
            ),
            Kind::Cancellation => {
                let p = format!("/api/v1/classes/{}/cancel", Uuid::nil());
                (
                    "/api/v1/classes/{id}/cancel",
                    http::request("POST", &p, None, &[]),
                )
            }
        };
        let mut f = Function {
            target: Target {
                name: kind.function(),
                path,
                binary,
                env,
                request,
            },
            running: None,
        };
        f.start()?;
        functions.insert(kind, f);
    }

    let mut world = World {
        db: &db,
        fans: &fans,
        creators: &creators,
        classes: Vec::new(),
        cancelled: 0,
        withdrawable: Vec::new(),
        enrolments: 0,
        purchases: 0,
        tokens: fans
            .iter()
            .chain(&creators)
            .map(|f| {
                (
                    *f,
                    mint_hs256(
                        JWT_SECRET,
                        &format!("{SUPABASE_URL}/auth/v1"),
                        *f,
                        None,
                        7200,
                    ),
                )
            })
            .collect(),
    };
    // Latency of each kind, unkilled, to aim the kills inside requests.
    let mut requests: Vec<Request> = Vec::new();
    let mut windows: BTreeMap<Kind, Duration> = BTreeMap::new();
    for kind in KINDS {
        let mut samples = Vec::new();
        // Enrolments fill two classes and start a third, so two full ones
        // are there to time cancellations on (KINDS lists enrolments first).
        let n = match kind {
            Kind::Enrollment => 2 * CLASS_SIZE + 1,
            Kind::Cancellation | Kind::Settlement | Kind::Withdrawal => 1,
            Kind::Tip | Kind::Webhook => 5,
        };
        for _ in 0..n {
            if !world.possible(kind) {
                break;
            }
            let mut r = world.request(kind, &mut rng).await?;
            let addr = functions[&kind].addr().ok_or("not running")?;
            let started = Instant::now();
            let answer = attempt(addr, &r.bytes).await;
            samples.push(started.elapsed());
            r.decision = decide(r.kind, &r.op, &answer);
            if r.decision.is_none() {
                return fail(format!(
                    "{} answered {answer:?} without a kill",
                    kind.function()
                ));
            }
            world.enrolled(&r);
            requests.push(r);
        }
        samples.sort();
        let median = samples.get(samples.len() / 2).copied();
        windows.insert(kind, median.unwrap_or(Duration::from_millis(20)) * 2);
    }

    let mut counts = Counts::default();
    let mut violations = Vec::new();
    let rollbacks_before = rollbacks(&db).await?;
    let started = Instant::now();
    let cap = Duration::from_secs(opts.seconds);
    while counts.kills < opts.kills && started.elapsed() < cap {
        let mut kind = KINDS[usize::try_from(rng.below(KINDS.len() as u64)).unwrap_or(0)];
        if !world.possible(kind) {
            kind = Kind::Enrollment; // fills the next class
        }
        let size = 1 + usize::try_from(rng.below(MAX_BATCH as u64)).unwrap_or(0);
        let mut batch = Vec::with_capacity(size);
        for _ in 0..size {
            if !world.possible(kind) {
                break; // a smaller batch: no other full class yet
            }
            batch.push(world.request(kind, &mut rng).await?);
        }
        let function = functions.get_mut(&kind).ok_or("no function")?;
        let addr = function.addr().ok_or("not running")?;
        let window = windows[&kind].as_micros().max(1);
        let delay = Duration::from_micros(rng.below(u64::try_from(window).unwrap_or(1)));
        // Every request of the batch on its own connection, at once; the
        // kill lands `delay` after they were sent.
        let mut set = tokio::task::JoinSet::new();
        for (i, r) in batch.iter().enumerate() {
            let bytes = r.bytes.clone();
            set.spawn(async move { (i, attempt(addr, &bytes).await) });
        }
        tokio::time::sleep(delay).await;
        function.kill();
        counts.kills += 1;
        let mut first: Vec<Option<Attempt>> = (0..batch.len()).map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, a)) = joined {
                first[i] = Some(a);
            }
        }
        let unanswered: Vec<String> = batch
            .iter()
            .zip(&first)
            .filter(|(r, a)| a.as_ref().and_then(|a| decide(r.kind, &r.op, a)).is_none())
            .map(|(r, _)| r.key.clone())
            .collect();
        counts.committed_unanswered += committed(&db, &unanswered).await?;
        let restart = Instant::now();
        let addr = function.start()?;
        counts.restarts_ms_total += restart.elapsed().as_millis();
        for (r, first) in batch.iter_mut().zip(first) {
            counts.requests += 1;
            *counts.by_kind.entry(r.kind).or_default() += 1;
            let answered = first.as_ref().and_then(|a| decide(r.kind, &r.op, a));
            if answered.is_none() {
                counts.interrupted += 1;
            } else {
                counts.replayed += 1;
            }
            // Sent again in every case: an interrupted request until it is
            // definitive, an answered one to see the replay agree.
            let (decision, retries, in_progress) = retry(addr, r).await;
            counts.retries += retries;
            counts.in_progress += in_progress;
            match (&answered, &decision) {
                (_, Err(last)) => violations.push(Violation {
                    check: "undecided",
                    detail: format!(
                        "{:?}: no definitive answer in {DECIDE_TIMEOUT:?} (last: {last})",
                        r.op
                    ),
                }),
                (Some(a), Ok(d)) if a != d => violations.push(Violation {
                    check: "replay differs",
                    detail: format!("{:?}: answered {a:?}, replayed {d:?}", r.op),
                }),
                _ => {}
            }
            r.decision = decision.ok();
        }
        for r in &batch {
            world.enrolled(r);
        }
        requests.append(&mut batch);
    }
    let duration = started.elapsed();
    for f in functions.values_mut() {
        f.kill();
    }
    for r in &requests {
        match r.decision {
            Some(Decision::Applied { .. }) => counts.applied += 1,
            Some(Decision::Refused { .. }) => counts.refused += 1,
            None => {}
        }
    }
    // Give the statistics collector a moment after the last session ended.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    counts.rolled_back = rollbacks(&db).await? - rollbacks_before;
    let model = Model::of(&fans, &creators, &requests);
    {
        let mut conn = db.admin_pool.acquire().await.context("check connection")?;
        violations.extend(check(&mut conn, &model).await?);
        // Credits whose fold after the response died with its process
        // (ADR 0021): the outbox cron folds them; after that no credit is
        // pending and every wallet's last balance.updated is its balance.
        sqlx::query("select app.fold_all_credits(100000)")
            .execute(&mut *conn)
            .await
            .context("the cron's fold")?;
        let unfolded: i64 = sqlx::query_scalar("select count(*) from ledger.pending_credits")
            .fetch_one(&mut *conn)
            .await
            .context("pending credits")?;
        if unfolded != 0 {
            violations.push(Violation {
                check: "deferred credits",
                detail: format!("{unfolded} credits still pending after the cron's fold"),
            });
        }
        violations.extend(
            check(&mut conn, &model)
                .await?
                .into_iter()
                .map(|v| Violation {
                    detail: format!("after the cron's fold: {}", v.detail),
                    ..v
                }),
        );
    }
    db.app_pool.close().await;
    db.admin_pool.close().await;
    drop(db);

    let doc = json!({
        "scenario": "crash",
        "seed": seed,
        "bin_dir": opts.bin_dir.display().to_string(),
        "kills": counts.kills,
        "requests": counts.requests,
        "interrupted": counts.interrupted,
        "committed_unanswered": counts.committed_unanswered,
        "replayed": counts.replayed,
        "retries": counts.retries,
        "retries_answered_in_progress": counts.in_progress,
        "transactions_rolled_back": counts.rolled_back,
        "requests_by_kind": counts.by_kind,
        "applied": counts.applied,
        "refused": counts.refused,
        "mean_restart_ms": counts.restarts_ms_total / (counts.kills.max(1) as u128),
        "duration_s": duration.as_secs_f64(),
        "violations": violations,
    });
    if opts.json {
        println!("{doc:#}");
    } else {
        println!(
            "bench crash (seed {seed}, {}): {} kills, {} requests under kill ({} interrupted, of which {} had \
             committed; {} answered then replayed), {} retries, {} applied, {} refused in total, \
             mean restart {} ms, {:.1} s; violations: {}",
            opts.bin_dir.display(),
            counts.kills,
            counts.requests,
            counts.interrupted,
            counts.committed_unanswered,
            counts.replayed,
            counts.retries,
            counts.applied,
            counts.refused,
            doc["mean_restart_ms"],
            duration.as_secs_f64(),
            violations.len()
        );
        println!(
            "  retries answered 409 idempotency_in_progress: {}; transactions rolled back by Postgres: {}",
            counts.in_progress, counts.rolled_back
        );
        println!(
            "  requests under kill by kind: {}",
            counts
                .by_kind
                .iter()
                .map(|(k, n)| format!("{} {n}", k.function()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for v in &violations {
            println!("  VIOLATION {}: {}", v.check, v.detail);
        }
    }
    Ok(if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What requests are made of: users, classes, pending purchases.
struct World<'a> {
    db: &'a TestDb,
    fans: &'a [Uuid],
    creators: &'a [Uuid],
    /// Classes and their creators, in order; all but the last are full
    /// (every fan tried to enrol once).
    classes: Vec<(Uuid, Uuid)>,
    /// Classes cancelled or settled (or being), from the first.
    cancelled: usize,
    /// Applied enrolments (class, fan) not withdrawn yet.
    withdrawable: Vec<(Uuid, Uuid)>,
    enrolments: usize,
    purchases: usize,
    tokens: BTreeMap<Uuid, String>,
}

impl World<'_> {
    /// A full class is left to cancel.
    fn can_cancel(&self) -> bool {
        self.cancelled + 1 < self.classes.len()
    }

    /// A request of `kind` can be made now.
    fn possible(&self, kind: Kind) -> bool {
        match kind {
            Kind::Cancellation | Kind::Settlement => self.can_cancel(),
            Kind::Withdrawal => {
                let closed = &self.classes[..self.cancelled];
                self.withdrawable
                    .iter()
                    .any(|(c, _)| !closed.iter().any(|(k, _)| k == c))
            }
            Kind::Tip | Kind::Enrollment | Kind::Webhook => true,
        }
    }

    /// Remembers an applied enrolment as one a fan may withdraw from.
    fn enrolled(&mut self, r: &Request) {
        if let (Op::Enrollment { fan, class }, Some(Decision::Applied { .. })) =
            (&r.op, &r.decision)
        {
            self.withdrawable.push((*class, *fan));
        }
    }

    /// An enrolment whose class is still open (neither cancelled nor
    /// settled), taken out of the list.
    fn take_withdrawable(&mut self, rng: &mut Rng) -> Option<(Uuid, Uuid)> {
        let closed: Vec<Uuid> = self.classes[..self.cancelled]
            .iter()
            .map(|(c, _)| *c)
            .collect();
        self.withdrawable.retain(|(c, _)| !closed.contains(c));
        if self.withdrawable.is_empty() {
            return None;
        }
        let i = usize::try_from(rng.below(self.withdrawable.len() as u64)).unwrap_or(0);
        Some(self.withdrawable.swap_remove(i))
    }

    /// A fresh request of `kind` (a new key; enrolments fill one class per
    /// fan round, each fan once per class).
    async fn request(&mut self, kind: Kind, rng: &mut Rng) -> Result<Request> {
        let mut key = Uuid::new_v4().to_string();
        let pick = |rng: &mut Rng, of: &[Uuid]| {
            of[usize::try_from(rng.below(of.len() as u64)).unwrap_or(0)]
        };
        let (op, bytes) = match kind {
            Kind::Tip => {
                let fan = pick(rng, self.fans);
                let creator = pick(rng, self.creators);
                let amount = 1 + i64::try_from(rng.below(5)).unwrap_or(0);
                let body = json!({"recipient_id": creator, "amount": amount}).to_string();
                let bytes = post(
                    "/api/v1/tips",
                    &[
                        ("Authorization", &format!("Bearer {}", self.tokens[&fan])),
                        ("Idempotency-Key", &key),
                        ("Content-Type", "application/json"),
                    ],
                    body.as_bytes(),
                );
                (
                    Op::Tip {
                        fan,
                        creator,
                        amount,
                    },
                    bytes,
                )
            }
            Kind::Enrollment => {
                let n = self.enrolments;
                self.enrolments += 1;
                if n.is_multiple_of(CLASS_SIZE) {
                    let creator = self.creators[self.classes.len() % self.creators.len()];
                    self.classes
                        .push((create_class(self.db, creator).await?, creator));
                }
                let (class, _) = *self.classes.last().ok_or("no class")?;
                let fan = self.fans[n % self.fans.len()];
                let bytes = post(
                    &format!("/api/v1/classes/{class}/enrollments"),
                    &[
                        ("Authorization", &format!("Bearer {}", self.tokens[&fan])),
                        ("Idempotency-Key", &key),
                    ],
                    b"",
                );
                (Op::Enrollment { fan, class }, bytes)
            }
            Kind::Webhook => {
                self.purchases += 1;
                key = format!("evt_crash_{}", Uuid::new_v4().simple());
                let fan = pick(rng, self.fans);
                let payment_intent = format!("pi_crash_{}", Uuid::new_v4().simple());
                sqlx::query(
                    "insert into app.purchases (id, user_id, package, tokens, price_cents, \
                     stripe_payment_intent_id) values ($1, $2, 'crash', $3, $4, $5)",
                )
                .bind(Uuid::new_v4())
                .bind(fan)
                .bind(PURCHASE_TOKENS)
                .bind(PURCHASE_CENTS)
                .bind(&payment_intent)
                .execute(&self.db.admin_pool)
                .await
                .context("pending purchase")?;
                let body = json!({
                    "id": key,
                    "object": "event",
                    "type": "payment_intent.succeeded",
                    "created": chrono::Utc::now().timestamp(),
                    "data": {"object": {"id": payment_intent, "object": "payment_intent",
                        "status": "succeeded", "amount": PURCHASE_CENTS, "currency": "usd"}},
                })
                .to_string();
                // Signed once: a retry is the same delivery (Stripe's
                // tolerance is 5 minutes, longer than any retry here).
                let signature = stagepass_integrations::stripe::webhook::sign(
                    body.as_bytes(),
                    WEBHOOK_SECRET,
                    chrono::Utc::now().timestamp(),
                )
                .map_err(|e| format!("sign: {e}"))?;
                let bytes = post(
                    "/api/webhooks/stripe",
                    &[
                        ("Stripe-Signature", &signature),
                        ("Content-Type", "application/json"),
                    ],
                    body.as_bytes(),
                );
                (
                    Op::Purchase {
                        fan,
                        payment_intent,
                    },
                    bytes,
                )
            }
            Kind::Withdrawal => {
                let Some((class, fan)) = self.take_withdrawable(rng) else {
                    return fail("no enrolment to withdraw");
                };
                key = format!("withdrawn:{class}:{fan}");
                let bytes = format!(
                    "DELETE /api/v1/classes/{class}/enrollments/me HTTP/1.1\r\n\
                     Host: 127.0.0.1\r\nConnection: close\r\n\
                     Authorization: Bearer {}\r\n\r\n",
                    self.tokens[&fan]
                )
                .into_bytes();
                // No key: a repeat finds no enrolment (409 not_enrolled).
                (Op::Withdrawal { fan, class }, bytes)
            }
            Kind::Settlement => {
                if !self.can_cancel() {
                    return fail("no class to settle");
                }
                let (class, creator) = self.classes[self.cancelled];
                self.cancelled += 1;
                key = format!("settled:{class}");
                // Ended an hour ago: the next cron run settles it (and any
                // other ended class of the batch).
                sqlx::query(
                    "update app.classes set starts_at = now() - interval '2 hours' where id = $1",
                )
                .bind(class)
                .execute(&self.db.admin_pool)
                .await
                .context("end the class")?;
                let bytes = format!(
                    "GET /api/cron/settle-classes HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                     Connection: close\r\nAuthorization: Bearer {CRON_SECRET}\r\n\r\n"
                )
                .into_bytes();
                // No key either: a settled class is never picked again.
                (Op::Settlement { class, creator }, bytes)
            }
            Kind::Cancellation => {
                if !self.can_cancel() {
                    return fail("no class to cancel");
                }
                let (class, creator) = self.classes[self.cancelled];
                self.cancelled += 1;
                key = format!("class:{class}");
                let bytes = post(
                    &format!("/api/v1/classes/{class}/cancel"),
                    &[(
                        "Authorization",
                        &format!("Bearer {}", self.tokens[&creator]),
                    )],
                    b"",
                );
                // No Idempotency-Key: the class's state is the key (a
                // repeat finds it cancelled).
                (Op::Cancellation { class }, bytes)
            }
        };
        Ok(Request {
            op,
            kind,
            key,
            bytes,
            decision: None,
        })
    }
}

fn post(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut text = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A class of `creator` starting in three days, seats for every fan, at
/// [`PRICE`].
async fn create_class(db: &TestDb, creator: Uuid) -> Result<Uuid> {
    money::create_class(db, creator, "Crash bench", FANS, PRICE).await
}

/// One send: the response, or why none came.
#[derive(Debug)]
enum Attempt {
    Answer(http::Response),
    Failed(String),
}

async fn attempt(addr: SocketAddr, bytes: &[u8]) -> Attempt {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut buf = Vec::new();
        http::exchange_response(&mut stream, bytes, &mut buf, true).await
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
        Ok(Ok(response)) => Attempt::Answer(response),
        Ok(Err(e)) => Attempt::Failed(e.to_string()),
        Err(_) => Attempt::Failed("timed out".into()),
    }
}

/// A definitive answer, or `None` (send again).
fn decide(kind: Kind, op: &Op, attempt: &Attempt) -> Option<Decision> {
    let Attempt::Answer(response) = attempt else {
        return None;
    };
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    match response.status {
        200..=299 if kind == Kind::Withdrawal => Some(withdrawn(op)),
        200..=299 => {
            let reference = match (kind, op) {
                (Kind::Tip, _) => body["tip_id"].as_str().unwrap_or_default().to_owned(),
                (Kind::Enrollment, _) => body["enrollment_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                (_, Op::Purchase { payment_intent, .. }) => payment_intent.clone(),
                (_, Op::Cancellation { class } | Op::Settlement { class, .. }) => class.to_string(),
                _ => String::new(),
            };
            Some(Decision::Applied { reference })
        }
        409 if body["code"] == "idempotency_in_progress" => None,
        // A cancellation sent again after it committed: the class is no
        // longer open. Same end as the 200 (the model then checks the
        // refunds really happened once).
        // The same for a withdrawal that committed: no enrolment is left.
        409 if kind == Kind::Withdrawal && body["code"] == "not_enrolled" => Some(withdrawn(op)),
        409 if kind == Kind::Cancellation && body["code"] == "class_not_open" => {
            let Op::Cancellation { class } = op else {
                return None;
            };
            Some(Decision::Applied {
                reference: class.to_string(),
            })
        }
        status @ 400..=499 => Some(Decision::Refused { status }),
        _ => None,
    }
}

/// How many of these keys (idempotency keys, event ids, `class:<id>` of a
/// cancellation) already have
/// their effect recorded: the transaction committed before the kill.
async fn committed(db: &TestDb, keys: &[String]) -> Result<usize> {
    let n: i64 = sqlx::query_scalar(
        "select (select count(*) from app.idempotency_keys where key = any($1)) \
              + (select count(*) from app.stripe_events where id = any($1)) \
              + (select count(*) from app.classes where status = 'cancelled' \
                   and 'class:' || id::text = any($1)) \
              + (select count(*) from app.classes where status = 'settled' \
                   and 'settled:' || id::text = any($1)) \
              + (select count(*) from app.enrollments where status = 'withdrawn' \
                   and 'withdrawn:' || class_id::text || ':' || user_id::text = any($1))",
    )
    .bind(keys)
    .fetch_one(&db.admin_pool)
    .await
    .context("committed before the kill")?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn withdrawn(op: &Op) -> Decision {
    let reference = match op {
        Op::Withdrawal { fan, class } => format!("{class}:{fan}"),
        _ => String::new(),
    };
    Decision::Applied { reference }
}

/// Sends `r` until its answer is definitive: the decision (or the last
/// failure) and the sends.
async fn retry(
    addr: SocketAddr,
    r: &Request,
) -> (std::result::Result<Decision, String>, usize, usize) {
    let started = Instant::now();
    let (mut sends, mut in_progress) = (0, 0);
    let mut last = String::new();
    while started.elapsed() < DECIDE_TIMEOUT {
        sends += 1;
        let a = attempt(addr, &r.bytes).await;
        if let Some(d) = decide(r.kind, &r.op, &a) {
            return (Ok(d), sends, in_progress);
        }
        if matches!(&a, Attempt::Answer(response) if response.status == 409) {
            in_progress += 1;
        }
        last = match a {
            Attempt::Answer(response) => format!(
                "HTTP {} {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            ),
            Attempt::Failed(e) => e,
        };
        // The killed process's transaction may still hold the key's lock
        // until Postgres notices the dead connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (Err(last), sends, in_progress)
}

/// `xact_rollback` of the database (the statistics are flushed when a
/// session ends, so read after the functions stopped).
async fn rollbacks(db: &TestDb) -> Result<i64> {
    sqlx::query_scalar("select xact_rollback from pg_stat_database where datname = $1")
        .bind(&db.name)
        .fetch_one(&db.admin_pool)
        .await
        .context("pg_stat_database")
}

/// What the database must hold, from the definitive answers.
#[derive(Debug, Default)]
pub struct Model {
    /// Expected wallet balance of each seeded user.
    pub wallets: BTreeMap<Uuid, i64>,
    /// Journal kind → references that must have exactly one journal.
    pub applied: BTreeMap<&'static str, Vec<String>>,
    /// Journal kind → how many journals there must be in all (seeding
    /// included).
    pub journals: BTreeMap<&'static str, i64>,
    /// Active enrolments there must be.
    pub enrolments: i64,
    /// (class, fan, enrolment id) of each applied enrolment: exactly one
    /// active row each, unless its class was cancelled.
    pub enrolled: Vec<(Uuid, Uuid, String)>,
    /// Classes cancelled.
    pub cancelled: Vec<Uuid>,
    /// Classes settled, with their creators.
    pub settled: Vec<(Uuid, Uuid)>,
}

impl Model {
    fn of(fans: &[Uuid], creators: &[Uuid], requests: &[Request]) -> Model {
        let mut m = Model::seeded(fans, creators);
        for r in requests {
            if let Some(Decision::Applied { reference }) = &r.decision {
                m.apply(&r.op, reference);
            }
        }
        m.refund_cancelled();
        m.pay_settled();
        m
    }

    /// Each settled class pays its active enrolments' prices to its creator
    /// once (the fee is 0 on a fresh database): one `class_settlement`
    /// journal (reference: the class) if anything was held.
    pub fn pay_settled(&mut self) {
        for (class, creator) in self.settled.clone() {
            let held = self.enrolled.iter().filter(|(c, _, _)| *c == class).count() as i64;
            self.enrolled.retain(|(c, _, _)| *c != class);
            self.enrolments -= held;
            if held > 0 {
                *self.wallets.entry(creator).or_default() += held * PRICE;
                *self.journals.entry("class_settlement").or_default() += 1;
                self.applied
                    .entry("class_settlement")
                    .or_default()
                    .push(class.to_string());
            }
        }
    }

    /// Each enrolment of a cancelled class refunded exactly once: one
    /// `class_refund` journal (reference: the enrolment), the price back in
    /// the fan's wallet, no longer active.
    pub fn refund_cancelled(&mut self) {
        let (refunded, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.enrolled)
            .into_iter()
            .partition(|(class, _, _)| self.cancelled.contains(class));
        self.enrolled = kept;
        for (_, fan, enrolment) in refunded {
            self.enrolments -= 1;
            *self.wallets.entry(fan).or_default() += PRICE;
            *self.journals.entry("class_refund").or_default() += 1;
            self.applied
                .entry("class_refund")
                .or_default()
                .push(enrolment);
        }
    }

    /// After [`money::seed`]: each fan funded by one purchase journal.
    pub fn seeded(fans: &[Uuid], creators: &[Uuid]) -> Model {
        let mut m = Model::default();
        for f in fans {
            m.wallets.insert(*f, money::FUNDED_TOKENS);
        }
        for c in creators {
            m.wallets.insert(*c, 0);
        }
        m.journals.insert("purchase", fans.len() as i64);
        m.journals.insert("tip", 0);
        m.journals.insert("class_enrollment", 0);
        m.journals.insert("class_refund", 0);
        m.journals.insert("class_settlement", 0);
        m
    }

    /// One applied request.
    pub fn apply(&mut self, op: &Op, reference: &str) {
        let (kind, moves): (&'static str, Vec<(Uuid, i64)>) = match op {
            Op::Tip {
                fan,
                creator,
                amount,
            } => ("tip", vec![(*fan, -amount), (*creator, *amount)]),
            Op::Enrollment { fan, class } => {
                self.enrolments += 1;
                self.enrolled.push((*class, *fan, reference.to_owned()));
                ("class_enrollment", vec![(*fan, -PRICE)])
            }
            Op::Cancellation { class } => {
                // Its refunds are counted by `refund_cancelled`, once every
                // enrolment is known.
                self.cancelled.push(*class);
                return;
            }
            Op::Withdrawal { fan, class } => {
                // The fan's enrolment there, refunded: one class_refund
                // journal whose reference is the enrolment.
                let Some(i) = self
                    .enrolled
                    .iter()
                    .position(|(c, f, _)| c == class && f == fan)
                else {
                    return;
                };
                let (_, _, enrolment) = self.enrolled.swap_remove(i);
                self.enrolments -= 1;
                *self.wallets.entry(*fan).or_default() += PRICE;
                *self.journals.entry("class_refund").or_default() += 1;
                self.applied
                    .entry("class_refund")
                    .or_default()
                    .push(enrolment);
                return;
            }
            Op::Settlement { class, creator } => {
                // Paid by `pay_settled`, once every enrolment is known.
                self.settled.push((*class, *creator));
                return;
            }
            Op::Purchase { fan, .. } => ("purchase", vec![(*fan, PURCHASE_TOKENS)]),
        };
        for (user, delta) in moves {
            *self.wallets.entry(user).or_default() += delta;
        }
        *self.journals.entry(kind).or_default() += 1;
        self.applied
            .entry(kind)
            .or_default()
            .push(reference.to_owned());
    }
}

/// The database against the model: journals per reference and per kind,
/// wallet balances, active enrolments, the ledger audit and the outbox.
pub async fn check(conn: &mut sqlx::PgConnection, m: &Model) -> Result<Vec<Violation>> {
    let mut out: Vec<Violation> = money::ledger_violations(conn)
        .await?
        .into_iter()
        .map(|detail| Violation {
            check: "ledger audit",
            detail,
        })
        .collect();
    for (kind, references) in &m.applied {
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "select r, (select count(*) from ledger.journals j where j.kind = $1 and j.reference = r) \
             from unnest($2::text[]) r",
        )
        .bind(kind)
        .bind(references)
        .fetch_all(&mut *conn)
        .await
        .context("journals per reference")?;
        for (reference, n) in counts {
            if n != 1 {
                out.push(Violation {
                    check: if n == 0 {
                        "lost effect"
                    } else {
                        "doubled effect"
                    },
                    detail: format!("{kind} {reference}: {n} journals"),
                });
            }
        }
    }
    for (kind, expected) in &m.journals {
        let n: i64 = sqlx::query_scalar("select count(*) from ledger.journals where kind = $1")
            .bind(kind)
            .fetch_one(&mut *conn)
            .await
            .context("journals per kind")?;
        if n != *expected {
            out.push(Violation {
                check: if n < *expected {
                    "lost effect"
                } else {
                    "doubled effect"
                },
                detail: format!("{kind}: {n} journals, the model says {expected}"),
            });
        }
    }
    let users: Vec<Uuid> = m.wallets.keys().copied().collect();
    let balances: Vec<(Uuid, i64)> = sqlx::query_as(
        "select u, coalesce((select balance from ledger.balances a where a.kind = 'wallet' \
           and a.reference is null and a.owner_id = u), 0) from unnest($1::uuid[]) u",
    )
    .bind(&users)
    .fetch_all(&mut *conn)
    .await
    .context("balances")?;
    for (user, balance) in balances {
        let expected = m.wallets[&user];
        if balance != expected {
            out.push(Violation {
                check: "wallet balance",
                detail: format!("{user}: {balance}, the model says {expected}"),
            });
        }
    }
    let active: i64 =
        sqlx::query_scalar("select count(*) from app.enrollments where status = 'enrolled'")
            .fetch_one(&mut *conn)
            .await
            .context("enrolments")?;
    if active != m.enrolments {
        out.push(Violation {
            check: "active enrolments",
            detail: format!("{active}, the model says {}", m.enrolments),
        });
    }
    let (classes, fans): (Vec<Uuid>, Vec<Uuid>) =
        m.enrolled.iter().map(|(c, f, _)| (*c, *f)).unzip();
    let not_once: i64 = sqlx::query_scalar(
        "select count(*) from unnest($1::uuid[], $2::uuid[]) p(class, fan) \
         where (select count(*) from app.enrollments e where e.class_id = p.class \
                and e.user_id = p.fan and e.status = 'enrolled') <> 1",
    )
    .bind(&classes)
    .bind(&fans)
    .fetch_one(&mut *conn)
    .await
    .context("enrolments per fan")?;
    if not_once != 0 {
        out.push(Violation {
            check: "enrolment not exactly once",
            detail: format!("{not_once} applied enrolments without exactly one active row"),
        });
    }
    let cancelled: i64 =
        sqlx::query_scalar("select count(*) from app.classes where status = 'cancelled'")
            .fetch_one(&mut *conn)
            .await
            .context("cancelled classes")?;
    let settled: i64 =
        sqlx::query_scalar("select count(*) from app.classes where status = 'settled'")
            .fetch_one(&mut *conn)
            .await
            .context("settled classes")?;
    if settled != m.settled.len() as i64 {
        out.push(Violation {
            check: "settled classes",
            detail: format!("{settled}, the model says {}", m.settled.len()),
        });
    }
    if cancelled != m.cancelled.len() as i64 {
        out.push(Violation {
            check: "cancelled classes",
            detail: format!("{cancelled}, the model says {}", m.cancelled.len()),
        });
    }
    let (tips_without_one, orphan_messages, stale_wallets): (i64, i64, i64) =
        sqlx::query_as(OUTBOX_SQL)
            .fetch_one(&mut *conn)
            .await
            .context("outbox checks")?;
    if tips_without_one != 0 || orphan_messages != 0 {
        out.push(Violation {
            check: "outbox tip.received",
            detail: format!(
                "{tips_without_one} tips without exactly one message, \
                 {orphan_messages} messages without a tip"
            ),
        });
    }
    if stale_wallets != 0 {
        out.push(Violation {
            check: "outbox balance.updated",
            detail: format!(
                "{stale_wallets} wallets whose last balance.updated is not their balance"
            ),
        });
    }
    Ok(out)
}

/// As `crates/routes/tests/simulation.rs` checks the outbox (ADR 0007).
const OUTBOX_SQL: &str = "\
    select \
      (select count(*) from ledger.journals j where j.kind = 'tip' and \
         (select count(*) from app.outbox o where o.dedup_key = 'tip:' || j.reference) <> 1), \
      (select count(*) from app.outbox o where o.name = 'tip.received' and not exists \
         (select 1 from ledger.journals j where j.kind = 'tip' \
           and o.dedup_key = 'tip:' || j.reference)), \
      (select count(*) from ledger.accounts a \
        cross join lateral (select (o.payload->>'balance')::bigint as said from app.outbox o \
           where o.destination = 'user:' || a.owner_id and o.name = 'balance.updated' \
           order by o.id desc limit 1) last \
        where a.kind = 'wallet' and a.reference is null and last.said <> a.balance)";

/// `--bin-dir` default: the debug binaries CI has already built.
pub fn default_bin_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    Path::new(&target).join("debug")
}

#[cfg(test)]
mod tests {
    //! The checker must be able to fail: a clean state passes, then a
    //! doubled tip and a lost one are each named.

    use super::*;

    struct Fixture {
        db: TestDb,
        fan: Uuid,
        creator: Uuid,
        model: Model,
    }

    impl Fixture {
        /// One fan, one creator, one tip of 3 through `app.tip`, modelled.
        async fn new() -> Fixture {
            let db = TestDb::new().await;
            let (fan, creator) = (Uuid::new_v4(), Uuid::new_v4());
            money::seed(&db, &[fan], &[creator]).await.expect("seed");
            let mut model = Model::seeded(&[fan], &[creator]);
            let tip = Uuid::new_v4();
            Fixture::tip(&db, fan, creator, tip).await;
            model.apply(
                &Op::Tip {
                    fan,
                    creator,
                    amount: 3,
                },
                &tip.to_string(),
            );
            Fixture {
                db,
                fan,
                creator,
                model,
            }
        }

        async fn tip(db: &TestDb, fan: Uuid, creator: Uuid, id: Uuid) {
            let mut tx = db.admin_pool.begin().await.expect("begin");
            sqlx::query("select set_config('request.jwt.claims', $1, true)")
                .bind(json!({"sub": fan}).to_string())
                .execute(&mut *tx)
                .await
                .expect("claims");
            sqlx::query("select * from app.tip($1, $2, 3, null)")
                .bind(id)
                .bind(creator)
                .execute(&mut *tx)
                .await
                .expect("tip");
            tx.commit().await.expect("commit");
        }

        /// A class of the creator, the fan enrolled through `app.enroll`,
        /// modelled; the state is clean.
        async fn enrolled_class(&mut self) -> Uuid {
            let class = create_class(&self.db, self.creator).await.expect("class");
            let enrolment = Uuid::new_v4();
            let mut tx = self.db.admin_pool.begin().await.expect("begin");
            sqlx::query("select set_config('request.jwt.claims', $1, true)")
                .bind(json!({"sub": self.fan}).to_string())
                .execute(&mut *tx)
                .await
                .expect("claims");
            sqlx::query("select * from app.enroll($1, $2)")
                .bind(class)
                .bind(enrolment)
                .execute(&mut *tx)
                .await
                .expect("enrol");
            tx.commit().await.expect("commit");
            self.model.apply(
                &Op::Enrollment {
                    fan: self.fan,
                    class,
                },
                &enrolment.to_string(),
            );
            assert_eq!(self.check().await, vec![]);
            class
        }

        async fn check(&self) -> Vec<Violation> {
            let mut conn = self.db.admin_pool.acquire().await.expect("conn");
            check(&mut conn, &self.model).await.expect("check")
        }
    }

    fn names(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(|v| v.check).collect()
    }

    #[tokio::test]
    async fn a_state_matching_the_model_is_clean() {
        let f = Fixture::new().await;
        assert_eq!(f.check().await, vec![]);
    }

    #[tokio::test]
    async fn a_doubled_tip_is_a_violation_though_the_ledger_balances() {
        let f = Fixture::new().await;
        // The same request applied twice (a retry that was not recognised):
        // a second, balanced tip the model does not have.
        Fixture::tip(&f.db, f.fan, f.creator, Uuid::new_v4()).await;
        let v = f.check().await;
        let found = names(&v);
        assert!(found.contains(&"doubled effect"), "{v:?}");
        assert!(found.contains(&"wallet balance"), "{v:?}");
        assert!(!found.contains(&"ledger audit"), "{v:?}");
    }

    #[tokio::test]
    async fn a_lost_tip_is_a_violation() {
        let mut f = Fixture::new().await;
        // Answered 201 but never committed.
        f.model.apply(
            &Op::Tip {
                fan: f.fan,
                creator: f.creator,
                amount: 3,
            },
            &Uuid::new_v4().to_string(),
        );
        let v = f.check().await;
        let found = names(&v);
        assert!(found.contains(&"lost effect"), "{v:?}");
        assert!(found.contains(&"wallet balance"), "{v:?}");
    }

    #[tokio::test]
    async fn a_cancellation_without_its_refund_is_a_lost_effect() {
        let mut f = Fixture::new().await;
        let class = f.enrolled_class().await;
        // Answered as cancelled, but the class never was: no refund.
        f.model
            .apply(&Op::Cancellation { class }, &class.to_string());
        f.model.refund_cancelled();
        let v = f.check().await;
        let found = names(&v);
        assert!(found.contains(&"lost effect"), "{v:?}");
        assert!(found.contains(&"cancelled classes"), "{v:?}");
        assert!(found.contains(&"active enrolments"), "{v:?}");
    }

    #[tokio::test]
    async fn a_withdrawal_answered_but_not_done_is_a_lost_effect() {
        let mut f = Fixture::new().await;
        let class = f.enrolled_class().await;
        f.model.apply(
            &Op::Withdrawal { fan: f.fan, class },
            &format!("{class}:{}", f.fan),
        );
        let v = f.check().await;
        let found = names(&v);
        assert!(found.contains(&"lost effect"), "{v:?}");
        assert!(found.contains(&"wallet balance"), "{v:?}");
        assert!(found.contains(&"active enrolments"), "{v:?}");
    }

    #[tokio::test]
    async fn a_stale_balance_message_is_a_violation() {
        let f = Fixture::new().await;
        // The last balance.updated of the fan says something else.
        sqlx::query(
            "insert into app.outbox (kind, destination, name, payload, dedup_key) \
             values ('realtime', 'user:' || $1, 'balance.updated', '{\"balance\": -1}', 'crash-test')",
        )
        .bind(f.fan.to_string())
        .execute(&f.db.admin_pool)
        .await
        .expect("stale message");
        assert!(names(&f.check().await).contains(&"outbox balance.updated"));
    }

    #[test]
    fn the_rng_is_seeded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 100));
    }
}
