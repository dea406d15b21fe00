//! `stagepass check-env`: builds each function exactly as its cold start
//! would, from the process environment or a dotenv file, and reports every
//! problem (variable, what is wrong, a hint) — never a value. Building a
//! router connects nowhere (pools are lazy), so this is safe to run anywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use stagepass_platform::config::{AppEnv, Loader};
use stagepass_platform::serve::{Function, Resources, build};
use stagepass_routes::FUNCTIONS;

use crate::error::{Context as _, Result, fail};

pub struct Options {
    pub env_file: Option<PathBuf>,
    pub function: Option<String>,
    /// Check as a production deployment (`APP_ENV=production`).
    pub production: bool,
}

/// What one function's check found.
struct Report {
    name: &'static str,
    problems: Vec<String>,
    warnings: Vec<String>,
}

pub fn run(opts: &Options) -> Result<ExitCode> {
    let vars = environment(opts)?;
    let functions = selected(opts.function.as_deref())?;
    let source = match &opts.env_file {
        Some(path) => path.display().to_string(),
        None => "the process environment".to_owned(),
    };
    let (text, ok) = report(&vars, &functions, &source, opts.production);
    print!("{text}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The whole report, and whether every function is configured.
fn report(
    vars: &BTreeMap<String, String>,
    functions: &[&'static Function],
    source: &str,
    production_flag: bool,
) -> (String, bool) {
    use std::fmt::Write as _;
    let mut out = String::new();
    // The environment every function will run as, and why: on a deployment
    // an unset APP_ENV means production (ADR 0008).
    let loader = Loader::from_map(vars.clone());
    let env = match loader.app_env() {
        AppEnv::Production => "production",
        AppEnv::Test => "test",
        AppEnv::Development => "development",
    };
    let why = if production_flag {
        "APP_ENV=production, from --production"
    } else {
        loader.app_env_reason()
    };
    let _ = writeln!(
        out,
        "checking {} function(s) against {source}\nenvironment: {env} ({why})",
        functions.len()
    );
    let reports: Vec<Report> = functions.iter().map(|f| check(f, vars)).collect();
    for r in &reports {
        print_report(&mut out, r);
    }
    let failed = reports.iter().filter(|r| !r.problems.is_empty()).count();
    if failed == 0 {
        let _ = writeln!(out, "all {} function(s) OK", reports.len());
    } else {
        let _ = writeln!(
            out,
            "{failed} of {} function(s) not configured",
            reports.len()
        );
    }
    (out, failed == 0)
}

fn environment(opts: &Options) -> Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = match &opts.env_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            crate::dotenv::parse(&text)
                .with_context(|| path.display().to_string())?
                .into_iter()
                .collect()
        }
        None => std::env::vars().collect(),
    };
    if opts.production {
        vars.insert("APP_ENV".to_owned(), "production".to_owned());
    }
    Ok(vars)
}

fn selected(name: Option<&str>) -> Result<Vec<&'static Function>> {
    match name {
        None => Ok(FUNCTIONS.iter().collect()),
        Some(name) => match FUNCTIONS.iter().find(|f| f.name == name) {
            Some(f) => Ok(vec![f]),
            None => {
                let known: Vec<&str> = FUNCTIONS.iter().map(|f| f.name).collect();
                fail(format!(
                    "no function named '{name}' (known: {})",
                    known.join(", ")
                ))
            }
        },
    }
}

/// Builds `function` from a fresh loader, as its binary's cold start does.
fn check(function: &'static Function, vars: &BTreeMap<String, String>) -> Report {
    let mut loader = Loader::from_map(vars.clone());
    let built = build(function, &mut loader, &Resources::default()).is_some();
    // Read before `finish`, which returns warnings only when nothing failed.
    // The inferred environment is said once, in the report's header.
    let warnings = loader
        .warnings()
        .iter()
        .filter(|w| !w.starts_with("running as production"))
        .cloned()
        .collect();
    let problems: Vec<String> = match loader.finish() {
        Ok(_) => Vec::new(),
        // Problems name variables and rules only; values never appear.
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    };
    let problems = if problems.is_empty() && !built {
        vec!["the router could not be built, though no variable was reported (a bug: please report it)".to_owned()]
    } else {
        problems
    };
    Report {
        name: function.name,
        problems,
        warnings,
    }
}

fn print_report(out: &mut String, r: &Report) {
    use std::fmt::Write as _;
    if r.problems.is_empty() {
        let _ = writeln!(out, "OK    {}", r.name);
    } else {
        let _ = writeln!(out, "FAIL  {}", r.name);
        for p in &r.problems {
            let _ = writeln!(out, "        - {p}");
        }
    }
    for w in &r.warnings {
        let _ = writeln!(out, "        warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_health(vars: &[(&str, &str)]) -> (String, bool) {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let health = selected(Some("health")).expect("health");
        report(&vars, &health, "a test", false)
    }

    #[tokio::test]
    async fn says_which_environment_it_inferred_and_why() {
        let (out, ok) = check_health(&[]);
        assert!(ok, "{out}");
        assert!(
            out.contains("environment: development (APP_ENV is unset and no deployment platform"),
            "{out}"
        );

        // A Vercel preview that forgot APP_ENV is checked as production:
        // health then needs ALLOWED_ORIGINS.
        let (out, ok) = check_health(&[("VERCEL_ENV", "preview")]);
        assert!(!ok, "{out}");
        assert!(
            out.contains(
                "environment: production (APP_ENV is unset and VERCEL_ENV=preview is a deployment)"
            ),
            "{out}"
        );
        assert!(out.contains("ALLOWED_ORIGINS"), "{out}");
        assert!(!out.contains("warning: running as production"), "{out}");

        let (out, ok) = check_health(&[
            ("AWS_LAMBDA_FUNCTION_NAME", "stagepass-health"),
            ("ALLOWED_ORIGINS", "https://stagepass.app"),
        ]);
        assert!(ok, "{out}");
        assert!(
            out.contains("environment: production (APP_ENV is unset and AWS_LAMBDA_FUNCTION_NAME=stagepass-health is a deployment)"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn development_on_a_deployment_fails_the_check() {
        let (out, ok) = check_health(&[
            ("APP_ENV", "development"),
            ("VERCEL_ENV", "production"),
            ("ALLOWED_ORIGINS", "https://stagepass.app"),
        ]);
        assert!(!ok, "{out}");
        assert!(
            out.contains("environment: production (APP_ENV=development refused"),
            "{out}"
        );
        assert!(
            out.contains("APP_ENV: is development on a deployment"),
            "{out}"
        );
    }
}
