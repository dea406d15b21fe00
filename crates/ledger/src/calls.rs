//! Paid 1:1 calls as the ledger sees them (issue 11, ADR 0018): a fan's
//! hold moves into the call's escrow on accept, each started minute moves
//! from escrow to the creator, the unused rest goes back to the fan when
//! the call ends. The rules (price snapshot, hold, per-minute charges by
//! index, top-ups, heartbeat timeout, out-of-funds end) are SQL in
//! `migrations/*_calls.sql`; this module is their typed door. Every
//! function takes the caller's transaction; the user functions read the
//! caller from its verified claims (`auth.uid()`), never from a parameter.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{CallId, LedgerError, UserId};

/// The lowest and highest price per minute a creator may set, in tokens
/// (`call_settings_price_range`; a test checks they agree).
pub const MIN_PRICE_PER_MINUTE: i64 = 1;
pub const MAX_PRICE_PER_MINUTE: i64 = 10_000;

crate::text_enum! {
    /// `app.calls.status` (check `calls_status_check`).
    pub enum CallStatus {
        /// Asked for; the creator has 2 minutes to answer.
        Ringing = "ringing",
        /// Accepted: the first minutes are held; both parties may join.
        Accepted = "accepted",
        /// Both joined: minutes are being charged.
        Active = "active",
        /// Over and settled (charged minutes paid, the rest refunded).
        Ended = "ended",
        /// The creator said no.
        Declined = "declined",
        /// The fan withdrew the request before an answer.
        Cancelled = "cancelled",
        /// Nobody answered within 2 minutes.
        Expired = "expired",
    }
}

crate::text_enum! {
    /// `app.calls.media` (check `calls_media_check`).
    pub enum CallMedia {
        Audio = "audio",
        Video = "video",
    }
}

crate::text_enum! {
    /// `app.calls.end_reason` (check `calls_end_reason_check`).
    pub enum EndReason {
        /// A party hung up (`ended_by` says who).
        HungUp = "hung_up",
        /// No heartbeat from either party for the timeout (120 s): ended at
        /// the last sign of life.
        HeartbeatTimeout = "heartbeat_timeout",
        /// The fan could not fund the next minute: ended when the funded
        /// time ran out.
        FundsExhausted = "funds_exhausted",
        /// Accepted, but both parties did not join in time.
        NotJoined = "not_joined",
        /// Agora reported a party left the channel and did not come back.
        LeftChannel = "left_channel",
    }
}

/// A creator's call settings (`app.call_settings`): public to signed-in
/// users.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct CallSettings {
    pub creator_id: Uuid,
    /// Tokens per started minute (1–10,000).
    pub price_per_minute: i64,
    pub audio_enabled: bool,
    pub video_enabled: bool,
    pub updated_at: DateTime<Utc>,
}

/// A call as the API returns it (`app.call_view`), to either party.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Call {
    pub id: Uuid,
    pub fan_id: Uuid,
    pub creator_id: Uuid,
    pub media: CallMedia,
    /// The creator's price when the fan asked; every minute costs this.
    pub price_per_minute: i64,
    pub status: CallStatus,
    /// The Agora channel of this call.
    pub channel: String,
    pub requested_at: DateTime<Utc>,
    /// Until when the creator may answer.
    pub ring_until: DateTime<Utc>,
    pub accepted_at: Option<DateTime<Utc>>,
    /// Until when both parties must have joined.
    pub join_until: Option<DateTime<Utc>>,
    /// When both had joined: minute 1 started.
    pub started_at: Option<DateTime<Utc>>,
    pub fan_joined_at: Option<DateTime<Utc>>,
    pub creator_joined_at: Option<DateTime<Utc>>,
    /// The later of the two parties' last heartbeat or join.
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Minutes the fan has paid into the call (held or charged).
    pub funded_minutes: i32,
    /// Minutes charged to the creator's benefit.
    pub billed_minutes: i32,
    pub charged_tokens: i64,
    /// Tokens held in escrow for minutes not started yet.
    pub held_tokens: i64,
    /// Until when the call is paid for (accepted or active calls); the
    /// Agora token's join privilege follows it.
    pub funded_until: Option<DateTime<Utc>>,
    /// The fan could not fund another minute: the call ends at
    /// `funded_until`.
    pub ending_for_funds: bool,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<EndReason>,
    /// The party who hung up.
    pub ended_by: Option<Uuid>,
    /// Escrow returned to the fan when the call ended.
    pub refunded_tokens: Option<i64>,
    /// Bumped on every change of state; `call.updated` carries it.
    pub sequence: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a party needs for an Agora token: the channel, their uid, and the
/// funded time, all read from the database's clock in one transaction.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JoinGrant {
    /// The call's status after the look (an end it found is committed).
    pub status: CallStatus,
    pub channel: String,
    pub uid: i64,
    pub funded_until: Option<DateTime<Utc>>,
    pub issued_at: DateTime<Utc>,
    pub grace_seconds: i32,
}

