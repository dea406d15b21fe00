//! Classes as the ledger sees them: enrolment pays the price into the
//! class's escrow account, withdrawal and cancellation refund from it, and
//! settlement pays it to the creator. The rules (capacity, cut-off,
//! ownership, escrow = sum of active enrolments) are SQL in
//! `migrations/*_classes.sql`; this module is their typed door. Every
//! function takes the caller's transaction; the user functions read the
//! caller from its verified claims (`auth.uid()`), never from a parameter.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{ClassId, EnrollmentId, LedgerError, UserId};

crate::text_enum! {
    /// `app.classes.status` (check `classes_status_check`).
    pub enum ClassStatus {
        /// Open until it starts (enrolment closes at the start).
        Scheduled = "scheduled",
        /// Cancelled by its creator; every seat refunded.
        Cancelled = "cancelled",
        /// Ended and paid to its creator.
        Settled = "settled",
    }
}

crate::text_enum! {
    /// `app.enrollments.status` (check `enrollments_status_check`).
    pub enum EnrollmentStatus {
        /// Holds a seat.
        Enrolled = "enrolled",
        /// The fan withdrew (refunded before the cut-off).
        Withdrawn = "withdrawn",
        /// The class was cancelled; the price went back to the fan.
        Refunded = "refunded",
        /// The class settled; the price went to the creator.
        Settled = "settled",
    }
}

/// A class as the API returns it (`app.class_view`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Class {
    pub id: Uuid,
    pub creator_id: Uuid,
    pub title: String,
    pub description: String,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    /// IANA zone the creator scheduled in, for display.
    pub time_zone: String,
    pub duration_minutes: i32,
    pub capacity: i32,
    pub price_tokens: i64,
    pub status: ClassStatus,
    pub seats_taken: i32,
    /// Bumped on every change.
    pub sequence: i32,
    /// Until this instant an enrolled fan may withdraw with a full refund.
    pub withdraw_until: DateTime<Utc>,
    /// Whether the caller holds a seat.
    pub enrolled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The fields of a class a creator sets. For an update, `None` keeps the
/// current value.
#[derive(Debug, Clone, Default)]
pub struct ClassFields {
    pub title: Option<String>,
    pub description: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub time_zone: Option<String>,
    pub duration_minutes: Option<i32>,
    pub capacity: Option<i32>,
    pub price_tokens: Option<i64>,
}

/// Every reason a class operation is refused (SQLSTATEs SP030–SP043 of the
/// classes migrations), plus the ledger's own refusals of the payment.
#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error("class not found")]
    NotFound,
    #[error("only creators can create classes")]
    NotCreator,
    #[error("only the class's creator can do this")]
    NotOwner,
    #[error("you cannot enrol in your own class")]
    OwnClass,
    #[error("the class is not open (cancelled, settled or already started)")]
    NotOpen,
    #[error("you are already enrolled in this class")]
    AlreadyEnrolled,
    #[error("the class is full")]
    Full,
    #[error("the withdrawal cut-off has passed")]
    CutoffPassed,
    #[error("you are not enrolled in this class")]
    NotEnrolled,
    #[error("unknown time zone")]
    UnknownTimeZone,
    #[error("the class must start in the future")]
    StartsInPast,
    #[error("the price cannot change once fans have enrolled")]
    PriceLocked,
    #[error("a class with paid enrolments cannot be moved to start less than 24 hours from now")]
    RescheduleTooSoon,
    #[error("capacity cannot be below the {seats_taken} seats taken")]
    CapacityBelowSeats { seats_taken: i64 },
    #[error(transparent)]
    Ledger(LedgerError),
}

impl From<sqlx::Error> for ClassError {
    fn from(e: sqlx::Error) -> Self {
        use crate::sqlstate::{self, Refusal};
        let Some(raised) = sqlstate::raised(&e) else {
            return ClassError::Ledger(LedgerError::from(e));
        };
        match raised.refusal {
            Refusal::ClassFull => ClassError::Full,
            Refusal::ClassNotOpen => ClassError::NotOpen,
            Refusal::AlreadyEnrolled => ClassError::AlreadyEnrolled,
            Refusal::NotCreator => ClassError::NotCreator,
            Refusal::CutoffPassed => ClassError::CutoffPassed,
            Refusal::NotClassOwner => ClassError::NotOwner,
            Refusal::OwnClass => ClassError::OwnClass,
            Refusal::NotEnrolled => ClassError::NotEnrolled,
            Refusal::UnknownTimeZone => ClassError::UnknownTimeZone,
            Refusal::StartsInPast => ClassError::StartsInPast,
            Refusal::PriceLocked => ClassError::PriceLocked,
            Refusal::ClassNotFound => ClassError::NotFound,
            Refusal::RescheduleTooSoon => ClassError::RescheduleTooSoon,
            Refusal::CapacityBelowSeats => match raised.detail.trim().parse() {
                Ok(seats_taken) => ClassError::CapacityBelowSeats { seats_taken },
                // The migration always sends the seats taken.
                Err(_) => ClassError::Ledger(LedgerError::Db(e)),
            },
            _ => ClassError::Ledger(LedgerError::from(e)),
        }
    }
}

impl ClassError {
    /// Postgres chose this transaction as a deadlock victim: the caller may
    /// retry it whole.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, ClassError::Ledger(LedgerError::Db(e)) if crate::sqlstate::is_deadlock(e))
    }
}

