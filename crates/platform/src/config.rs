//! Typed configuration, validated once at cold start.
//!
//! Each function loads only the sections it uses, through one [`Loader`]. A
//! section's `load` records every problem it finds instead of stopping at the
//! first, so an operator sees the whole list at once (variable, what is wrong,
//! a hint). Secret values are held as [`Secret`] and never appear in a
//! problem message or a `Debug` print.

use std::collections::BTreeMap;
use std::fmt;

pub use secrecy::ExposeSecret;
use secrecy::SecretString;

/// A secret setting. `Debug` prints `[REDACTED]`; the value is reachable only
/// through [`ExposeSecret::expose_secret`], which makes every use greppable.
pub type Secret = SecretString;

/// One thing wrong with the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub variable: &'static str,
    pub problem: String,
    pub hint: &'static str,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (hint: {})",
            self.variable, self.problem, self.hint
        )
    }
}

/// Every problem found while loading, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The deployment environment (`APP_ENV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Test,
    Production,
}

impl AppEnv {
    pub fn is_production(self) -> bool {
        self == AppEnv::Production
    }
}

/// Reads variables from a source (the process environment, or a map in
/// tests) and collects problems.
pub struct Loader {
    vars: BTreeMap<String, String>,
    problems: Vec<ConfigProblem>,
    warnings: Vec<String>,
    app_env: AppEnv,
    /// Every variable asked for, and whether as a secret (the SAM template
    /// lists each function's variables from this).
    asked: std::cell::RefCell<BTreeMap<String, bool>>,
    app_env_reason: String,
}

impl Loader {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_map(std::env::vars())
    }

    /// Reads the given pairs (tests, `check-env` on a file).
    pub fn from_map<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let mut loader = Loader {
            vars,
            problems: Vec::new(),
            warnings: Vec::new(),
            app_env: AppEnv::Development,
            asked: Default::default(),
            app_env_reason: String::new(),
        };
        (loader.app_env, loader.app_env_reason) = loader.load_app_env();
        loader
    }

    /// The environment and why. Production is the default wherever the
    /// process runs deployed (ADR 0008): a deployment that forgets `APP_ENV`
    /// gets the production rules (and their "is not set" list) instead of
    /// silently running with development's relaxed ones, and an explicit
    /// `development`/`test` there is refused.
    fn load_app_env(&mut self) -> (AppEnv, String) {
        let deployed = self.deployed_platform();
        let explicit = match self.get("APP_ENV").as_deref() {
            None => None,
            Some("development") => Some(AppEnv::Development),
            Some("test") => Some(AppEnv::Test),
            Some("production") => Some(AppEnv::Production),
            Some(_) => {
                self.problem(
                    "APP_ENV",
                    "is not one of development, test, production",
                    "set APP_ENV=production on deployments",
                );
                // Still checked with the strictest rules where deployed.
                return match deployed {
                    Some(platform) => (
                        AppEnv::Production,
                        format!("APP_ENV is invalid; {platform} is a deployment"),
                    ),
                    None => (AppEnv::Development, "APP_ENV is invalid".to_owned()),
                };
            }
        };
        match (explicit, deployed) {
            (Some(AppEnv::Production), _) => (AppEnv::Production, "APP_ENV=production".to_owned()),
            (Some(env), Some(platform)) => {
                let name = if env == AppEnv::Test {
                    "test"
                } else {
                    "development"
                };
                self.problem(
                    "APP_ENV",
                    format!(
                        "is {name} on a deployment ({platform}): in-process rate limits, \
                         optional Ably/QStash and http URLs would be accepted on a public URL"
                    ),
                    "remove APP_ENV (production is the default when deployed) or set APP_ENV=production",
                );
                (
                    AppEnv::Production,
                    format!("APP_ENV={name} refused: {platform} is a deployment"),
                )
            }
            (Some(AppEnv::Test), None) => (AppEnv::Test, "APP_ENV=test".to_owned()),
            (Some(_), None) => (AppEnv::Development, "APP_ENV=development".to_owned()),
            (None, Some(platform)) => {
                let reason = format!("APP_ENV is unset and {platform} is a deployment");
                self.warn(format!(
                    "running as production: {reason}; set APP_ENV=production to say so"
                ));
                (AppEnv::Production, reason)
            }
            (None, None) => (
                AppEnv::Development,
                "APP_ENV is unset and no deployment platform was detected \
                 (VERCEL_ENV=production|preview, AWS_LAMBDA_FUNCTION_NAME)"
                    .to_owned(),
            ),
        }
    }

    /// The deployment platform this process runs on, as `NAME=value` of the
    /// variable that says so: Vercel sets `VERCEL_ENV` to `production` or
    /// `preview` on deployments (`development` under `vercel dev`, which is
    /// local), AWS Lambda sets `AWS_LAMBDA_FUNCTION_NAME` in every function.
    fn deployed_platform(&self) -> Option<String> {
        if let Some(v) = self.get("VERCEL_ENV")
            && matches!(v.as_str(), "production" | "preview")
        {
            return Some(format!("VERCEL_ENV={v}"));
        }
        self.get("AWS_LAMBDA_FUNCTION_NAME")
            .map(|v| format!("AWS_LAMBDA_FUNCTION_NAME={v}"))
    }

    pub fn app_env(&self) -> AppEnv {
        self.app_env
    }

    /// Why [`Loader::app_env`] is what it is (`stagepass check-env` prints it).
    pub fn app_env_reason(&self) -> &str {
        &self.app_env_reason
    }

    /// A variable's value; an empty value counts as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        self.asked.borrow_mut().entry(name.to_owned()).or_default();
        self.vars
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub fn problem(
        &mut self,
        variable: &'static str,
        problem: impl Into<String>,
        hint: &'static str,
    ) {
        self.problems.push(ConfigProblem {
            variable,
            problem: problem.into(),
            hint,
        });
    }

    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// A required variable: records "is not set" when missing.
    pub fn required(&mut self, name: &'static str, hint: &'static str) -> Option<String> {
        let value = self.get(name);
        if value.is_none() {
            self.problem(name, "is not set", hint);
        }
        value
    }

    /// A required secret, checked by `rule` (which must not echo the value).
    pub fn required_secret(
        &mut self,
        name: &'static str,
        hint: &'static str,
        rule: impl FnOnce(&str) -> Result<(), &'static str>,
    ) -> Option<Secret> {
        self.asked.get_mut().insert(name.to_owned(), true);
        let value = self.required(name, hint)?;
        self.check_secret(name, value, hint, rule)
    }

    /// An optional secret: `None` when unset, checked when set.
    pub fn optional_secret(
        &mut self,
        name: &'static str,
        hint: &'static str,
        rule: impl FnOnce(&str) -> Result<(), &'static str>,
    ) -> Option<Secret> {
        self.asked.get_mut().insert(name.to_owned(), true);
        let value = self.get(name)?;
        self.check_secret(name, value, hint, rule)
    }

    fn check_secret(
        &mut self,
        name: &'static str,
        value: String,
        hint: &'static str,
        rule: impl FnOnce(&str) -> Result<(), &'static str>,
    ) -> Option<Secret> {
        match rule(&value) {
            Ok(()) => Some(Secret::from(value)),
            Err(why) => {
                self.problem(name, why, hint);
                None
            }
        }
    }

    /// A URL whose scheme is one of `schemes`. In development and test,
    /// `http` is also accepted where `https` is asked for (local stand-ins).
    pub fn url(
        &mut self,
        name: &'static str,
        schemes: &[&str],
        hint: &'static str,
    ) -> Option<url::Url> {
        let raw = self.required(name, hint)?;
        self.parse_url(name, &raw, schemes, hint)
    }

    pub fn optional_url(
        &mut self,
        name: &'static str,
        schemes: &[&str],
        hint: &'static str,
    ) -> Option<url::Url> {
        let raw = self.get(name)?;
        self.parse_url(name, &raw, schemes, hint)
    }

    fn parse_url(
        &mut self,
        name: &'static str,
        raw: &str,
        schemes: &[&str],
        hint: &'static str,
    ) -> Option<url::Url> {
        let parsed = match url::Url::parse(raw) {
            Ok(u) => u,
            Err(_) => {
                // The value may hold credentials (DATABASE_URL): never echo it.
                self.problem(name, "is not a valid URL", hint);
                return None;
            }
        };
        let relaxed = !self.app_env.is_production()
            && parsed.scheme() == "http"
            && schemes.contains(&"https");
        if !schemes.contains(&parsed.scheme()) && !relaxed {
            self.problem(
                name,
                format!("must use scheme {}", schemes.join(" or ")),
                hint,
            );
            return None;
        }
        Some(parsed)
    }

    /// Consumes the loader: `Ok` with the warnings when nothing was wrong.
    pub fn finish(self) -> Result<Vec<String>, ConfigErrors> {
        if self.problems.is_empty() {
            Ok(self.warnings)
        } else {
            Err(ConfigErrors(self.problems))
        }
    }

    pub fn has_problems(&self) -> bool {
        !self.problems.is_empty()
    }

    /// Every variable read so far, `true` for secrets.
    pub fn asked(&self) -> BTreeMap<String, bool> {
        self.asked.borrow().clone()
    }

    /// The variables with a problem so far (missing or invalid).
    pub fn problem_variables(&self) -> Vec<&'static str> {
        self.problems.iter().map(|p| p.variable).collect()
    }
}

