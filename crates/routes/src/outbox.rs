//! Delivers the outbox (`app.outbox`, ADR 0007): realtime messages to Ably,
//! jobs to QStash — or, in development without QStash, runs due jobs
//! inline.
//!
//! Rows are written by the database in the transaction of the change that
//! causes them. A function that wrote some calls [`Outbox::kick`] after its
//! commit, which delivers right after the response; the `deliver-outbox`
//! cron picks up whatever that missed (a frozen instance, an Ably outage).
//! Delivery is at least once; every message carries its row's stable key,
//! which Ably and QStash use to drop repeats.
//!
//! A deliverer claims a batch (`app.claim_outbox`: `FOR UPDATE SKIP LOCKED`,
//! then a lease in `claimed_until`) in one statement, calls out with no
//! transaction open, then records every outcome in one statement
//! (`app.record_outbox`); a failure is retried with exponential backoff and
//! given up after [`MAX_ATTEMPTS`] (logged as an error).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use stagepass_integrations::ably::{AblyClient, AblyKey, Message};
use stagepass_integrations::qstash::{DEFAULT_RETRIES, Publish, QstashClient};
use stagepass_platform::config::{AblyConfig, ExposeSecret, Loader, QstashConfig};
use stagepass_platform::http::ApiError;
use stagepass_platform::serve::{PlatformHandle, Resources};
use utoipa::ToSchema;
use uuid::Uuid;

/// Rows claimed per round.
const BATCH: i64 = 50;
/// Attempts before a message is given up.
pub const MAX_ATTEMPTS: i32 = 15;
/// Accounts folded per cron run (ADR 0021; the next run takes the rest).
const FOLD_BATCH: i32 = 1000;

/// Where jobs go.
#[derive(Clone)]
enum JobTransport {
    /// QStash calls `{public_base}{job path}` at the job's time.
    Qstash {
        client: QstashClient,
        public_base: url::Url,
    },
    /// Development without QStash: a due job runs in the deliverer.
    Inline,
}

/// The outbox deliverer of one process. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    /// At most one delivery after responses runs per process at a time;
    /// kicks during it make it go round once more (under load, one claim
    /// serves many requests' messages).
    kicks: Arc<Kicks>,
    /// Claims and records are single statements on the pool, outside any
    /// request's transaction (one flight through a transaction pooler).
    pool: PgPool,
    /// `None` outside production without `ABLY_API_KEY`: realtime messages
    /// are then marked done unsent (and say so in `last_error`).
    ably: Option<AblyClient>,
    jobs: JobTransport,
    /// Inline jobs only: Stripe, for the payout transfer (`None` without
    /// `STRIPE_SECRET_KEY`: that job then fails and is retried).
    connect: Option<crate::payouts::Connect>,
}

/// What one delivery run did.
#[derive(Debug, Default, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
pub struct Delivery {
    /// Published to Ably or QStash, or run inline.
    pub delivered: u32,
    /// Not sent because the service is not configured (development only).
    pub skipped: u32,
    /// Failed this time; retried later.
    pub failed: u32,
    /// Accounts whose deferred credits were folded into their balance row
    /// first (the cron only; ADR 0021).
    pub folded_accounts: u32,
}

#[derive(sqlx::FromRow)]
struct Pending {
    id: i64,
    kind: String,
    destination: String,
    name: Option<String>,
    payload: serde_json::Value,
    dedup_key: String,
    not_before: Option<DateTime<Utc>>,
    attempts: i32,
}

#[derive(Default)]
struct Kicks {
    running: AtomicBool,
    pending: AtomicBool,
    /// Users whose wallets received deferred credits since the last fold.
    folds: Mutex<Vec<Uuid>>,
}

enum Outcome {
    Delivered,
    Skipped(&'static str),
    Failed(String),
}

impl Outbox {
    /// Ably and QStash are required in production; elsewhere each is used
    /// when configured (realtime unsent and jobs inline otherwise).
    /// `pool` is `None` when the database settings are broken (reported
    /// already); the outbox's own settings are still checked.
    pub fn load(l: &mut Loader, r: &Resources, pool: Option<PgPool>) -> Option<Outbox> {
        let production = l.app_env().is_production();
        let ably = if production || l.get("ABLY_API_KEY").is_some() {
            let cfg = AblyConfig::load(l);
            cfg.and_then(|c| {
                AblyKey::parse(c.api_key.expose_secret())
                    .map(|key| AblyClient::new(r.http(), c.api_base, key))
            })
            .map(Some)
        } else {
            Some(None)
        };
        let jobs = if production || l.get("QSTASH_TOKEN").is_some() {
            QstashConfig::load(l).map(|c| JobTransport::Qstash {
                client: QstashClient::new(r.http(), c.url, c.token),
                public_base: c.public_base_url,
            })
        } else {
            Some(JobTransport::Inline)
        };
        let connect = match jobs {
            Some(JobTransport::Inline) if l.get("STRIPE_SECRET_KEY").is_some() => {
                crate::payouts::Connect::load(l, r)
            }
            _ => None,
        };
        Some(Outbox {
            kicks: Arc::default(),
            pool: pool?,
            ably: ably?,
            jobs: jobs?,
            connect,
        })
    }

