//! `stagepass check-env`: builds each function exactly as its cold start
//! would, from the process environment or a dotenv file, and reports every
//! problem (variable, what is wrong, a hint) — never a value. Building a
//! router connects nowhere (pools are lazy), so this is safe to run anywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use stagepass_platform::config::Loader;
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
    let app_env = vars
        .get("APP_ENV")
        .map_or("development (APP_ENV unset)", String::as_str);
    println!(
        "checking {} function(s) against {source}, APP_ENV={app_env}",
        functions.len()
    );
    let reports: Vec<Report> = functions.iter().map(|f| check(f, &vars)).collect();
    for r in &reports {
        print_report(r);
    }
    let failed = reports.iter().filter(|r| !r.problems.is_empty()).count();
    if failed == 0 {
        println!("all {} function(s) OK", reports.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{failed} of {} function(s) not configured", reports.len());
        Ok(ExitCode::FAILURE)
    }
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
    let warnings = loader.warnings().to_vec();
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

fn print_report(r: &Report) {
    if r.problems.is_empty() {
        println!("OK    {}", r.name);
    } else {
        println!("FAIL  {}", r.name);
        for p in &r.problems {
            println!("        - {p}");
        }
    }
    for w in &r.warnings {
        println!("        warning: {w}");
    }
}