/// Settings every function has: environment, CORS, telemetry.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub app_env: AppEnv,
    /// Exact origins allowed by CORS.
    pub allowed_origins: Vec<String>,
    /// Optional pattern for preview deployments, e.g.
    /// `https://stagepass-*-team.vercel.app` (one `*`, matching `[a-z0-9-]+`).
    pub preview_origin_pattern: Option<String>,
    pub sentry_dsn: Option<Secret>,
    /// Share of requests that become Sentry performance transactions
    /// (`SENTRY_TRACES_SAMPLE_RATE`, 0..=1, default 0: none).
    pub traces_sample_rate: f32,
    /// What Sentry reports as the release: the deployment's commit
    /// ([`release`]), else the package version.
    pub release: String,
}

impl CoreConfig {
    pub fn load(l: &mut Loader) -> CoreConfig {
        let allowed_origins = match l.get("ALLOWED_ORIGINS") {
            Some(raw) => parse_origins(l, &raw),
            None => {
                if l.app_env().is_production() {
                    l.problem(
                        "ALLOWED_ORIGINS",
                        "is not set",
                        "comma-separated exact origins, e.g. https://stagepass.app",
                    );
                }
                Vec::new()
            }
        };
        let preview_origin_pattern = l.get("ALLOWED_ORIGIN_PATTERN");
        if let Some(p) = &preview_origin_pattern
            && (p.matches('*').count() != 1 || !p.starts_with("https://"))
        {
            l.problem(
                "ALLOWED_ORIGIN_PATTERN",
                "must be an https origin with exactly one '*'",
                "e.g. https://stagepass-*-team.vercel.app",
            );
        }
        let sentry_dsn =
            l.optional_secret(
                "SENTRY_DSN",
                "a Sentry DSN URL",
                |v| match url::Url::parse(v) {
                    Ok(u) if !u.username().is_empty() && u.path().len() > 1 => Ok(()),
                    _ => Err("is not a Sentry DSN (scheme://public_key@host/project_id)"),
                },
            );
        let traces_sample_rate = match l.get("SENTRY_TRACES_SAMPLE_RATE") {
            None => 0.0,
            Some(raw) => match raw.parse::<f32>() {
                Ok(rate) if (0.0..=1.0).contains(&rate) => rate,
                _ => {
                    l.problem(
                        "SENTRY_TRACES_SAMPLE_RATE",
                        "is not a number from 0 to 1",
                        "the share of requests traced, e.g. 0.05; 0 or unset traces none",
                    );
                    0.0
                }
            },
        };
        CoreConfig {
            app_env: l.app_env(),
            allowed_origins,
            preview_origin_pattern,
            sentry_dsn,
            traces_sample_rate,
            release: release(l),
        }
    }
}

/// Variables that name the deployed commit, first match wins: Vercel sets
/// `VERCEL_GIT_COMMIT_SHA` on every deployment from git; on Lambda (or
/// anywhere else) the deploy sets `STAGEPASS_RELEASE` (the SAM template
/// passes its `Release` parameter, e.g. `$(git rev-parse HEAD)`).
pub const RELEASE_VARIABLES: [&str; 2] = ["STAGEPASS_RELEASE", "VERCEL_GIT_COMMIT_SHA"];

/// The release Sentry groups events and transactions by: the deployed
/// commit when the platform names it, else the package version.
pub fn release(l: &Loader) -> String {
    RELEASE_VARIABLES
        .iter()
        .find_map(|name| l.get(name))
        .filter(|v| {
            // A release name may not contain newlines or slashes and must
            // fit Sentry's 200 characters; anything else is not a commit.
            v.len() <= 200 && !v.contains(['/', '\\', '\n', '\r'])
        })
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

fn parse_origins(l: &mut Loader, raw: &str) -> Vec<String> {
    let mut origins = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match url::Url::parse(part) {
            Ok(u) if u.path() == "/" && u.query().is_none() && u.host().is_some() => {
                origins.push(u.origin().ascii_serialization());
            }
            _ => l.problem(
                "ALLOWED_ORIGINS",
                format!("'{part}' is not an origin (scheme://host[:port], no path)"),
                "comma-separated exact origins, e.g. https://stagepass.app,https://www.stagepass.app",
            ),
        }
    }
    origins
}