    /// After a committed change that credited `users` deferred credits
    /// (a tip): folds their wallets, then delivers, right after the
    /// response. The fold's `balance.updated` carries the balance; the
    /// cron folds what a lost kick left.
    pub fn fold_then_kick(&self, platform: &PlatformHandle, users: &[Uuid]) {
        if let Ok(mut folds) = self.kicks.folds.lock() {
            folds.extend_from_slice(users);
        }
        self.kick(platform);
    }

    /// Delivers what is pending right after the response (a failure is
    /// logged; the cron retries).
    pub fn kick(&self, platform: &PlatformHandle) {
        self.kicks.pending.store(true, Ordering::SeqCst);
        if self.kicks.running.swap(true, Ordering::SeqCst) {
            // The running delivery will go round again for these messages.
            return;
        }
        let outbox = self.clone();
        platform.after_response(async move {
            loop {
                while outbox.kicks.pending.swap(false, Ordering::SeqCst) {
                    if let Err(e) = outbox.fold_requested().await {
                        tracing::warn!(error = %e, "folding credits after the response failed");
                    }
                    if let Err(e) = outbox.deliver_pending(4).await {
                        tracing::warn!(error = %e, "outbox delivery after the response failed");
                    }
                }
                outbox.kicks.running.store(false, Ordering::SeqCst);
                // A kick between the last check and the store above found
                // `running` still set: take it over unless another did.
                if !outbox.kicks.pending.load(Ordering::SeqCst)
                    || outbox.kicks.running.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        });
    }

    /// Folds the wallets [`Outbox::fold_then_kick`] asked for, in one
    /// statement (all of them, in account order).
    async fn fold_requested(&self) -> Result<(), ApiError> {
        let mut users = match self.kicks.folds.lock() {
            Ok(mut folds) => std::mem::take(&mut *folds),
            Err(_) => return Ok(()),
        };
        if users.is_empty() {
            return Ok(());
        }
        users.sort_unstable();
        users.dedup();
        sqlx::query("select app.fold_credits($1)")
            .bind(&users)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Folds up to a batch of accounts with deferred credits (the cron:
    /// platform revenue, and recipients whose fold after the response was
    /// lost). Returns how many it folded.
    pub async fn fold_all(&self) -> Result<u32, ApiError> {
        let folded: i32 = sqlx::query_scalar("select app.fold_all_credits($1)")
            .bind(FOLD_BATCH)
            .fetch_one(&self.pool)
            .await?;
        Ok(u32::try_from(folded).unwrap_or(0))
    }

    /// Delivers due rows, up to `rounds` batches.
    pub async fn deliver_pending(&self, rounds: usize) -> Result<Delivery, ApiError> {
        let mut report = Delivery::default();
        for _ in 0..rounds {
            let claimed = self.claim().await?;
            let full = i64::try_from(claimed.len()).unwrap_or(i64::MAX) >= BATCH;
            if claimed.is_empty() {
                break;
            }
            let mut outcomes = Vec::with_capacity(claimed.len());
            // Kinds whose service did not answer (refused, timed out) in
            // this run: their other rows are not tried now, so a stalled
            // Ably or QStash costs one timeout per run, not one per row
            // (a batch of 50 × 5 s would outlive the function's 15 s).
            let mut unreachable: Vec<&str> = Vec::new();
            for row in &claimed {
                let outcome = if unreachable.contains(&row.kind.as_str()) {
                    Outcome::Failed(format!(
                        "not tried: the {} service did not answer earlier in this run",
                        row.kind
                    ))
                } else {
                    self.deliver(row).await
                };
                if let Outcome::Failed(e) = &outcome
                    && e.contains("did not answer")
                {
                    unreachable.push(row.kind.as_str());
                }
                outcomes.push((row, outcome));
            }
            self.record(&outcomes, &mut report).await?;
            // Inline jobs may have recorded new messages: go round again.
            let ran_jobs = claimed.iter().any(|r| r.kind == "job");
            if !full && !ran_jobs {
                break;
            }
        }
        Ok(report)
    }

    async fn claim(&self) -> Result<Vec<Pending>, ApiError> {
        let inline = matches!(self.jobs, JobTransport::Inline);
        let query = sqlx::query_as::<_, Pending>(
            "select id, kind, destination, name, payload, dedup_key, not_before, attempts \
               from app.claim_outbox($1, $2)",
        )
        .bind(i32::try_from(BATCH).unwrap_or(50))
        .bind(inline);
        let mut rows = query.fetch_all(&self.pool).await?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn deliver(&self, row: &Pending) -> Outcome {
        match row.kind.as_str() {
            "realtime" => self.publish(row).await,
            "job" => self.dispatch(row).await,
            other => Outcome::Failed(format!("unknown outbox kind {other}")),
        }
    }

    async fn publish(&self, row: &Pending) -> Outcome {
        let Some(ably) = &self.ably else {
            return Outcome::Skipped("not sent: Ably is not configured");
        };
        // `seq` orders messages of one channel even if two deliverers
        // overlap: clients ignore a lower one than they have seen.
        let mut data = row.payload.clone();
        if let Some(object) = data.as_object_mut() {
            object.insert("seq".to_owned(), row.id.into());
        }
        let message = Message {
            id: row.dedup_key.clone(),
            // Every realtime row has a name (`app.emit`); only jobs have none.
            name: row.name.clone().unwrap_or_default(),
            data,
        };
        match ably.publish(&row.destination, &message).await {
            Ok(()) => Outcome::Delivered,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    async fn dispatch(&self, row: &Pending) -> Outcome {
        let Some(path) = crate::jobs::path_of(&row.destination) else {
            return Outcome::Failed(format!("unknown job {}", row.destination));
        };
        match &self.jobs {
            JobTransport::Qstash {
                client,
                public_base,
            } => {
                let Ok(destination) = public_base.join(path) else {
                    return Outcome::Failed("PUBLIC_BASE_URL cannot be joined".to_owned());
                };
                let message = Publish {
                    destination,
                    body: row.payload.clone(),
                    deduplication_id: qstash_id(&row.dedup_key),
                    not_before: row.not_before.map(|t| t.timestamp()),
                    retries: DEFAULT_RETRIES,
                };
                match client.publish(&message).await {
                    Ok(_) => Outcome::Delivered,
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
            JobTransport::Inline => {
                let payouts = self
                    .connect
                    .clone()
                    .map(|connect| crate::payouts::RunState {
                        pool: self.pool.clone(),
                        connect,
                        outbox: self.clone(),
                    });
                match crate::jobs::run(&self.pool, payouts.as_ref(), &row.destination, &row.payload)
                    .await
                {
                    Ok(outcome) => {
                        tracing::info!(job = %row.destination, outcome, "job ran inline");
                        Outcome::Delivered
                    }
                    Err(e) => Outcome::Failed(e.to_string()),
                }
            }
        }
    }

    async fn record(
        &self,
        outcomes: &[(&Pending, Outcome)],
        report: &mut Delivery,
    ) -> Result<(), ApiError> {
        let mut ids = Vec::with_capacity(outcomes.len());
        let mut done = Vec::with_capacity(outcomes.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(outcomes.len());
        for (row, outcome) in outcomes {
            ids.push(row.id);
            match outcome {
                Outcome::Delivered => {
                    report.delivered += 1;
                    done.push(true);
                    errors.push(None);
                }
                Outcome::Skipped(why) => {
                    report.skipped += 1;
                    done.push(true);
                    errors.push(Some((*why).to_owned()));
                }
                Outcome::Failed(e) => {
                    report.failed += 1;
                    done.push(false);
                    errors.push(Some(e.clone()));
                    if row.attempts >= MAX_ATTEMPTS {
                        tracing::error!(outbox_id = row.id, key = %row.dedup_key, error = %e,
                            "outbox message given up after {MAX_ATTEMPTS} attempts");
                    } else {
                        tracing::warn!(outbox_id = row.id, key = %row.dedup_key, error = %e,
                            attempt = row.attempts, "outbox delivery failed; will retry");
                    }
                }
            }
        }
        let query = sqlx::query("select app.record_outbox($1, $2, $3, $4)")
            .bind(&ids)
            .bind(&done)
            .bind(&errors)
            .bind(MAX_ATTEMPTS);
        query.execute(&self.pool).await?;
        Ok(())
    }
}

/// QStash deduplication ids: our key with `:` as `.` (letters, digits,
/// `-`, `_`, `.` only).
fn qstash_id(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '.'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn qstash_ids_keep_only_safe_characters() {
        assert_eq!(
            super::qstash_id("class-reminder:0190-ab:1800000000"),
            "class-reminder.0190-ab.1800000000"
        );
    }
}
