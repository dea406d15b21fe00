//! The SQLSTATEs our SQL functions raise (`raise … using errcode = 'SPnnn'`
//! in `migrations/*.sql`: the money functions, and the feature flags' admin
//! functions): one table, read by every Rust matcher
//! ([`LedgerError`](crate::LedgerError), [`ClassError`](crate::classes::ClassError),
//! [`PurchaseError`](crate::purchases::PurchaseError)). A test checks that
//! the table and the migrations name the same codes.

use sqlx::postgres::PgDatabaseError;

/// Why a money function refused, by its SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// SP000: a ledger invariant would break (a bug, never the caller's fault).
    Invariant,
    InsufficientFunds,
    AlreadyApplied,
    InDebt,
    DailyLimitExceeded,
    TipAmountOutOfRange,
    SelfTip,
    RecipientNotCreator,
    UnknownPackage,
    PurchaseKeyConflict,
    PurchaseAmountMismatch,
    ClassFull,
    ClassNotOpen,
    AlreadyEnrolled,
    NotCreator,
    CutoffPassed,
    NotClassOwner,
    OwnClass,
    NotEnrolled,
    UnknownTimeZone,
    StartsInPast,
    PriceLocked,
    ClassNotFound,
    CapacityBelowSeats,
    RescheduleTooSoon,
    GrantAmountOutOfRange,
    InvalidGrantReason,
    SelfGrant,
    AdminRequired,
    UnknownUser,
    /// Feature flags (migration 18, ADR 0016): not an admin.
    FlagAdminRequired,
    InvalidFlagReason,
    FlagExists,
    UnknownFlag,
    InvalidFlagFields,
    /// Calls (migration 20, ADR 0018).
    CallsCreatorRequired,
    CallPriceOutOfRange,
    CreatorNotTakingCalls,
    CallAlreadyOpen,
    OwnCall,
    CallNotFound,
    CallWrongState,
    CreatorInCall,
    WrongCallParty,
    /// An Agora notice another delivery already applied.
    DuplicateNotice,
    /// Payouts (migration 21, ADR 0019).
    PayoutsCreatorRequired,
    BelowPayoutMinimum,
    PayoutNotFound,
    PayoutBusy,
    PayoutAdminRequired,
    UnknownCreator,
}

/// Every SQLSTATE of ours, with its meaning.
pub const TABLE: [(&str, Refusal); 51] = [
    ("SP000", Refusal::Invariant),
    ("SP001", Refusal::InsufficientFunds),
    ("SP002", Refusal::AlreadyApplied),
    ("SP003", Refusal::InDebt),
    ("SP004", Refusal::DailyLimitExceeded),
    ("SP010", Refusal::TipAmountOutOfRange),
    ("SP011", Refusal::SelfTip),
    ("SP012", Refusal::RecipientNotCreator),
    ("SP020", Refusal::UnknownPackage),
    ("SP021", Refusal::PurchaseKeyConflict),
    ("SP022", Refusal::PurchaseAmountMismatch),
    ("SP030", Refusal::ClassFull),
    ("SP031", Refusal::ClassNotOpen),
    ("SP032", Refusal::AlreadyEnrolled),
    ("SP033", Refusal::NotCreator),
    ("SP034", Refusal::CutoffPassed),
    ("SP035", Refusal::NotClassOwner),
    ("SP036", Refusal::OwnClass),
    ("SP037", Refusal::NotEnrolled),
    ("SP038", Refusal::UnknownTimeZone),
    ("SP039", Refusal::StartsInPast),
    ("SP040", Refusal::PriceLocked),
    ("SP041", Refusal::ClassNotFound),
    ("SP042", Refusal::CapacityBelowSeats),
    ("SP043", Refusal::RescheduleTooSoon),
    ("SP050", Refusal::GrantAmountOutOfRange),
    ("SP051", Refusal::InvalidGrantReason),
    ("SP052", Refusal::SelfGrant),
    ("SP053", Refusal::AdminRequired),
    ("SP054", Refusal::UnknownUser),
    ("SP060", Refusal::FlagAdminRequired),
    ("SP061", Refusal::InvalidFlagReason),
    ("SP062", Refusal::FlagExists),
    ("SP063", Refusal::UnknownFlag),
    ("SP064", Refusal::InvalidFlagFields),
    ("SP070", Refusal::CallsCreatorRequired),
    ("SP071", Refusal::CallPriceOutOfRange),
    ("SP072", Refusal::CreatorNotTakingCalls),
    ("SP073", Refusal::CallAlreadyOpen),
    ("SP074", Refusal::OwnCall),
    ("SP075", Refusal::CallNotFound),
    ("SP076", Refusal::CallWrongState),
    ("SP078", Refusal::CreatorInCall),
    ("SP079", Refusal::WrongCallParty),
    ("SP080", Refusal::DuplicateNotice),
    ("SP090", Refusal::PayoutsCreatorRequired),
    ("SP091", Refusal::BelowPayoutMinimum),
    ("SP092", Refusal::PayoutNotFound),
    ("SP093", Refusal::PayoutBusy),
    ("SP094", Refusal::PayoutAdminRequired),
    ("SP095", Refusal::UnknownCreator),
];