/// Every reason a call operation is refused (SQLSTATEs SP070–SP079, and
/// [`outcome`] for an end the operation found and committed), plus
/// the ledger's refusals of the hold (funds, debt, daily limit).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("only creators take calls")]
    NotCreator,
    #[error("the price per minute must be between 1 and 10000 tokens")]
    PriceOutOfRange,
    #[error("this creator does not take calls of this kind")]
    NotTakingCalls,
    #[error("you already have an open call")]
    AlreadyOpen,
    #[error("you cannot call yourself")]
    OwnCall,
    #[error("call not found")]
    NotFound,
    #[error("{0}")]
    WrongState(String),
    #[error("the call rang out before it was answered")]
    RangOut,
    #[error("the creator is already in a call")]
    CreatorBusy,
    #[error("{0}")]
    WrongParty(String),
    #[error(transparent)]
    Ledger(LedgerError),
}

impl From<sqlx::Error> for CallError {
    fn from(e: sqlx::Error) -> Self {
        use crate::sqlstate::{self, Refusal};
        let Some(raised) = sqlstate::raised(&e) else {
            // Two requests of one fan at once: the second meets the unique
            // index of open calls.
            if sqlstate::postgres(&e).is_some_and(|pg| pg.constraint() == Some("calls_fan_open")) {
                return CallError::AlreadyOpen;
            }
            if sqlstate::postgres(&e)
                .is_some_and(|pg| pg.constraint() == Some("calls_creator_live"))
            {
                return CallError::CreatorBusy;
            }
            return CallError::Ledger(LedgerError::from(e));
        };
        match raised.refusal {
            Refusal::CallsCreatorRequired => CallError::NotCreator,
            Refusal::CallPriceOutOfRange => CallError::PriceOutOfRange,
            Refusal::CreatorNotTakingCalls => CallError::NotTakingCalls,
            Refusal::CallAlreadyOpen => CallError::AlreadyOpen,
            Refusal::OwnCall => CallError::OwnCall,
            Refusal::CallNotFound => CallError::NotFound,
            Refusal::CallWrongState => CallError::WrongState(raised.message.to_owned()),
            Refusal::CreatorInCall => CallError::CreatorBusy,
            Refusal::WrongCallParty => CallError::WrongParty(raised.message.to_owned()),
            _ => CallError::Ledger(LedgerError::from(e)),
        }
    }
}

impl CallError {
    /// Postgres chose this transaction as a deadlock victim: the caller may
    /// retry it whole.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, CallError::Ledger(LedgerError::Db(e)) if crate::sqlstate::is_deadlock(e))
    }
}

/// The caller (a creator) sets their price and what they take.
pub async fn set_settings(
    conn: &mut PgConnection,
    price_per_minute: i64,
    audio: bool,
    video: bool,
) -> Result<CallSettings, CallError> {
    Ok(sqlx::query_as::<_, CallSettings>(
        "select creator_id, price_per_minute, audio_enabled, video_enabled, updated_at \
           from app.set_call_settings($1, $2, $3)",
    )
    .bind(price_per_minute)
    .bind(audio)
    .bind(video)
    .fetch_one(conn)
    .await?)
}

/// A creator's settings, if they have set any.
pub async fn settings_of(
    conn: &mut PgConnection,
    creator: UserId,
) -> Result<Option<CallSettings>, CallError> {
    Ok(sqlx::query_as::<_, CallSettings>(
        "select s.creator_id, s.price_per_minute, s.audio_enabled, s.video_enabled, s.updated_at \
           from app.call_settings s join app.users u on u.id = s.creator_id \
          where s.creator_id = $1 and u.role = 'creator'",
    )
    .bind(creator)
    .fetch_optional(conn)
    .await?)
}

/// The caller asks `creator` for a call at the creator's current price.
pub async fn request(
    conn: &mut PgConnection,
    id: CallId,
    creator: UserId,
    media: CallMedia,
) -> Result<Call, CallError> {
    Ok(
        sqlx::query_as::<_, Call>("select * from app.request_call($1, $2, $3)")
            .bind(id)
            .bind(creator)
            .bind(media.as_str())
            .fetch_one(conn)
            .await?,
    )
}

/// What a party does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The creator accepts (holds the first minutes from the fan).
    Accept,
    /// The creator declines.
    Decline,
    /// The fan withdraws a ringing request.
    Cancel,
    /// A party joined the channel.
    Join,
    /// A party is still there (every 15–20 s).
    Heartbeat,
    /// A party hangs up: settled now.
    HangUp,
}