/// How the functions reach Postgres (`DATABASE_POOL_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A direct connection or a session pooler (Supabase port 5432): one
    /// server connection per client connection, prepared statements cached.
    Session,
    /// A transaction pooler (Supabase port 6543, PgBouncer
    /// `pool_mode = transaction`): each transaction may run on another server
    /// connection, so no named prepared statements, no startup `options`,
    /// settings only transaction-local, every statement in a transaction.
    Transaction,
}

/// Supabase's transaction pooler listens on this port.
pub const TRANSACTION_POOLER_PORT: u16 = 6543;

/// Postgres access.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// The connection URL, without the `pgbouncer` parameter (ours, not
    /// sqlx's).
    pub url: Secret,
    /// Connections per function instance (serverless: small).
    pub max_connections: u32,
    pub pool_mode: PoolMode,
    /// `DATABASE_CA_PEM`: the CA that signs the server's certificate, as
    /// PEM text (a file next to the binary does not exist on Vercel). It is
    /// public, but held as a [`Secret`] so no `Debug` print or log line
    /// echoes it: it is long and says nothing useful there.
    pub ca_pem: Option<Secret>,
}

impl DbConfig {
    pub fn load(l: &mut Loader) -> Option<DbConfig> {
        let url = l.required_secret(
            "DATABASE_URL",
            "postgres://stagepass_app:…@host:6543/postgres?sslmode=verify-full (Supabase transaction pooler) — see docs/ARCHITECTURE.md",
            |v| {
                if v.starts_with("postgres://") || v.starts_with("postgresql://") {
                    url::Url::parse(v)
                        .map(|_| ())
                        .map_err(|_| "is not a valid URL")
                } else {
                    Err("must start with postgres:// or postgresql://")
                }
            },
        );
        let parsed = url
            .as_ref()
            .and_then(|u| url::Url::parse(u.expose_secret()).ok());
        let mode = parsed.as_ref().map(ssl_mode);
        if l.app_env().is_production()
            && let Some(mode) = &mode
        {
            check_production_ssl_mode(l, mode);
        }
        let ca_pem = load_ca_pem(l, parsed.as_ref(), mode.as_deref());
        let pool_mode = load_pool_mode(l, parsed.as_ref());
        let max_connections = match l.get("DATABASE_MAX_CONNECTIONS") {
            None => 4,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=32).contains(&n) => n,
                _ => {
                    l.problem(
                        "DATABASE_MAX_CONNECTIONS",
                        "must be an integer from 1 to 32",
                        "serverless instances keep this small (default 4; docs/ARCHITECTURE.md)",
                    );
                    4
                }
            },
        };
        Some(DbConfig {
            url: Secret::from(without_pgbouncer_param(parsed?)),
            max_connections,
            pool_mode,
            ca_pem,
        })
    }
}

/// `DATABASE_POOL_MODE` when set; otherwise `transaction` for Supabase's
/// transaction pooler port (6543) or a URL with `pgbouncer=true` (Prisma's
/// convention), `session` for anything else.
fn load_pool_mode(l: &mut Loader, url: Option<&url::Url>) -> PoolMode {
    match l.get("DATABASE_POOL_MODE").as_deref() {
        Some("session") => PoolMode::Session,
        Some("transaction") => PoolMode::Transaction,
        Some(_) => {
            l.problem(
                "DATABASE_POOL_MODE",
                "must be session or transaction",
                "transaction for Supabase's transaction pooler (port 6543); unset to infer from DATABASE_URL",
            );
            PoolMode::Session
        }
        None => url.map_or(PoolMode::Session, PoolMode::inferred_from),
    }
}

impl PoolMode {
    /// What a URL alone says: Supabase's transaction pooler port, or
    /// `pgbouncer=true`.
    pub fn inferred_from(url: &url::Url) -> PoolMode {
        if url.port() == Some(TRANSACTION_POOLER_PORT)
            || url
                .query_pairs()
                .any(|(k, v)| k == "pgbouncer" && v == "true")
        {
            PoolMode::Transaction
        } else {
            PoolMode::Session
        }
    }
}

/// The URL sqlx gets: `pgbouncer=` is ours (sqlx would log it as unknown).
pub fn without_pgbouncer_param(mut url: url::Url) -> String {
    if url.query_pairs().any(|(k, _)| k == "pgbouncer") {
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "pgbouncer")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
    }
    url.into()
}

/// `DATABASE_CA_PEM`: at least one certificate, each one usable as a trust
/// anchor (what the TLS client will do with it), and an `sslmode` that
/// verifies — with `prefer`/`require` the CA would silently be ignored.
/// `sslrootcert=` in the URL as well is refused: two CAs, one would lose.
fn load_ca_pem(l: &mut Loader, url: Option<&url::Url>, mode: Option<&str>) -> Option<Secret> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    const HINT: &str = "the PEM text of the CA certificate (Supabase: Database settings → SSL                         → Download certificate), with its BEGIN/END lines";
    let mut pem = l.get("DATABASE_CA_PEM")?;
    // Some settings screens keep a pasted value on one line with literal
    // `\n`s; PEM needs its line breaks.
    if !pem.contains('\n') && pem.contains("\\n") {
        pem = pem.replace("\\n", "\n");
    }
    let certs: Result<Vec<CertificateDer<'_>>, _> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(certs) if certs.is_empty() => {
            l.problem("DATABASE_CA_PEM", "holds no PEM certificate", HINT);
            return None;
        }
        Ok(certs) => {
            if certs
                .iter()
                .any(|c| webpki::anchor_from_trusted_cert(c).is_err())
            {
                l.problem(
                    "DATABASE_CA_PEM",
                    "holds a block that is not a valid X.509 certificate",
                    HINT,
                );
                return None;
            }
        }
        Err(_) => {
            l.problem("DATABASE_CA_PEM", "is not valid PEM", HINT);
            return None;
        }
    }
    if url.is_some_and(|u| u.query_pairs().any(|(k, _)| k == "sslrootcert")) {
        l.problem(
            "DATABASE_CA_PEM",
            "is set while DATABASE_URL also names sslrootcert=",
            "keep one CA: remove sslrootcert= from DATABASE_URL (a file path does not exist on Vercel)",
        );
    }
    if let Some(mode) = mode
        && !matches!(mode, "verify-ca" | "verify-full")
    {
        l.problem(
            "DATABASE_CA_PEM",
            format!(
                "is ignored with DATABASE_URL's sslmode={mode}, which does not verify the server"
            ),
            "add sslmode=verify-full to DATABASE_URL",
        );
    }
    // Normalised with a final newline; nothing else changes.
    Some(Secret::from(format!("{}\n", pem.trim_end())))
}

