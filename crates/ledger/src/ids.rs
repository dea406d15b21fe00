//! Ids of different things are different types: a function that takes a
//! class and an enrolment cannot be handed them swapped. Each wraps the
//! row's UUID; it is bound and decoded as a `uuid` and serialised as the
//! bare UUID string.
//!
//! ```compile_fail
//! # use stagepass_ledger::{ClassId, EnrollmentId};
//! # async fn swapped(conn: &mut sqlx::PgConnection, class: ClassId, enrollment: EnrollmentId) {
//! // Swapped arguments do not compile.
//! let _ = stagepass_ledger::classes::enroll(conn, enrollment, class).await;
//! # }
//! ```
//!
//! ```no_run
//! # use stagepass_ledger::{ClassId, EnrollmentId};
//! # async fn in_order(conn: &mut sqlx::PgConnection, class: ClassId, enrollment: EnrollmentId) {
//! let _ = stagepass_ledger::classes::enroll(conn, class, enrollment).await;
//! # }
//! ```
//!
//! ```compile_fail
//! # use stagepass_ledger::{TipId, UserId, TokenAmount};
//! # async fn swapped(conn: &mut sqlx::PgConnection, tip: TipId, recipient: UserId, amount: TokenAmount) {
//! let _ = stagepass_ledger::tip(conn, recipient, tip, amount, None).await;
//! # }
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
            sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub const fn new(id: Uuid) -> Self {
                $name(id)
            }

            pub const fn get(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                $name(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A user (`app.users.id`, the access token's `sub`).
    UserId
);
id!(
    /// A class (`app.classes.id`).
    ClassId
);
id!(
    /// A fan's enrolment in a class (`app.enrollments.id`).
    EnrollmentId
);
id!(
    /// A token purchase (`app.purchases.id`).
    PurchaseId
);
id!(
    /// A tip (the journal reference of `('tip', id)`).
    TipId
);
id!(
    /// A promotional grant (`app.token_grants.id`).
    GrantId
);
id!(
    /// A paid call (`app.calls.id`).
    CallId
);
