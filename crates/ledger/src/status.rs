//! Status columns as Rust enums (issue 10). Each `status` column is `text`
//! with a check constraint listing its values; [`text_enum!`] declares the
//! Rust side once: the variants and their SQL/JSON spelling, read from and
//! written to the `text` column, serialised as that same string (so the wire
//! is what the plain `String` was), and documented in OpenAPI as a string
//! enum. `crates/routes/tests/sql_rules.rs` proves each enum's values equal
//! its check constraint's, in order.

/// Declares a status enum stored in a `text` column. Each `$text` must be the
/// variant's name in snake_case (serde and OpenAPI spell it so; the
/// round-trip test checks the ledger's, `sql_rules.rs` the SQL). The crate
/// using it needs `serde`, `sqlx` and `utoipa` as dependencies.
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash,
            ::serde::Serialize, ::serde::Deserialize, ::utoipa::ToSchema,
        )]
        // `rename_all` rather than a `rename` per variant: utoipa does not
        // see a `rename` whose value comes from a macro fragment. The test
        // below proves each snake_case name is the SQL text.
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in the order of the SQL check constraint.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as SQL and JSON spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::status::UnknownStatus;

            fn from_str(raw: &str) -> ::std::result::Result<Self, Self::Err> {
                match raw {
                    $( $text => Ok($name::$variant), )+
                    other => Err($crate::status::UnknownStatus {
                        column: stringify!($name),
                        value: other.to_owned(),
                    }),
                }
            }
        }

        impl ::sqlx::Type<::sqlx::Postgres> for $name {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $name {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> ::std::result::Result<Self, ::sqlx::error::BoxDynError> {
                let raw = <&str as ::sqlx::Decode<'r, ::sqlx::Postgres>>::decode(value)?;
                Ok(raw.parse::<$name>()?)
            }
        }

        impl ::sqlx::Encode<'_, ::sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> ::std::result::Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&str as ::sqlx::Encode<'_, ::sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}

/// A status column held a value its enum does not know (a check constraint
/// the Rust enum was not updated for).
#[derive(Debug, thiserror::Error)]
#[error("{column}: unknown value {value:?}")]
pub struct UnknownStatus {
    pub column: &'static str,
    pub value: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use crate::classes::{ClassStatus, EnrollmentStatus};
    use crate::purchases::PurchaseStatus;

    /// JSON spells each value exactly as SQL does, and parsing inverts it.
    fn round_trips<T>(all: &[T], as_str: fn(T) -> &'static str)
    where
        T: Copy + PartialEq + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
        T: std::str::FromStr,
        <T as std::str::FromStr>::Err: std::fmt::Debug,
    {
        assert!(!all.is_empty());
        for &value in all {
            let text = as_str(value);
            assert_eq!(
                serde_json::to_value(value).unwrap(),
                serde_json::json!(text)
            );
            assert_eq!(
                serde_json::from_value::<T>(serde_json::json!(text)).unwrap(),
                value
            );
            assert_eq!(text.parse::<T>().unwrap(), value);
        }
        assert!("no_such_status".parse::<T>().is_err());
        assert!(serde_json::from_value::<T>(serde_json::json!("no_such_status")).is_err());
    }

    #[test]
    fn statuses_serialise_as_their_sql_text() {
        round_trips(ClassStatus::ALL, ClassStatus::as_str);
        round_trips(EnrollmentStatus::ALL, EnrollmentStatus::as_str);
        round_trips(PurchaseStatus::ALL, PurchaseStatus::as_str);
    }
}