/// The `sslmode` of a Postgres URL (libpq's default, `prefer`, when absent).
fn ssl_mode(url: &url::Url) -> String {
    url.query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "prefer".to_owned())
}

/// Production: no clear text to the database; and a warning while the
/// server's certificate is not verified (`prefer`/`require` encrypt but
/// accept any certificate, so they do not stop a man in the middle).
fn check_production_ssl_mode(l: &mut Loader, mode: &str) {
    match mode {
        "disable" | "allow" => l.problem(
            "DATABASE_URL",
            format!("sslmode={mode} sends the password and data in clear text in production"),
            "use sslmode=verify-full with DATABASE_CA_PEM set to the provider's CA (Supabase: database settings → SSL)",
        ),
        "verify-ca" | "verify-full" => {}
        other => l.warn(format!(
            "DATABASE_URL: sslmode={other} encrypts but does not verify the database's certificate; \
             use sslmode=verify-full with DATABASE_CA_PEM set to the provider's CA"
        )),
    }
}

/// Supabase access-token verification.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Project URL; the issuer is `{SUPABASE_URL}/auth/v1` and the JWKS lives
    /// at `{SUPABASE_URL}/auth/v1/.well-known/jwks.json`.
    pub supabase_url: url::Url,
    /// HS256 project secret; optional when the project signs with asymmetric keys.
    pub jwt_secret: Option<Secret>,
}

impl AuthConfig {
    pub fn load(l: &mut Loader) -> Option<AuthConfig> {
        let supabase_url = l.url(
            "SUPABASE_URL",
            &["https"],
            "the project URL, e.g. https://abcd.supabase.co",
        );
        let jwt_secret = l.optional_secret(
            "SUPABASE_JWT_SECRET",
            "Project Settings → API → JWT secret (only for HS256 projects)",
            |v| {
                if v.len() >= 32 {
                    Ok(())
                } else {
                    Err("must be at least 32 characters")
                }
            },
        );
        Some(AuthConfig {
            supabase_url: supabase_url?,
            jwt_secret,
        })
    }

    pub fn issuer(&self) -> String {
        format!(
            "{}/auth/v1",
            self.supabase_url.as_str().trim_end_matches('/')
        )
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.issuer())
    }
}

/// The Supabase custom access token hook's Standard Webhooks secret.
#[derive(Debug, Clone)]
pub struct AuthHookConfig {
    pub secret: Secret,
}

impl AuthHookConfig {
    pub fn load(l: &mut Loader) -> Option<AuthHookConfig> {
        let secret = l.required_secret(
            "AUTH_HOOK_SECRET",
            "Authentication → Hooks → the secret shown, v1,whsec_<base64>",
            check_hook_secret,
        )?;
        Some(AuthHookConfig { secret })
    }
}

fn check_hook_secret(v: &str) -> Result<(), &'static str> {
    use base64::Engine as _;
    let b64 = v
        .strip_prefix("v1,whsec_")
        .ok_or("must start with v1,whsec_")?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "the part after v1,whsec_ is not base64")?;
    Ok(())
}

/// Upstash Redis over REST (rate limits). Required in production.
#[derive(Debug, Clone)]
pub struct UpstashConfig {
    pub rest_url: url::Url,
    pub rest_token: Secret,
}

impl UpstashConfig {
    /// `None` without a problem when unset outside production (the
    /// in-process limiter is used then, loudly).
    pub fn load(l: &mut Loader) -> Option<UpstashConfig> {
        let prod = l.app_env().is_production();
        if !prod && l.get("UPSTASH_REDIS_REST_URL").is_none() {
            return None;
        }
        let rest_url = l.url(
            "UPSTASH_REDIS_REST_URL",
            &["https"],
            "Upstash console → REST API → UPSTASH_REDIS_REST_URL",
        );
        let rest_token = l.required_secret(
            "UPSTASH_REDIS_REST_TOKEN",
            "Upstash console → REST API → UPSTASH_REDIS_REST_TOKEN",
            |_| Ok(()),
        );
        Some(UpstashConfig {
            rest_url: rest_url?,
            rest_token: rest_token?,
        })
    }
}

/// Whether rate limits apply (`RATE_LIMITS=off` only outside production:
/// tests of other behaviour and load tests of a single caller).
pub fn rate_limits_enabled(l: &mut Loader) -> bool {
    match l.get("RATE_LIMITS").as_deref() {
        None | Some("on") => true,
        Some("off") if !l.app_env().is_production() => false,
        Some("off") => {
            l.problem(
                "RATE_LIMITS",
                "cannot be off in production",
                "remove RATE_LIMITS from the production environment",
            );
            true
        }
        Some(_) => {
            l.problem("RATE_LIMITS", "must be on or off", "default: on");
            true
        }
    }
}

/// The Stripe API (purchases, reconciliation, payouts).
#[derive(Debug, Clone)]
pub struct StripeApiConfig {
    pub secret_key: Secret,
    pub api_base: url::Url,
}

impl StripeApiConfig {
    pub fn load(l: &mut Loader) -> Option<StripeApiConfig> {
        let secret_key = l.required_secret(
            "STRIPE_SECRET_KEY",
            "Stripe dashboard → Developers → API keys (sk_live_… in production)",
            |v| {
                if v.starts_with("sk_") || v.starts_with("rk_") {
                    Ok(())
                } else {
                    Err("must start with sk_ (or rk_ for a restricted key)")
                }
            },
        );
        if l.app_env().is_production()
            && l.get("STRIPE_SECRET_KEY")
                .is_some_and(|v| v.starts_with("sk_test_"))
        {
            l.warn("STRIPE_SECRET_KEY is a test key (sk_test_) in production");
        }
        let api_base = base_url(l, "STRIPE_API_BASE", "https://api.stripe.com");
        Some(StripeApiConfig {
            secret_key: secret_key?,
            api_base: api_base?,
        })
    }
}

/// Stripe webhook signature verification.
#[derive(Debug, Clone)]
pub struct StripeWebhookConfig {
    pub webhook_secret: Secret,
}

