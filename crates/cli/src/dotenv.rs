//! Reads dotenv-style files for `check-env --env-file`: `KEY=VALUE` lines,
//! optional `export ` prefix, `#` comment lines, blank lines, values
//! optionally in matching single or double quotes. Deliberately small: no
//! interpolation, no multi-line values. Errors name the line, never the value
//! (it may be a secret).

use std::fmt;

#[derive(Debug, PartialEq, Eq)]
pub struct DotenvError {
    pub line: usize,
    pub problem: &'static str,
}

impl fmt::Display for DotenvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for DotenvError {}

/// Parses the file's text into pairs, in order (a later key overrides an
/// earlier one when collected into a map).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, DotenvError> {
    let mut pairs = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |problem| DotenvError {
            line: index + 1,
            problem,
        };
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, value) = line.split_once('=').ok_or(err("expected KEY=VALUE"))?;
        let key = key.trim();
        if !is_valid_key(key) {
            return Err(err(
                "the name must be letters, digits and _ (not starting with a digit)",
            ));
        }
        let value = unquote(value.trim()).ok_or(err("unterminated quoted value"))?;
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

fn is_valid_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Strips matching quotes. An unquoted value ends at ` #` (an inline
/// comment); inside quotes `#` is literal. `None` for an opening quote
/// without its closing one.
fn unquote(value: &str) -> Option<String> {
    for quote in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(quote) {
            let end = rest.find(quote)?;
            return Some(rest[..end].to_owned());
        }
    }
    let value = match value.find(" #") {
        Some(i) => value[..i].trim_end(),
        None => value,
    };
    Some(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pairs_comments_quotes_and_export() {
        let text = "\
# a comment
APP_ENV=production

export SUPABASE_URL = https://abcd.supabase.co
DATABASE_URL=\"postgres://u:p#w@db/x\"
HOOK='v1,whsec_abc='
EMPTY=
PLAIN=value # trailing comment
";
        let pairs = parse(text).expect("parses");
        let expected = [
            ("APP_ENV", "production"),
            ("SUPABASE_URL", "https://abcd.supabase.co"),
            ("DATABASE_URL", "postgres://u:p#w@db/x"),
            ("HOOK", "v1,whsec_abc="),
            ("EMPTY", ""),
            ("PLAIN", "value"),
        ];
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn errors_name_the_line_and_never_the_value() {
        let e = parse("A=1\nthis-is-a-secret-without-equals\n").expect_err("fails");
        assert_eq!(e.line, 2);
        assert!(!e.to_string().contains("secret"));
        assert_eq!(parse("1X=2").expect_err("fails").line, 1);
        assert_eq!(parse("X=\"open").expect_err("fails").line, 1);
    }
}
