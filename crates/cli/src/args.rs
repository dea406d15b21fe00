//! A small argument parser: positionals, `--name value` / `--name=value`
//! options, `--switch` flags and `--` (everything after is positional).
//! Each command says which options it takes, so a typo is an error rather
//! than silently ignored.

use std::fmt;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub positional: Vec<String>,
    values: Vec<(&'static str, String)>,
    switches: Vec<&'static str>,
    /// `-h` or `--help` was given.
    pub help: bool,
}

impl Parsed {
    /// The last value given for option `name`.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn switch(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }

    /// Option `name` as an integer from 1 to `max`; `default` when absent.
    pub fn count(&self, name: &str, default: u64, max: u64) -> Result<u64, String> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(format!("{name} must be an integer from 1 to {max}")),
            },
        }
    }

    /// [`Parsed::count`] as a `usize`.
    pub fn count_usize(&self, name: &str, default: usize, max: usize) -> Result<usize, String> {
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.count(name, as_u64(default), as_u64(max))
            .map(|n| usize::try_from(n).unwrap_or(default))
    }

    /// `--bin-dir`, else the release binaries of `$CARGO_TARGET_DIR` (or
    /// `target`): where the benchmarks find the function binaries.
    pub fn release_bin_dir(&self) -> std::path::PathBuf {
        self.value("--bin-dir").map(Into::into).unwrap_or_else(|| {
            let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
            std::path::Path::new(&target).join("release")
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArgError {
    Unknown(String),
    MissingValue(&'static str),
    UnexpectedValue(&'static str),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Unknown(o) => write!(f, "unknown option '{o}' (see --help)"),
            ArgError::MissingValue(o) => write!(f, "option {o} needs a value"),
            ArgError::UnexpectedValue(o) => write!(f, "option {o} takes no value"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parses `args` given the options that take a value and the switches.
pub fn parse(
    args: &[String],
    value_options: &[&'static str],
    switches: &[&'static str],
) -> Result<Parsed, ArgError> {
    let mut parsed = Parsed::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            parsed.positional.extend(iter.by_ref().cloned());
            break;
        }
        if arg == "-h" || arg == "--help" {
            parsed.help = true;
            continue;
        }
        // A lone "-" is a conventional positional (stdin); anything else
        // starting with '-' is an option.
        if !arg.starts_with('-') || arg == "-" {
            parsed.positional.push(arg.clone());
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        if let Some(&known) = value_options.iter().find(|o| **o == name) {
            let value = match inline {
                Some(v) => v,
                None => iter.next().cloned().ok_or(ArgError::MissingValue(known))?,
            };
            parsed.values.push((known, value));
        } else if let Some(&known) = switches.iter().find(|o| **o == name) {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(known));
            }
            parsed.switches.push(known);
        } else {
            return Err(ArgError::Unknown(name.to_owned()));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn positionals_values_and_switches() {
        let p = parse(
            &argv("set-role abc creator --reason=promo --json --runs 5"),
            &["--reason", "--runs"],
            &["--json"],
        )
        .expect("parses");
        assert_eq!(p.positional, ["set-role", "abc", "creator"]);
        assert_eq!(p.value("--reason"), Some("promo"));
        assert_eq!(p.value("--runs"), Some("5"));
        assert!(p.switch("--json"));
        assert!(!p.switch("--production"));
        assert!(!p.help);
    }

    #[test]
    fn the_last_value_wins_and_values_may_start_with_a_dash() {
        let p = parse(&argv("--reason a --reason -b"), &["--reason"], &[]).expect("parses");
        assert_eq!(p.value("--reason"), Some("-b"));
    }

    #[test]
    fn double_dash_ends_options() {
        let p = parse(&argv("-- --json x"), &[], &["--json"]).expect("parses");
        assert_eq!(p.positional, ["--json", "x"]);
        assert!(!p.switch("--json"));
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(
            parse(&argv("--jsn"), &[], &["--json"]),
            Err(ArgError::Unknown("--jsn".into()))
        );
        assert_eq!(
            parse(&argv("--runs"), &["--runs"], &[]),
            Err(ArgError::MissingValue("--runs"))
        );
        assert_eq!(
            parse(&argv("--json=yes"), &[], &["--json"]),
            Err(ArgError::UnexpectedValue("--json"))
        );
    }

    #[test]
    fn help_is_recognised_anywhere() {
        let p = parse(&argv("x --help"), &[], &[]).expect("parses");
        assert!(p.help);
        assert_eq!(p.positional, ["x"]);
    }
}