impl StripeWebhookConfig {
    pub fn load(l: &mut Loader) -> Option<StripeWebhookConfig> {
        let webhook_secret = l.required_secret(
            "STRIPE_WEBHOOK_SECRET",
            "Stripe dashboard → Webhooks → signing secret (whsec_…)",
            |v| {
                if v.starts_with("whsec_") {
                    Ok(())
                } else {
                    Err("must start with whsec_")
                }
            },
        )?;
        Some(StripeWebhookConfig { webhook_secret })
    }
}

/// Stripe Connect webhook verification: the Connect endpoint (events of
/// connected accounts: `account.updated`, `capability.updated`,
/// `payout.*`) has its own signing secret, distinct from the platform
/// endpoint's `STRIPE_WEBHOOK_SECRET` (issue 12, ADR 0019).
#[derive(Debug, Clone)]
pub struct StripeConnectWebhookConfig {
    pub webhook_secret: Secret,
}

impl StripeConnectWebhookConfig {
    pub fn load(l: &mut Loader) -> Option<StripeConnectWebhookConfig> {
        let webhook_secret = l.required_secret(
            "STRIPE_CONNECT_WEBHOOK_SECRET",
            "Stripe dashboard → Webhooks → the endpoint listening to events on connected \
             accounts (/api/webhooks/stripe-connect) → signing secret (whsec_…)",
            |v| {
                if v.starts_with("whsec_") {
                    Ok(())
                } else {
                    Err("must start with whsec_")
                }
            },
        )?;
        Some(StripeConnectWebhookConfig { webhook_secret })
    }
}

/// Where Stripe's hosted onboarding sends a creator back: pages of the web
/// app under `APP_BASE_URL` (`/payouts/onboarding/return` and, for an
/// expired link, `/payouts/onboarding/refresh`, which signs the creator in
/// again and asks for a fresh link).
#[derive(Debug, Clone)]
pub struct AppLinksConfig {
    pub app_base_url: url::Url,
}

impl AppLinksConfig {
    pub fn load(l: &mut Loader) -> Option<AppLinksConfig> {
        let app_base_url = l.url(
            "APP_BASE_URL",
            &["https"],
            "the web app's public URL, e.g. https://app.stagepass.app",
        )?;
        Some(AppLinksConfig { app_base_url })
    }
}

/// Agora RTC token signing (`stagepass_integrations::agora`, ADR 0017).
/// Loaded only by the functions that issue call tokens.
#[derive(Debug, Clone)]
pub struct AgoraConfig {
    /// `AGORA_APP_ID`: public (every token carries it in clear).
    pub app_id: String,
    /// `AGORA_APP_CERTIFICATE`: signs the tokens. `Debug` prints
    /// `[REDACTED]`; no problem message echoes it.
    pub app_certificate: Secret,
}

impl AgoraConfig {
    pub fn load(l: &mut Loader) -> Option<AgoraConfig> {
        // Agora's builders refuse anything else; the exact characters are
        // kept (the certificate's bytes are what is signed, case included).
        fn hex32(v: &str) -> Result<(), &'static str> {
            if v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(())
            } else {
                Err("must be 32 hexadecimal characters")
            }
        }
        const ID_HINT: &str =
            "Agora console → Projects → your project → App ID (32 hexadecimal characters)";
        const CERT_HINT: &str = "Agora console → Projects → your project → Security → \
             Primary Certificate (32 hexadecimal characters; the project must use \
             \"App ID + Token\" authentication)";
        let app_id = match l.required("AGORA_APP_ID", ID_HINT) {
            Some(v) if hex32(&v).is_ok() => Some(v),
            Some(_) => {
                l.problem("AGORA_APP_ID", "must be 32 hexadecimal characters", ID_HINT);
                None
            }
            None => None,
        };
        let app_certificate = l.required_secret("AGORA_APP_CERTIFICATE", CERT_HINT, hex32);
        if let (Some(id), Some(cert)) = (&app_id, &app_certificate)
            && id.eq_ignore_ascii_case(cert.expose_secret())
        {
            l.problem(
                "AGORA_APP_CERTIFICATE",
                "is the App ID, not the certificate",
                CERT_HINT,
            );
            return None;
        }
        Some(AgoraConfig {
            app_id: app_id?,
            app_certificate: app_certificate?,
        })
    }
}

#[cfg(test)]
mod agora_config_tests {
    use super::*;

    const ID: &str = "970CA35de60c44645bbae8a215061b33";
    const CERT: &str = "5CFd2fd1755d40ecb72977518be15d3b";

    #[test]
    fn agora_settings_load_as_given() {
        let mut l = Loader::from_map([("AGORA_APP_ID", ID), ("AGORA_APP_CERTIFICATE", CERT)]);
        let agora = AgoraConfig::load(&mut l).expect("agora");
        assert!(l.finish().is_ok());
        assert_eq!(agora.app_id, ID);
        assert_eq!(agora.app_certificate.expose_secret(), CERT);
        let debug = format!("{agora:?}");
        assert!(debug.contains(ID), "{debug}");
        assert!(
            !debug.contains(CERT),
            "Debug shows the certificate: {debug}"
        );
        assert!(!debug.to_lowercase().contains("5cfd2fd1"), "{debug}");
        // Only the certificate is a secret (deploy templates mark it so).
        let mut l = Loader::from_map([("AGORA_APP_ID", ID), ("AGORA_APP_CERTIFICATE", CERT)]);
        let _ = AgoraConfig::load(&mut l);
        let asked = l.asked();
        assert_eq!(asked.get("AGORA_APP_ID"), Some(&false));
        assert_eq!(asked.get("AGORA_APP_CERTIFICATE"), Some(&true));
    }

    #[test]
    fn agora_settings_are_checked_without_echoing_the_certificate() {
        let problems = |pairs: &[(&str, &str)]| {
            let mut l = Loader::from_map(pairs.iter().copied());
            assert!(AgoraConfig::load(&mut l).is_none(), "{pairs:?}");
            l.finish().expect_err("refused")
        };
        let missing = problems(&[]);
        let vars: Vec<_> = missing.0.iter().map(|p| p.variable).collect();
        assert_eq!(vars, ["AGORA_APP_ID", "AGORA_APP_CERTIFICATE"]);
        assert!(missing.0.iter().all(|p| p.hint.contains("Agora console")));

        let bad_cert = "5CFd2fd1755d40ecb72977518be15d3z";
        for (id, cert) in [
            (ID, bad_cert),
            (ID, "5CFd2fd1755d40ecb72977518be15d3"),
            (ID, "5CFd2fd1755d40ecb72977518be15d3b0"),
        ] {
            let e = problems(&[("AGORA_APP_ID", id), ("AGORA_APP_CERTIFICATE", cert)]);
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].variable, "AGORA_APP_CERTIFICATE");
            assert!(!e.to_string().contains(cert), "echoed: {e}");
        }
        let e = problems(&[
            ("AGORA_APP_ID", "not-an-app-id"),
            ("AGORA_APP_CERTIFICATE", CERT),
        ]);
        assert_eq!(e.0[0].variable, "AGORA_APP_ID");
        assert!(!e.to_string().contains(CERT), "echoed: {e}");
        // The App ID pasted twice.
        let e = problems(&[("AGORA_APP_ID", ID), ("AGORA_APP_CERTIFICATE", ID)]);
        assert_eq!(e.0[0].variable, "AGORA_APP_CERTIFICATE");
        assert!(e.0[0].problem.contains("is the App ID"), "{e}");
    }
}

