//! `stagepass lambda template`: the AWS SAM template of the Lambda target,
//! generated from [`FUNCTIONS`] and `vercel.json` so it cannot drift from
//! what Vercel deploys.
//!
//! - One `AWS::Serverless::Function` per binary (`provided.al2023`,
//!   `bootstrap`, arm64 by default), its code where `cargo lambda build`
//!   puts it (`target/lambda/<binary>/`), memory and timeout from
//!   `vercel.json`'s `functions`.
//! - One HTTP API; every path of every function is a route (`ANY`, so the
//!   router answers 405 and CORS preflights itself). Path parameters keep
//!   the `{id}` syntax both sides share.
//! - Each function gets exactly the variables its cold start reads (the
//!   [`Loader`] records them while building the router), as template
//!   parameters: secrets `NoEcho`, the ones the function cannot start
//!   without have no default. `APP_ENV` is `production`.
//! - `vercel.json`'s crons become EventBridge schedules that invoke the cron
//!   function directly with an HTTP API event carrying `Authorization:
//!   Bearer <CronSecret>` ([`schedule_event`]): a schedule cannot add a
//!   header to an HTTP request, and this way the request takes the same way
//!   through the router, secret check included.
//!
//! The output is JSON, which is also YAML: SAM and cfn-lint read either.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use stagepass_platform::config::{Loader, UpstashConfig, rate_limits_enabled};
use stagepass_platform::serve::{Function, Limits, Resources, build, schedule_event};

use crate::error::{Result, fail};

/// `vercel.json`, compiled in: the crons and function limits it declares
/// are the ones the Lambda target gets.
const VERCEL_JSON: &str = include_str!("../../../vercel.json");

/// The template parameter that holds `CRON_SECRET`.
const CRON_SECRET: &str = "CRON_SECRET";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Arm64,
    X86_64,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "arm64" => Ok(Arch::Arm64),
            "x86_64" => Ok(Arch::X86_64),
            _ => fail("--arch must be arm64 or x86_64"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86_64",
        }
    }
}

pub struct Options {
    pub arch: Arch,
    /// Where `cargo lambda build` put the binaries, relative to the
    /// template's directory.
    pub code_root: String,
}

/// What one function reads from its environment.
struct Variables {
    /// Name → (secret, required).
    vars: BTreeMap<String, (bool, bool)>,
}

/// Builds `function` against an empty production environment, recording
/// every variable it asks for and which ones it cannot start without.
fn variables(function: &Function) -> Variables {
    let mut loader = Loader::from_map([("APP_ENV", "production")]);
    let _ = build(function, &mut loader, &Resources::default());
    // The rate limiter's settings are read after the router builds (which
    // it does not here): read them the way `serve::build` would.
    if !matches!(function.limits, Limits::Exempt(_)) {
        rate_limits_enabled(&mut loader);
        let _ = UpstashConfig::load(&mut loader);
    }
    let required: BTreeSet<&str> = loader.problem_variables().into_iter().collect();
    let vars = loader
        .asked()
        .into_iter()
        .filter(|(name, _)| deployable(name))
        .map(|(name, secret)| {
            let required = required.contains(name.as_str());
            (name, (secret, required))
        })
        .collect();
    Variables { vars }
}

/// Variables a deployment sets. `APP_ENV` is fixed to production; Lambda
/// sets `AWS_*` itself; `VERCEL_*` exist only on Vercel.
fn deployable(name: &str) -> bool {
    name != "APP_ENV" && !name.starts_with("AWS_") && !name.starts_with("VERCEL_")
}