/// Creates a class owned by the caller (a creator), with its escrow account
/// and the creator's calendar copy.
pub async fn create(
    conn: &mut PgConnection,
    id: ClassId,
    fields: &ClassFields,
) -> Result<Class, ClassError> {
    write(
        "select * from app.create_class($1, $2, $3, $4, $5, $6, $7, $8)",
        conn,
        id,
        fields,
    )
    .await
}

/// Edits the caller's scheduled class; every calendar copy follows.
pub async fn update(
    conn: &mut PgConnection,
    id: ClassId,
    fields: &ClassFields,
) -> Result<Class, ClassError> {
    write(
        "select * from app.update_class($1, $2, $3, $4, $5, $6, $7, $8)",
        conn,
        id,
        fields,
    )
    .await
}

async fn write(
    sql: &'static str,
    conn: &mut PgConnection,
    id: ClassId,
    f: &ClassFields,
) -> Result<Class, ClassError> {
    sqlx::query_as::<_, Class>(sql)
        .bind(id)
        .bind(f.title.as_deref())
        .bind(f.description.as_deref())
        .bind(f.starts_at)
        .bind(f.time_zone.as_deref())
        .bind(f.duration_minutes)
        .bind(f.capacity)
        .bind(f.price_tokens)
        .fetch_optional(conn)
        .await?
        .ok_or(ClassError::NotFound)
}

/// One class the caller may see (RLS: scheduled, or their own, or one they
/// enrolled in), in one statement as the caller (`app.read_class`; `claims`
/// as `request.jwt.claims` holds them; ADR 0020). Run it on the pool.
pub async fn read_class<'e>(
    db: impl sqlx::PgExecutor<'e>,
    claims: &str,
    id: ClassId,
) -> Result<Class, ClassError> {
    sqlx::query_as::<_, Class>("select * from app.read_class($1, $2)")
        .bind(claims)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or(ClassError::NotFound)
}

/// Position in the upcoming list: classes after (`starts_at`, `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCursor {
    pub starts_at: DateTime<Utc>,
    pub id: Uuid,
}

/// Scheduled classes that have not started, soonest first, optionally of one
/// creator, after `cursor`, in one statement as the caller
/// (`app.read_upcoming_classes`; ADR 0020). Run it on the pool.
pub async fn read_upcoming<'e>(
    db: impl sqlx::PgExecutor<'e>,
    claims: &str,
    creator: Option<UserId>,
    after: Option<ClassCursor>,
    limit: i64,
) -> Result<Vec<Class>, ClassError> {
    Ok(
        sqlx::query_as::<_, Class>("select * from app.read_upcoming_classes($1, $2, $3, $4, $5)")
            .bind(claims)
            .bind(creator)
            .bind(after.map(|c| c.starts_at))
            .bind(after.map(|c| c.id))
            .bind(limit)
            .fetch_all(db)
            .await?,
    )
}

/// The outcome of an enrolment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Enrollment {
    pub enrollment_id: Uuid,
    pub class_id: Uuid,
    /// The payment into escrow; absent for a free class.
    pub journal_id: Option<Uuid>,
    pub price_tokens: i64,
    /// The fan's wallet balance after paying.
    pub balance: i64,
}

/// The caller enrols in `class`, paying its price into escrow. Capacity,
/// funds, debt and the daily limit are checked under the class's and the
/// caller's row locks.
pub async fn enroll(
    conn: &mut PgConnection,
    class: ClassId,
    enrollment: EnrollmentId,
) -> Result<Enrollment, ClassError> {
    let (enrollment_id, journal_id, price_tokens, balance): (Uuid, Option<Uuid>, i64, i64) =
        sqlx::query_as(
            "select enrollment_id, journal_id, price_tokens, balance from app.enroll($1, $2)",
        )
        .bind(class)
        .bind(enrollment)
        .fetch_one(conn)
        .await?;
    Ok(Enrollment {
        enrollment_id,
        class_id: class.get(),
        journal_id,
        price_tokens,
        balance,
    })
}

/// The outcome of a withdrawal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Withdrawal {
    pub enrollment_id: Uuid,
    /// The refund from escrow; absent for a free class.
    pub journal_id: Option<Uuid>,
    pub refunded_tokens: i64,
}

/// The caller leaves `class` with a full refund, before the cut-off.
pub async fn withdraw(conn: &mut PgConnection, class: ClassId) -> Result<Withdrawal, ClassError> {
    Ok(
        sqlx::query_as::<_, Withdrawal>("select * from app.withdraw($1)")
            .bind(class)
            .fetch_one(conn)
            .await?,
    )
}

/// The outcome of a cancellation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Cancellation {
    /// Fans refunded from escrow (each by its own journal).
    pub refunded_enrollments: i32,
    pub refunded_tokens: i64,
}

/// The caller cancels their scheduled class: every fan refunded, every
/// calendar copy cancelled.
pub async fn cancel(conn: &mut PgConnection, class: ClassId) -> Result<Cancellation, ClassError> {
    Ok(
        sqlx::query_as::<_, Cancellation>("select * from app.cancel_class($1)")
            .bind(class)
            .fetch_one(conn)
            .await?,
    )
}

/// What one settlement run did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Settlement {
    pub settled_classes: i32,
    pub settled_tokens: i64,
}

/// Service path: pays the escrow of up to `limit` ended classes to their
/// creators (less the platform fee). A settled class is never settled again.
pub async fn settle_ended(conn: &mut PgConnection, limit: i32) -> Result<Settlement, ClassError> {
    Ok(
        sqlx::query_as::<_, Settlement>("select * from app.settle_ended_classes($1)")
            .bind(limit)
            .fetch_one(conn)
            .await?,
    )
}