/// Ably realtime.
#[derive(Debug, Clone)]
pub struct AblyConfig {
    pub api_key: Secret,
    pub api_base: url::Url,
}

impl AblyConfig {
    pub fn load(l: &mut Loader) -> Option<AblyConfig> {
        let api_key = l.required_secret(
            "ABLY_API_KEY",
            "Ably dashboard → API keys, name:secret",
            |v| match v.split_once(':') {
                Some((name, secret)) if name.contains('.') && !secret.is_empty() => Ok(()),
                _ => Err("must be of the form appId.keyId:secret"),
            },
        );
        let api_base = base_url(l, "ABLY_API_BASE", "https://rest.ably.io");
        Some(AblyConfig {
            api_key: api_key?,
            api_base: api_base?,
        })
    }
}

/// QStash publishing and callback verification.
#[derive(Debug, Clone)]
pub struct QstashConfig {
    pub token: Secret,
    pub current_signing_key: Secret,
    pub next_signing_key: Secret,
    pub url: url::Url,
    /// Public base URL of this deployment (callback URLs are built from it).
    pub public_base_url: url::Url,
}

impl QstashConfig {
    pub fn load(l: &mut Loader) -> Option<QstashConfig> {
        let token = l.required_secret(
            "QSTASH_TOKEN",
            "Upstash console → QStash → token",
            |_| Ok(()),
        );
        let sig = |v: &str| {
            if v.starts_with("sig_") {
                Ok(())
            } else {
                Err("must start with sig_")
            }
        };
        let current = l.required_secret(
            "QSTASH_CURRENT_SIGNING_KEY",
            "Upstash console → QStash → signing keys",
            sig,
        );
        let next = l.required_secret(
            "QSTASH_NEXT_SIGNING_KEY",
            "Upstash console → QStash → signing keys",
            sig,
        );
        let url = base_url(l, "QSTASH_URL", "https://qstash.upstash.io");
        let public_base_url = l.url(
            "PUBLIC_BASE_URL",
            &["https"],
            "the deployment's public URL, e.g. https://api.stagepass.app",
        );
        Some(QstashConfig {
            token: token?,
            current_signing_key: current?,
            next_signing_key: next?,
            url: url?,
            public_base_url: public_base_url?,
        })
    }
}

/// Vercel Cron's shared secret.
#[derive(Debug, Clone)]
pub struct CronConfig {
    pub secret: Secret,
}

impl CronConfig {
    pub fn load(l: &mut Loader) -> Option<CronConfig> {
        let secret = l.required_secret(
            "CRON_SECRET",
            "a random string of at least 16 characters, set in Vercel's project settings",
            |v| {
                if v.len() >= 16 {
                    Ok(())
                } else {
                    Err("must be at least 16 characters")
                }
            },
        )?;
        Some(CronConfig { secret })
    }
}

/// Agora's notification (NCS) secret: signs the channel events Agora sends
/// to `POST /api/webhooks/agora` (`Agora-Signature-V2`). Loaded only by
/// that function.
#[derive(Debug, Clone)]
pub struct AgoraNotificationConfig {
    pub secret: Secret,
}

impl AgoraNotificationConfig {
    pub fn load(l: &mut Loader) -> Option<AgoraNotificationConfig> {
        let secret = l.required_secret(
            "AGORA_NOTIFICATION_SECRET",
            "Agora console → your project → Notifications → the secret shown for the \
             webhook of /api/webhooks/agora",
            |v| {
                if v.len() < 16 {
                    Err("must be at least 16 characters")
                } else if !v.bytes().all(|b| b.is_ascii_graphic()) {
                    Err("must be visible ASCII characters without spaces")
                } else {
                    Ok(())
                }
            },
        )?;
        Some(AgoraNotificationConfig { secret })
    }
}