/// Postgres' own codes the ledger reads.
pub const DEADLOCK_DETECTED: &str = "40P01";
pub const CHECK_VIOLATION: &str = "23514";

impl Refusal {
    /// The refusal of SQLSTATE `code`, if it is one of ours.
    pub fn of_code(code: &str) -> Option<Refusal> {
        TABLE.iter().find(|(c, _)| *c == code).map(|(_, r)| *r)
    }

    /// The SQLSTATE this refusal is raised with.
    pub fn code(self) -> &'static str {
        TABLE
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("SP000", |(c, _)| c)
    }
}

/// A refusal raised by one of our functions, with the error's `DETAIL`.
#[derive(Debug, Clone, Copy)]
pub struct Raised<'a> {
    pub refusal: Refusal,
    /// `DETAIL` of the error (`""` when it has none): the numbers some
    /// refusals carry (balance, debt, seats taken, the daily limit as JSON).
    pub detail: &'a str,
    pub message: &'a str,
}

/// The Postgres error inside `e`, if it is one.
pub fn postgres(e: &sqlx::Error) -> Option<&PgDatabaseError> {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
}

/// The SQLSTATE of `e`, if it is a database error.
pub fn code(e: &sqlx::Error) -> Option<&str> {
    postgres(e).map(PgDatabaseError::code)
}

/// `e` as one of our refusals, if it is one.
pub fn raised(e: &sqlx::Error) -> Option<Raised<'_>> {
    let pg = postgres(e)?;
    Some(Raised {
        refusal: Refusal::of_code(pg.code())?,
        // No DETAIL: an empty one. Every refusal that carries a number
        // raises it with one; its parser treats the absence as malformed.
        detail: pg.detail().unwrap_or(""),
        message: pg.message(),
    })
}

/// Whether Postgres chose the transaction as a deadlock victim.
pub fn is_deadlock(e: &sqlx::Error) -> bool {
    code(e) == Some(DEADLOCK_DETECTED)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every `SPnnn` in the migrations, from the files themselves.
    fn raised_in_migrations() -> BTreeSet<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let mut codes = BTreeSet::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return codes;
        };
        for entry in entries.flatten() {
            let Ok(sql) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let bytes = sql.as_bytes();
            for (i, _) in sql.match_indices("'SP") {
                let code = bytes.get(i + 1..i + 6).unwrap_or_default();
                if code.len() == 5
                    && code[2..].iter().all(u8::is_ascii_digit)
                    && bytes.get(i + 6) == Some(&b'\'')
                {
                    codes.insert(String::from_utf8_lossy(code).into_owned());
                }
            }
        }
        codes
    }

    #[test]
    fn the_table_names_exactly_the_codes_the_migrations_raise() {
        let sql = raised_in_migrations();
        assert!(sql.len() >= 20, "migrations not found: {sql:?}");
        let table: BTreeSet<String> = TABLE.iter().map(|(c, _)| (*c).to_owned()).collect();
        assert_eq!(table, sql);
    }

    #[test]
    fn each_code_and_refusal_appears_once() {
        for (code, refusal) in TABLE {
            assert_eq!(Refusal::of_code(code), Some(refusal));
            assert_eq!(refusal.code(), code);
        }
        assert_eq!(Refusal::of_code("23505"), None);
    }
}