/// `SUPABASE_JWT_SECRET` → `SupabaseJwtSecret` (parameter names are
/// alphanumeric).
fn pascal(name: &str) -> String {
    name.split(['_', '-'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            let mut c = lower.chars();
            match c.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// A Vercel (five-field, standard) cron expression as EventBridge's
/// six-field `cron(…)`: minutes hours day-of-month month day-of-week year,
/// one of the two day fields `?`, `*/n` written `0/n`.
pub fn eventbridge_cron(expr: &str) -> Result<String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields.as_slice() else {
        return fail(format!("cron '{expr}' does not have five fields"));
    };
    let step = |f: &str| match f.strip_prefix("*/") {
        Some(n) => format!("0/{n}"),
        None => f.to_owned(),
    };
    // Day-of-week numbering differs (Vercel 0–6 from Sunday, EventBridge
    // 1–7); our crons do not use it, so refuse rather than guess.
    if *dow != "*" {
        return fail(format!(
            "cron '{expr}': a day-of-week is not supported by the template; write the schedule by hand"
        ));
    }
    Ok(format!(
        "cron({} {} {} {} ? *)",
        step(minute),
        step(hour),
        step(dom),
        step(month)
    ))
}

/// The template for `functions` and the crons and limits of `vercel`.
pub fn template(functions: &[Function], vercel: &Value, opts: &Options) -> Result<Value> {
    let limits = &vercel["functions"]["api/**/*.rs"];
    let memory = limits["memory"].as_u64().unwrap_or(256);
    let timeout = limits["maxDuration"].as_u64().unwrap_or(15);

    let mut crons: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for cron in vercel["crons"].as_array().into_iter().flatten() {
        let (Some(path), Some(schedule)) = (cron["path"].as_str(), cron["schedule"].as_str())
        else {
            return fail("vercel.json: every cron needs a path and a schedule");
        };
        crons.entry(path).or_default().push(schedule);
    }

    let per_function: Vec<(&Function, Variables)> =
        functions.iter().map(|f| (f, variables(f))).collect();
    // Every variable any function reads becomes one parameter; a secret or
    // required anywhere is one everywhere.
    let mut all: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for (_, v) in &per_function {
        for (name, (secret, required)) in &v.vars {
            let entry = all.entry(name.clone()).or_default();
            entry.0 |= secret;
            entry.1 |= required;
        }
    }
    // Variables every function reads go to the globals.
    let common: BTreeSet<&String> = all
        .keys()
        .filter(|name| per_function.iter().all(|(_, v)| v.vars.contains_key(*name)))
        .collect();

    let mut parameters = Map::new();
    for (name, (secret, required)) in &all {
        let mut p = json!({
            "Type": "String",
            "Description": format!("{name}{}", if *required { "" } else { " (optional)" }),
        });
        if *secret {
            p["NoEcho"] = json!(true);
        }
        if *required {
            p["MinLength"] = json!(1);
        } else {
            p["Default"] = json!("");
        }
        if name == CRON_SECRET {
            // Substituted into the schedules' JSON input: no character that
            // would need escaping there.
            p["AllowedPattern"] = json!("^[A-Za-z0-9._~+=-]{16,}$");
            p["ConstraintDescription"] =
                json!("at least 16 characters from A-Z a-z 0-9 . _ ~ + = -");
        }
        parameters.insert(pascal(name), p);
    }

    let env_of = |names: &mut dyn Iterator<Item = &String>| -> Map<String, Value> {
        names
            .map(|n| (n.clone(), json!({ "Ref": pascal(n) })))
            .collect()
    };

    let mut global_env = env_of(&mut common.iter().copied());
    global_env.insert("APP_ENV".into(), json!("production"));

    let mut resources = Map::new();
    resources.insert(
        "HttpApi".into(),
        json!({ "Type": "AWS::Serverless::HttpApi", "Properties": {} }),
    );
    let mut served: BTreeSet<&str> = BTreeSet::new();
    for (function, vars) in &per_function {
        let mut events = Map::new();
        for (i, path) in function.paths.iter().enumerate() {
            served.insert(path);
            events.insert(
                format!("Route{i}"),
                json!({
                    "Type": "HttpApi",
                    "Properties": { "ApiId": { "Ref": "HttpApi" }, "Path": path, "Method": "ANY" },
                }),
            );
            for (j, schedule) in crons.get(path).into_iter().flatten().enumerate() {
                if !all.contains_key(CRON_SECRET) {
                    return fail("a cron is declared but no function reads CRON_SECRET");
                }
                let input = serde_json::to_string(&schedule_event(
                    path,
                    &format!("Bearer ${{{}}}", pascal(CRON_SECRET)),
                ))?;
                events.insert(
                    format!("Schedule{i}x{j}"),
                    json!({
                        "Type": "Schedule",
                        "Properties": {
                            "Schedule": eventbridge_cron(schedule)?,
                            "Input": { "Fn::Sub": input },
                        },
                    }),
                );
            }
        }
        let own = env_of(&mut vars.vars.keys().filter(|n| !common.contains(n)));
        let mut properties = json!({
            "CodeUri": format!("{}/{}/", opts.code_root.trim_end_matches('/'), function.name),
            "Events": events,
        });
        if !own.is_empty() {
            properties["Environment"] = json!({ "Variables": own });
        }
        resources.insert(
            format!("{}Function", pascal(function.name)),
            json!({ "Type": "AWS::Serverless::Function", "Properties": properties }),
        );
    }
    for path in crons.keys() {
        if !served.contains(path) {
            return fail(format!(
                "vercel.json: cron {path} is not a path of any function"
            ));
        }
    }
    for rewrite in vercel["rewrites"].as_array().into_iter().flatten() {
        // Vercel rewrites a public path to a binary's file path; on Lambda
        // the function must serve the public path itself.
        if let Some(source) = rewrite["source"].as_str()
            && !served.contains(source)
        {
            return fail(format!(
                "vercel.json: rewrite source {source} is not a path of any function"
            ));
        }
    }

    Ok(json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": "Stagepass on AWS Lambda (generated by `stagepass lambda template`; do not edit)",
        "Parameters": parameters,
        "Globals": {
            "Function": {
                "Runtime": "provided.al2023",
                "Handler": "bootstrap",
                "Architectures": [opts.arch.name()],
                "MemorySize": memory,
                "Timeout": timeout,
                "Environment": { "Variables": global_env },
            },
        },
        "Resources": resources,
        "Outputs": {
            "ApiUrl": {
                "Description": "The HTTP API's base URL",
                "Value": { "Fn::Sub": "https://${HttpApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}" },
            },
        },
    }))
}