/// A third-party base URL: defaults to the real service.
fn base_url(l: &mut Loader, name: &'static str, default: &str) -> Option<url::Url> {
    match l.get(name) {
        None => url::Url::parse(default).ok(),
        Some(_) => l.url(name, &["https"], "leave unset to use the real service"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Production is the default wherever the process runs deployed.
    #[test]
    fn a_deployment_without_app_env_runs_as_production() {
        for platform in [
            ("VERCEL_ENV", "production"),
            ("VERCEL_ENV", "preview"),
            ("AWS_LAMBDA_FUNCTION_NAME", "stagepass-v1-me"),
        ] {
            let l = Loader::from_map([platform]);
            assert_eq!(l.app_env(), AppEnv::Production, "{platform:?}");
            assert!(
                l.app_env_reason()
                    .contains(&format!("{}={}", platform.0, platform.1)),
                "{}",
                l.app_env_reason()
            );
            // Said at every cold start until APP_ENV is set explicitly.
            let warnings = l.finish().expect("no problem");
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with("running as production")),
                "{warnings:?}"
            );
        }
        // And it brings the production rules: the in-process limiter is not
        // enough, `RATE_LIMITS=off` is refused.
        let mut l = Loader::from_map([("VERCEL_ENV", "preview"), ("RATE_LIMITS", "off")]);
        assert!(rate_limits_enabled(&mut l));
        assert!(UpstashConfig::load(&mut l).is_none());
        let vars: Vec<_> = l.finish().expect_err("production rules").0;
        let vars: Vec<_> = vars.iter().map(|p| p.variable).collect();
        assert!(vars.contains(&"RATE_LIMITS"), "{vars:?}");
        assert!(vars.contains(&"UPSTASH_REDIS_REST_URL"), "{vars:?}");
    }

    #[test]
    fn local_runs_stay_development() {
        for vars in [
            vec![],
            // `vercel dev` on a laptop.
            vec![("VERCEL_ENV", "development")],
            vec![("APP_ENV", "development")],
        ] {
            let l = Loader::from_map(vars.clone());
            assert_eq!(l.app_env(), AppEnv::Development, "{vars:?}");
            assert!(l.finish().expect("ok").is_empty(), "{vars:?}");
        }
        let l = Loader::from_map([("APP_ENV", "test")]);
        assert_eq!(l.app_env(), AppEnv::Test);
        assert_eq!(l.app_env_reason(), "APP_ENV=test");
    }

    #[test]
    fn development_or_test_on_a_deployment_is_refused() {
        for (app_env, platform) in [
            ("development", ("VERCEL_ENV", "preview")),
            ("development", ("VERCEL_ENV", "production")),
            ("test", ("AWS_LAMBDA_FUNCTION_NAME", "stagepass-v1-me")),
        ] {
            let l = Loader::from_map([("APP_ENV", app_env), platform]);
            // Checked with the production rules so the whole list shows.
            assert_eq!(l.app_env(), AppEnv::Production);
            let errors = l.finish().expect_err("refused");
            assert_eq!(errors.0.len(), 1, "{errors}");
            assert_eq!(errors.0[0].variable, "APP_ENV");
            assert!(errors.0[0].problem.contains(platform.0), "{errors}");
        }
        // Explicit production on a deployment: no problem, no warning.
        let l = Loader::from_map([("APP_ENV", "production"), ("VERCEL_ENV", "preview")]);
        assert_eq!(l.app_env(), AppEnv::Production);
        assert_eq!(l.app_env_reason(), "APP_ENV=production");
        assert!(l.finish().expect("ok").is_empty());
        // A typo is a problem; where deployed it is still checked as production.
        let l = Loader::from_map([("APP_ENV", "prod"), ("VERCEL_ENV", "production")]);
        assert_eq!(l.app_env(), AppEnv::Production);
        assert!(l.finish().is_err());
    }

    #[test]
    fn reports_every_problem_at_once_without_echoing_secrets() {
        let mut l = Loader::from_map([
            ("APP_ENV", "production"),
            ("DATABASE_URL", "mysql://user:hunter2-very-secret@db/x"),
            ("SUPABASE_JWT_SECRET", "short-secret-value"),
            ("STRIPE_SECRET_KEY", "pk_live_abcdef123"),
        ]);
        let _ = CoreConfig::load(&mut l);
        let _ = DbConfig::load(&mut l);
        let _ = AuthConfig::load(&mut l);
        let _ = StripeApiConfig::load(&mut l);
        let _ = StripeWebhookConfig::load(&mut l);
        let errors = l.finish().expect_err("must fail");
        let vars: Vec<_> = errors.0.iter().map(|p| p.variable).collect();
        for v in [
            "ALLOWED_ORIGINS",
            "DATABASE_URL",
            "SUPABASE_URL",
            "SUPABASE_JWT_SECRET",
            "STRIPE_SECRET_KEY",
            "STRIPE_WEBHOOK_SECRET",
        ] {
            assert!(vars.contains(&v), "{v} missing from {vars:?}");
        }
        let text = errors.to_string();
        for secret in [
            "hunter2-very-secret",
            "short-secret-value",
            "pk_live_abcdef123",
        ] {
            assert!(!text.contains(secret), "secret echoed: {text}");
        }
    }

    #[test]
    fn a_valid_environment_loads() {
        let mut l = Loader::from_map([
            ("APP_ENV", "production"),
            (
                "ALLOWED_ORIGINS",
                "https://stagepass.app, https://www.stagepass.app",
            ),
            ("DATABASE_URL", "postgres://app:pw@db:5432/postgres"),
            ("SUPABASE_URL", "https://abcd.supabase.co"),
        ]);
        let core = CoreConfig::load(&mut l);
        let db = DbConfig::load(&mut l).expect("db");
        let auth = AuthConfig::load(&mut l).expect("auth");
        assert!(l.finish().is_ok());
        assert_eq!(core.allowed_origins.len(), 2);
        assert_eq!(auth.issuer(), "https://abcd.supabase.co/auth/v1");
        assert_eq!(db.max_connections, 4);
        assert!(!format!("{db:?}").contains("pw@"), "Debug leaks the URL");
    }

    #[test]
    fn production_refuses_http_urls_development_accepts_them() {
        let mut prod = Loader::from_map([("APP_ENV", "production"), ("SUPABASE_URL", "http://x")]);
        assert!(AuthConfig::load(&mut prod).is_none());
        let mut dev = Loader::from_map([("SUPABASE_URL", "http://127.0.0.1:3000")]);
        assert!(AuthConfig::load(&mut dev).is_some());
    }

    #[test]
    fn production_database_connections_are_encrypted_and_should_be_verified() {
        let load = |url: &str| {
            let mut l = Loader::from_map([("APP_ENV", "production"), ("DATABASE_URL", url)]);
            let loaded = DbConfig::load(&mut l).is_some();
            let warnings = l.warnings().len();
            (loaded, warnings, l.finish().is_ok())
        };
        for clear in ["disable", "allow"] {
            let (_, _, ok) = load(&format!("postgres://a:b@db/x?sslmode={clear}"));
            assert!(!ok, "{clear} must be refused in production");
        }
        for unverified in ["postgres://a:b@db/x", "postgres://a:b@db/x?sslmode=require"] {
            assert_eq!(load(unverified), (true, 1, true), "{unverified}");
        }
        let verified = "postgres://a:b@db/x?sslmode=verify-full&sslrootcert=/ca.pem";
        assert_eq!(load(verified), (true, 0, true));
        // Development: no opinion.
        let mut dev = Loader::from_map([("DATABASE_URL", "postgres://a:b@db/x?sslmode=disable")]);
        assert!(DbConfig::load(&mut dev).is_some());
        assert!(dev.warnings().is_empty() && dev.finish().is_ok());
    }

    /// A throwaway self-signed CA (public material, no key kept).
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBnjCCAUOgAwIBAgIUFmAzm20AsE9hrxljHFqFSuOc3i4wCgYIKoZIzj0EAwIw\nIzEhMB8GA1UEAwwYU3RhZ2VwYXNzIGNvbmZpZyB0ZXN0IENBMCAXDTI2MTEyOTIy\nNDIyOVoYDzIxMjYxMTA1MjI0MjI5WjAjMSEwHwYDVQQDDBhTdGFnZXBhc3MgY29u\nZmlnIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATPcwhpX636n6t8\nzMf+PxdUsfrHi6FRAxxC/UjBcorpZJrewLpSu0WJoy61JeuZsvvq/hBidc/XE1jo\n4Lbf99Qvo1MwUTAdBgNVHQ4EFgQUcT/eSWCyeyhfmjPt84hNCWvbG8QwHwYDVR0j\nBBgwFoAUcT/eSWCyeyhfmjPt84hNCWvbG8QwDwYDVR0TAQH/BAUwAwEB/zAKBggq\nhkjOPQQDAgNJADBGAiEAt0N+ln3RzgaWx64tsi+P0mhK/ldq1I0SM68eviqQoNIC\nIQDli02H/hIO1LfnVKSQo0aYPRZOuma3x3YCyr/XWndfgA==\n-----END CERTIFICATE-----";

    fn load_db(pairs: &[(&str, &str)]) -> (Option<DbConfig>, Result<Vec<String>, ConfigErrors>) {
        let mut l = Loader::from_map(pairs.iter().copied());
        let db = DbConfig::load(&mut l);
        (db, l.finish())
    }

    #[test]
    fn the_database_ca_comes_from_the_environment_and_is_checked() {
        let url = "postgres://a:b@db.example.supabase.co:5432/postgres?sslmode=verify-full";
        let (db, result) = load_db(&[
            ("APP_ENV", "production"),
            ("DATABASE_URL", url),
            ("DATABASE_CA_PEM", TEST_CA_PEM),
        ]);
        assert_eq!(result, Ok(vec![]), "verify-full with a CA: no warning");
        let db = db.expect("db");
        assert!(!format!("{db:?}").contains("MIIB"), "Debug echoes the CA");
        let pem = db.ca_pem.expect("ca");
        assert!(
            pem.expose_secret()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        // Pasted on one line with literal \n (some settings screens).
        let one_line = TEST_CA_PEM.replace('\n', "\\n");
        let (db, result) = load_db(&[("DATABASE_URL", url), ("DATABASE_CA_PEM", &one_line)]);
        assert!(result.is_ok() && db.is_some_and(|d| d.ca_pem.is_some()));

        let problem = |pem: &str, url: &str| {
            let (_, result) = load_db(&[("DATABASE_URL", url), ("DATABASE_CA_PEM", pem)]);
            let errors = result.expect_err("refused");
            assert!(
                errors.0.iter().all(|p| p.variable == "DATABASE_CA_PEM"),
                "{errors}"
            );
            assert!(!errors.to_string().contains("MIIB"), "the PEM is echoed");
            errors.to_string()
        };
        assert!(problem("not a certificate", url).contains("no PEM certificate"));
        let garbage = "-----BEGIN CERTIFICATE-----\nTUlJQm5qQ0NBVU9n\n-----END CERTIFICATE-----\n";
        assert!(problem(garbage, url).contains("not a valid X.509"));
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(problem(broken, url).contains("PEM"));
        let both = format!("{url}&sslrootcert=/var/task/ca.pem");
        assert!(problem(TEST_CA_PEM, &both).contains("sslrootcert"));
        let unverified = "postgres://a:b@db/x?sslmode=require";
        assert!(problem(TEST_CA_PEM, unverified).contains("sslmode=require"));
    }

    #[test]
    fn the_pool_mode_is_explicit_or_inferred_from_the_url() {
        let mode = |pairs: &[(&str, &str)]| load_db(pairs).0.expect("db").pool_mode;
        let direct = "postgres://a:b@db.abc.supabase.co:5432/postgres";
        let pooler = "postgres://a.abc:b@aws-0-eu-central-1.pooler.supabase.com:6543/postgres";
        assert_eq!(mode(&[("DATABASE_URL", direct)]), PoolMode::Session);
        assert_eq!(mode(&[("DATABASE_URL", pooler)]), PoolMode::Transaction);
        let flagged = "postgres://a:b@127.0.0.1:6432/x?pgbouncer=true&sslmode=disable";
        let (db, _) = load_db(&[("DATABASE_URL", flagged)]);
        let db = db.expect("db");
        assert_eq!(db.pool_mode, PoolMode::Transaction);
        // Ours, not sqlx's: removed from what sqlx parses; the rest kept.
        assert_eq!(
            db.url.expose_secret(),
            "postgres://a:b@127.0.0.1:6432/x?sslmode=disable"
        );
        assert_eq!(
            mode(&[("DATABASE_URL", pooler), ("DATABASE_POOL_MODE", "session")]),
            PoolMode::Session
        );
        assert_eq!(
            mode(&[
                ("DATABASE_URL", direct),
                ("DATABASE_POOL_MODE", "transaction")
            ]),
            PoolMode::Transaction
        );
        let (_, result) = load_db(&[
            ("DATABASE_URL", direct),
            ("DATABASE_POOL_MODE", "statement"),
        ]);
        assert_eq!(
            result.expect_err("refused").0[0].variable,
            "DATABASE_POOL_MODE"
        );
    }

    #[test]
    fn hook_secret_rule() {
        assert!(check_hook_secret("v1,whsec_aGVsbG8gd29ybGQ=").is_ok());
        assert!(check_hook_secret("whsec_aGVsbG8=").is_err());
        assert!(check_hook_secret("v1,whsec_***").is_err());
    }
}

#[cfg(test)]
mod sentry_settings_tests {
    use super::*;

    #[test]
    fn traces_sample_rate_defaults_to_zero_and_must_be_a_share() {
        let mut l = Loader::from_map([("APP_ENV", "test")]);
        assert_eq!(CoreConfig::load(&mut l).traces_sample_rate, 0.0);
        let mut l = Loader::from_map([("SENTRY_TRACES_SAMPLE_RATE", "0.25")]);
        assert_eq!(CoreConfig::load(&mut l).traces_sample_rate, 0.25);
        assert!(l.finish().is_ok());
        for bad in ["1.5", "-0.1", "NaN", "ten percent", "inf"] {
            let mut l = Loader::from_map([("SENTRY_TRACES_SAMPLE_RATE", bad)]);
            let core = CoreConfig::load(&mut l);
            assert_eq!(core.traces_sample_rate, 0.0, "{bad}");
            let errors = l.finish().expect_err(bad);
            assert_eq!(errors.0[0].variable, "SENTRY_TRACES_SAMPLE_RATE");
        }
    }

    #[test]
    fn release_is_the_deployed_commit_else_the_package_version() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(release(&Loader::from_map([("APP_ENV", "test")])), version);
        let vercel = Loader::from_map([("VERCEL_GIT_COMMIT_SHA", "0a1b2c3d")]);
        assert_eq!(release(&vercel), "0a1b2c3d");
        // Set by the deployment itself (Lambda): wins over Vercel's.
        let own = Loader::from_map([
            ("VERCEL_GIT_COMMIT_SHA", "0a1b2c3d"),
            ("STAGEPASS_RELEASE", "4e5f6a7b"),
        ]);
        assert_eq!(release(&own), "4e5f6a7b");
        let odd = Loader::from_map([("STAGEPASS_RELEASE", "../../etc")]);
        assert_eq!(release(&odd), version);
    }
}
