//! The token packages (SPEC §2): the only purchasable sizes.

use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
pub struct Package {
    pub id: &'static str,
    pub tokens: i64,
    /// USD cents.
    pub price_cents: i64,
    pub bonus_tokens: i64,
    /// `tokens + bonus_tokens`: what the purchase credits.
    pub credited_tokens: i64,
}

const fn package(id: &'static str, tokens: i64, price_cents: i64, bonus_tokens: i64) -> Package {
    Package {
        id,
        tokens,
        price_cents,
        bonus_tokens,
        credited_tokens: tokens + bonus_tokens,
    }
}

pub const PACKAGES: [Package; 7] = [
    package("starter", 50, 500, 0),
    package("small", 200, 1_900, 0),
    package("medium", 433, 3_900, 0),
    package("large", 812, 6_900, 0),
    package("xl", 1_488, 11_900, 0),
    package("xxl", 4_986, 34_900, 0),
    package("mega", 8_446, 54_900, 422),
];

/// Card payments Stripe may take: 50 ¢ to $10,000.
pub const MIN_CHARGE_CENTS: i64 = 50;
pub const MAX_CHARGE_CENTS: i64 = 1_000_000;

pub fn find(id: &str) -> Option<&'static Package> {
    PACKAGES.iter().find(|p| p.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_match_the_spec_and_the_card_limits() {
        assert_eq!(find("mega").map(|p| p.credited_tokens), Some(8_868));
        assert_eq!(find("starter").map(|p| p.price_cents), Some(500));
        assert!(find("free").is_none());
        for p in PACKAGES {
            assert!((MIN_CHARGE_CENTS..=MAX_CHARGE_CENTS).contains(&p.price_cents));
            // A bonus is at most 5 % (the only one is mega's).
            assert!(p.bonus_tokens * 20 <= p.tokens);
        }
    }
}