/// Whether the call after `action` is what the action asked for. An action
/// that found the call over (rung out, timed out, out of funds) records
/// that end and returns the call rather than raising, so the end commits;
/// this turns it into the refusal the caller answers with, after the
/// commit.
pub fn outcome(action: Action, call: &Call) -> Result<(), CallError> {
    let live = matches!(call.status, CallStatus::Accepted | CallStatus::Active);
    let ok = match action {
        Action::Accept => live,
        Action::Decline => call.status == CallStatus::Declined,
        Action::Cancel => call.status == CallStatus::Cancelled,
        Action::Join | Action::Heartbeat => live,
        Action::HangUp => call.status == CallStatus::Ended,
    };
    if ok {
        Ok(())
    } else if call.status == CallStatus::Expired {
        Err(CallError::RangOut)
    } else {
        Err(CallError::WrongState(format!(
            "the call is {}",
            call.status
        )))
    }
}

/// Applies `action` to `call` as the caller; returns the call after it
/// (check it with [`outcome`] once the transaction is committed).
pub async fn act(conn: &mut PgConnection, call: CallId, action: Action) -> Result<Call, CallError> {
    let sql = match action {
        Action::Accept => "select * from app.answer_call($1, true)",
        Action::Decline => "select * from app.answer_call($1, false)",
        Action::Cancel => "select * from app.cancel_call($1)",
        Action::Join => "select * from app.call_presence($1, true)",
        Action::Heartbeat => "select * from app.call_presence($1, false)",
        Action::HangUp => "select * from app.hang_up_call($1)",
    };
    Ok(sqlx::query_as::<_, Call>(sql)
        .bind(call)
        .fetch_one(conn)
        .await?)
}

/// The caller's grant to join `call`'s channel (accepted or active calls,
/// parties only).
pub async fn join_grant(conn: &mut PgConnection, call: CallId) -> Result<JoinGrant, CallError> {
    Ok(
        sqlx::query_as::<_, JoinGrant>("select * from app.call_join_grant($1)")
            .bind(call)
            .fetch_one(conn)
            .await?,
    )
}

/// One call the caller is a party to.
pub async fn get(conn: &mut PgConnection, call: CallId) -> Result<Call, CallError> {
    sqlx::query_as::<_, Call>("select * from app.call_view where id = $1")
        .bind(call)
        .fetch_optional(conn)
        .await?
        .ok_or(CallError::NotFound)
}

/// The caller's calls (as fan or creator), newest first, before `before`.
pub async fn mine(
    conn: &mut PgConnection,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Call>, CallError> {
    Ok(sqlx::query_as::<_, Call>(
        "select * from app.call_view \
          where (fan_id = auth.uid() or creator_id = auth.uid()) \
            and ($1::timestamptz is null or created_at < $1) \
          order by created_at desc, id desc limit $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Sweep {
    /// Calls that had something due and were advanced.
    pub swept_calls: i32,
    /// Minutes charged (escrow → creator).
    pub charged_minutes: i32,
}

/// Service path (the per-minute sweep; `only` for one call's tick): bills
/// every due minute, tops escrows up, ends silent, unfunded, unjoined and
/// unanswered calls. Rows another transaction holds are skipped.
pub async fn sweep(
    conn: &mut PgConnection,
    limit: i32,
    only: Option<CallId>,
) -> Result<Sweep, CallError> {
    Ok(
        sqlx::query_as::<_, Sweep>("select * from app.sweep_calls($1, $2)")
            .bind(limit)
            .bind(only)
            .fetch_one(conn)
            .await?,
    )
}

/// What an Agora notice did (`app.apply_agora_notice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// Applied (or recorded as irrelevant): `joined`, `left`, `quit`,
    /// `stale`, `ignored`.
    Applied(String),
    /// This noticeId was applied before; nothing changed.
    Duplicate,
}

/// One Agora channel event, as the notification webhook read it.
#[derive(Debug, Clone)]
pub struct ChannelEvent<'a> {
    pub notice_id: &'a str,
    pub product_id: i64,
    pub event_type: i64,
    pub channel: Option<&'a str>,
    pub uid: Option<i64>,
    pub client_seq: Option<i64>,
    pub reason: Option<i64>,
}

/// Service path: applies one Agora notice exactly once (by noticeId).
pub async fn apply_notice(
    conn: &mut PgConnection,
    event: &ChannelEvent<'_>,
) -> Result<NoticeOutcome, CallError> {
    let small = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
    let result: Result<String, sqlx::Error> =
        sqlx::query_scalar("select app.apply_agora_notice($1, $2, $3, $4, $5, $6, $7)")
            .bind(event.notice_id)
            .bind(small(event.product_id))
            .bind(small(event.event_type))
            .bind(event.channel)
            .bind(event.uid)
            .bind(event.client_seq)
            .bind(event.reason.map(small))
            .fetch_one(conn)
            .await;
    match result {
        Ok(outcome) => Ok(NoticeOutcome::Applied(outcome)),
        Err(e)
            if crate::sqlstate::raised(&e).map(|r| r.refusal)
                == Some(crate::sqlstate::Refusal::DuplicateNotice) =>
        {
            Ok(NoticeOutcome::Duplicate)
        }
        Err(e) => Err(e.into()),
    }
}