/// The template for this build's functions and `vercel.json`.
pub fn run(opts: &Options) -> Result<String> {
    let vercel: Value = serde_json::from_str(VERCEL_JSON)?;
    let t = template(stagepass_routes::FUNCTIONS, &vercel, opts)?;
    Ok(serde_json::to_string_pretty(&t)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use stagepass_routes::FUNCTIONS;

    fn generated() -> Value {
        let opts = Options {
            arch: Arch::Arm64,
            code_root: "target/lambda".into(),
        };
        serde_json::from_str(&run(&opts).expect("template")).expect("json")
    }

    #[test]
    fn one_function_per_binary_with_every_route() {
        let t = generated();
        let resources = t["Resources"].as_object().expect("resources");
        let functions: Vec<_> = resources
            .values()
            .filter(|r| r["Type"] == "AWS::Serverless::Function")
            .collect();
        assert_eq!(functions.len(), FUNCTIONS.len());
        for f in FUNCTIONS {
            let r = &resources[&format!("{}Function", pascal(f.name))];
            assert_eq!(
                r["Properties"]["CodeUri"],
                format!("target/lambda/{}/", f.name)
            );
            let routes: Vec<&str> = r["Properties"]["Events"]
                .as_object()
                .expect("events")
                .values()
                .filter(|e| e["Type"] == "HttpApi")
                .map(|e| e["Properties"]["Path"].as_str().expect("path"))
                .collect();
            assert_eq!(routes, f.paths, "{}", f.name);
        }
        assert_eq!(t["Globals"]["Function"]["Runtime"], "provided.al2023");
        assert_eq!(t["Globals"]["Function"]["Handler"], "bootstrap");
        assert_eq!(
            t["Globals"]["Function"]["Environment"]["Variables"]["APP_ENV"],
            "production"
        );
    }

    #[test]
    fn every_cron_is_a_schedule_carrying_the_cron_secret() {
        let t = generated();
        let vercel: Value = serde_json::from_str(VERCEL_JSON).expect("vercel.json");
        let crons = vercel["crons"].as_array().expect("crons");
        let schedules: Vec<&Value> = t["Resources"]
            .as_object()
            .expect("resources")
            .values()
            .flat_map(|r| r["Properties"]["Events"].as_object().into_iter().flatten())
            .map(|(_, e)| e)
            .filter(|e| e["Type"] == "Schedule")
            .collect();
        assert_eq!(schedules.len(), crons.len());
        for cron in crons {
            let path = cron["path"].as_str().expect("path");
            let expected = eventbridge_cron(cron["schedule"].as_str().expect("schedule")).unwrap();
            let s = schedules
                .iter()
                .find(|s| {
                    s["Properties"]["Schedule"] == expected.as_str()
                        && s["Properties"]["Input"]["Fn::Sub"]
                            .as_str()
                            .is_some_and(|i| i.contains(&format!("\"rawPath\":\"{path}\"")))
                })
                .unwrap_or_else(|| panic!("no schedule for {path}"));
            let input = s["Properties"]["Input"]["Fn::Sub"].as_str().unwrap();
            // The exact payload `serve::lambda_tests` proves passes the check.
            assert_eq!(
                serde_json::from_str::<Value>(input).unwrap(),
                schedule_event(path, "Bearer ${CronSecret}")
            );
        }
        let p = &t["Parameters"]["CronSecret"];
        assert_eq!(p["NoEcho"], true);
        assert!(p.get("Default").is_none(), "the cron secret is required");
    }

    #[test]
    fn each_function_gets_its_own_variables_and_secrets_are_hidden() {
        let t = generated();
        let params = t["Parameters"].as_object().expect("parameters");
        for secret in [
            "DatabaseUrl",
            "SupabaseJwtSecret",
            "StripeSecretKey",
            "SentryDsn",
        ] {
            assert_eq!(params[secret]["NoEcho"], true, "{secret}");
        }
        assert!(params["SentryTracesSampleRate"].get("NoEcho").is_none());
        assert_eq!(params["StagepassRelease"]["Default"], "");
        let env = |name: &str| {
            t["Resources"][format!("{name}Function")]["Properties"]["Environment"]["Variables"]
                .clone()
        };
        // Liveness reads nothing beyond the globals; readiness only the
        // database; the webhook its signing secret, not the Stripe API key.
        assert!(env("Health").is_null());
        assert_eq!(env("HealthReady")["DATABASE_URL"]["Ref"], "DatabaseUrl");
        assert!(env("WebhooksStripe")["STRIPE_WEBHOOK_SECRET"].is_object());
        assert!(env("V1Me")["STRIPE_WEBHOOK_SECRET"].is_null());
        let globals = &t["Globals"]["Function"]["Environment"]["Variables"];
        for v in [
            "ALLOWED_ORIGINS",
            "SENTRY_DSN",
            "SENTRY_TRACES_SAMPLE_RATE",
            "STAGEPASS_RELEASE",
        ] {
            assert!(globals[v].is_object(), "{v} not global: {globals}");
        }
    }

    #[test]
    fn vercel_crons_become_eventbridge_expressions() {
        assert_eq!(
            eventbridge_cron("*/10 * * * *").unwrap(),
            "cron(0/10 * * * ? *)"
        );
        assert_eq!(
            eventbridge_cron("30 3 * * *").unwrap(),
            "cron(30 3 * * ? *)"
        );
        assert_eq!(eventbridge_cron("0 * * * *").unwrap(), "cron(0 * * * ? *)");
        assert!(eventbridge_cron("0 9 * * 1").is_err());
        assert!(eventbridge_cron("* * *").is_err());
        assert_eq!(pascal("SUPABASE_JWT_SECRET"), "SupabaseJwtSecret");
        assert_eq!(pascal("v1_me"), "V1Me");
    }
}
