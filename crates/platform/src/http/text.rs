//! Which characters user text may contain (issue 14, ADR 0013).
//!
//! Two rules, both answered with a 400 naming the field:
//!
//! - **Everywhere** (every string of every JSON body, every query parameter;
//!   checked once, centrally, by [`super::JsonBody`] and
//!   [`super::guard::request_rules`]): no character Postgres cannot store
//!   (NUL), no other control character (Cc) but tab, line feed and carriage
//!   return, no format character (Cf: bidi overrides and isolates U+202A–E,
//!   U+2066–9, zero-width spaces and marks U+200B–F, U+FEFF, tag characters,
//!   …) except U+200D ZERO WIDTH JOINER, which emoji sequences such as 👩‍💻
//!   are built with, no line or paragraph separator (U+2028/9) and no
//!   Unicode noncharacter. These are the characters that spoof what a
//!   reader sees (a name that renders reversed, two names that look alike)
//!   or that the database refuses (a 500 before this rule).
//! - **Single-line fields** (display names, class titles) also refuse tab,
//!   line feed and carriage return ([`check_single_line`]); multi-line fields
//!   (class descriptions, tip messages, reasons) keep them.

use serde_json::Value;

use super::problem::{ApiError, FieldError};

/// Format characters (General Category Cf, Unicode 15.1). Emoji presentation
/// selectors (U+FE0F) are Mn, not Cf, and stay allowed.
const FORMAT: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

const ZERO_WIDTH_JOINER: char = '\u{200D}';

fn is_format(c: char) -> bool {
    let c = u32::from(c);
    FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

fn is_noncharacter(c: char) -> bool {
    let c = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&c) || (c & 0xFFFE) == 0xFFFE
}

/// Whether `c` is refused in every text field.
pub fn is_forbidden(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        || (is_format(c) && c != ZERO_WIDTH_JOINER)
        || matches!(c, '\u{2028}' | '\u{2029}')
        || is_noncharacter(c)
}

/// The ranges [`is_forbidden`] refuses besides the controls, as inclusive
/// code-point pairs in ascending order: the format characters but the zero
/// width joiner, the line and paragraph separators, the noncharacters. The
/// OpenAPI document's character classes are built from this (one list; a
/// test there compares every scalar value with [`is_forbidden`]).
pub fn refused_ranges() -> Vec<(u32, u32)> {
    let joiner = u32::from(ZERO_WIDTH_JOINER);
    let mut ranges: Vec<(u32, u32)> = FORMAT
        .iter()
        .flat_map(|&(lo, hi)| {
            if (lo..=hi).contains(&joiner) {
                vec![(lo, joiner - 1), (joiner + 1, hi)]
            } else {
                vec![(lo, hi)]
            }
        })
        .filter(|(lo, hi)| lo <= hi)
        .chain([(0x2028, 0x2029), (0xFDD0, 0xFDEF)])
        .chain((0..=0x10).map(|plane| ((plane << 16) | 0xFFFE, (plane << 16) | 0xFFFF)))
        .collect();
    ranges.sort_unstable();
    // Adjacent or overlapping ranges become one (U+2028–9 meets U+202A–E).
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
}

fn describe(c: char) -> String {
    format!(
        "contains U+{:04X}, a control, format or invisible character that is not allowed",
        u32::from(c)
    )
}

/// The first character refused everywhere, as a field error.
pub fn check(field: &str, value: &str) -> Result<(), FieldError> {
    match value.chars().find(|&c| is_forbidden(c)) {
        None => Ok(()),
        Some(c) => Err(FieldError {
            field: field.to_owned(),
            message: describe(c),
        }),
    }
}

/// [`check`], and no tab or line break.
pub fn check_single_line(field: &str, value: &str) -> Result<(), FieldError> {
    check(field, value)?;
    match value.chars().find(|c| matches!(c, '\t' | '\n' | '\r')) {
        None => Ok(()),
        Some(c) => Err(FieldError {
            field: field.to_owned(),
            message: format!("contains U+{:04X}: must be a single line", u32::from(c)),
        }),
    }
}

/// Walks every string of a JSON document (object keys included) and refuses
/// the first one holding a forbidden character, naming its path the way the
/// typed parse names fields (`reason`, `items[2].title`).
pub fn check_json(value: &Value) -> Result<(), ApiError> {
    let mut path = String::new();
    walk(value, &mut path).map_err(|e| ApiError::Validation(vec![e]))
}

fn walk(value: &Value, path: &mut String) -> Result<(), FieldError> {
    match value {
        Value::String(s) => check(if path.is_empty() { "body" } else { path }, s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                // A key is named by its escaped form, so the problem document
                // never echoes the forbidden character itself.
                if key.chars().any(is_forbidden) {
                    path.push_str(&key.escape_default().to_string());
                    return Err(FieldError {
                        field: path.clone(),
                        message: "the field name contains a forbidden character".to_owned(),
                    });
                }
                path.push_str(key);
                walk(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refuses_what_postgres_cannot_store_and_what_spoofs() {
        for bad in [
            "a\0b",
            "evil\u{202E}gnp.exe",
            "zero\u{200B}width",
            "\u{200C}",
            "\u{200E}",
            "\u{200F}",
            "\u{2066}x\u{2069}",
            "bom\u{FEFF}",
            "\u{7F}",
            "\u{1B}[31m",
            "\u{85}",
            "line\u{2028}sep",
            "tag\u{E0041}",
            "\u{FFFF}",
            "soft\u{AD}hyphen",
        ] {
            assert!(check("f", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keeps_emoji_sequences_scripts_and_line_breaks() {
        for good in [
            "👩‍💻 coder",
            "👨‍👩‍👧",
            "❤️",
            "Zoë Ångström",
            "日本語のクラス",
            "مرحبا",
            "two\nlines\r\n\tindented",
        ] {
            assert!(check("f", good).is_ok(), "{good:?}");
        }
        assert!(check_single_line("f", "👩‍💻 Zoë").is_ok());
        assert!(check_single_line("f", "two\nlines").is_err());
        assert!(check_single_line("f", "tab\there").is_err());
    }

    #[test]
    fn the_walk_names_the_path() {
        let field = |v: Value| match check_json(&v) {
            Err(ApiError::Validation(e)) => e[0].field.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({"reason": "a\u{0}"})), "reason");
        assert_eq!(
            field(json!({"items": [{"t": "ok"}, {"t": "\u{202E}"}]})),
            "items[1].t"
        );
        assert_eq!(field(json!("\u{0}")), "body");
        assert_eq!(field(json!({"a\u{0}": 1})), "a\\u{0}");
        assert!(check_json(&json!({"a": ["x", 1, null, {"b": "👩‍💻"}]})).is_ok());
    }
}
