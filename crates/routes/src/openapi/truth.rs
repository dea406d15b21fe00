//! What the handlers' annotations cannot say, added to the generated
//! document so that it tells the truth about every response (ADR 0012):
//!
//! - every error is `application/problem+json` with the real problem body
//!   ([`problem_schema`], checked against `ApiError::body_json` by a test);
//! - the responses the shared stack can give on *every* route are listed on
//!   every operation: 400 (a repeated query parameter, a non-UUID id, a
//!   field that fails validation), 401 with its `WWW-Authenticate`
//!   challenge where a credential is required, 404 where the path names a
//!   resource, 413 (the body limit), 415 where a JSON body is parsed, 429
//!   and 503 with `Retry-After` and the `RateLimit` headers where a limiter
//!   runs, and the `RateLimit` headers on successes of limited routes;
//! - the length, range and character rules of the real validators
//!   ([`constrain`]), next to which of them the handlers enforce;
//! - the realtime messages' schemas (`docs/realtime/*.schema.json`).
//!
//! The facts come from the code where it has them: which routes are limited
//! from each function's [`Limits`], which are signed from the security
//! requirements, the token packages from `PACKAGES`, the limits from the
//! handlers' constants. A route added later (in the existing annotation
//! style) gets all of this without doing anything.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use stagepass_platform::serve::Limits;

use crate::FUNCTIONS;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Routes that read their body as raw bytes (signatures are computed over
/// them): no 415, and the body schema describes what is expected, not what
/// a content type promises.
const RAW_BODY: [&str; 4] = [
    "/api/webhooks/stripe",
    "/api/v1/auth/access-token-hook",
    "/api/jobs/class-reminder",
    "/api/v1/realtime/token",
];

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The realtime messages: component name, message name, schema file.
pub const REALTIME: [(&str, &str, &str); 9] = [
    (
        "RealtimeTipReceived",
        "tip.received",
        include_str!("../../../../docs/realtime/tip.received.schema.json"),
    ),
    (
        "RealtimeBalanceUpdated",
        "balance.updated",
        include_str!("../../../../docs/realtime/balance.updated.schema.json"),
    ),
    (
        "RealtimeClassUpdated",
        "class.updated",
        include_str!("../../../../docs/realtime/class.updated.schema.json"),
    ),
    (
        "RealtimeClassCancelled",
        "class.cancelled",
        include_str!("../../../../docs/realtime/class.cancelled.schema.json"),
    ),
    (
        "RealtimeClassReminder",
        "class.reminder",
        include_str!("../../../../docs/realtime/class.reminder.schema.json"),
    ),
    (
        "RealtimeCallUpdated",
        "call.updated",
        include_str!("../../../../docs/realtime/call.updated.schema.json"),
    ),
    (
        "RealtimeCallEnding",
        "call.ending",
        include_str!("../../../../docs/realtime/call.ending.schema.json"),
    ),
    (
        "RealtimePayoutUpdated",
        "payout.updated",
        include_str!("../../../../docs/realtime/payout.updated.schema.json"),
    ),
    (
        "RealtimePayoutAccountUpdated",
        "payout_account.updated",
        include_str!("../../../../docs/realtime/payout_account.updated.schema.json"),
    ),
];

/// Makes the generated document complete and truthful.
pub fn complete(doc: &mut Value) {
    if let Some(info) = doc.get_mut("info").and_then(Value::as_object_mut) {
        // utoipa copies Cargo's (empty) license; an empty name is no license.
        info.remove("license");
    }
    components(doc);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let limits = FUNCTIONS
            .iter()
            .find(|f| f.paths.contains(&path.as_str()))
            .map(|f| f.limits);
        for method in METHODS {
            if let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) {
                operation(path, op, limits);
            }
        }
    }
}

fn components(doc: &mut Value) {
    let components = object_at(doc, "components");
    let schemas = object_at_map(components, "schemas");
    schemas.insert("Problem".into(), problem_schema());
    schemas.insert("FieldError".into(), field_error_schema());
    constrain(schemas);
    for (name, _, text) in REALTIME {
        // Checked-in files, validated as JSON Schema by their own test.
        let mut schema: Value = serde_json::from_str(text).unwrap_or_default();
        if let Some(s) = schema.as_object_mut() {
            // Identity keywords of the standalone file; the component is
            // addressed by its name.
            s.remove("$schema");
            s.remove("$id");
        }
        schemas.insert(name.into(), schema);
    }

    // The answer of a route gated by a feature flag (ADR 0016): a gated
    // route's 403 refers to it (`$ref: #/components/responses/FeatureDisabled`).
    object_at_map(components, "responses").insert(
        "FeatureDisabled".into(),
        json!({
            "description": "`feature_disabled`: the route's feature flag is off for the caller \
                (`GET /api/v1/me` lists the caller's flags; a change reaches every function \
                within `FLAGS_CACHE_SECONDS`).",
            "content": problem_content(),
        }),
    );

    let headers = object_at_map(components, "headers");
    headers.insert(
        "Retry-After".into(),
        json!({
            "description": "Seconds to wait before retrying.",
            "schema": { "type": "integer", "minimum": 0 }
        }),
    );
    headers.insert(
        "RateLimit-Policy".into(),
        json!({
            "description": "The route's rate-limit policies \
                (draft-ietf-httpapi-ratelimit-headers): `\"name\";q=quota;w=window seconds`, \
                comma-separated, e.g. `\"burst\";q=2;w=1, \"money\";q=5;w=60`.",
            "schema": { "type": "string" }
        }),
    );
    headers.insert(
        "RateLimit".into(),
        json!({
            "description": "What is left of each policy: `\"name\";r=remaining;t=seconds until \
                more quota`, comma-separated. Absent when the limiter failed open.",
            "schema": { "type": "string" }
        }),
    );
    headers.insert(
        "WWW-Authenticate".into(),
        json!({
            "description": "The challenge (RFC 6750 for access tokens and the cron secret): \
                `Bearer realm=\"stagepass\"` when no token was sent, \
                `Bearer realm=\"stagepass\", error=\"invalid_token\"` when one was refused; \
                signed callers get `Upstash-Signature realm=\"stagepass\"` or \
                `Webhook-Signature realm=\"stagepass\"`.",
            "required": true,
            "schema": { "type": "string" }
        }),
    );

    let responses = object_at_map(components, "responses");
    for (name, response) in shared_responses() {
        responses.insert(name.into(), response);
    }
}

fn problem_content() -> Value {
    json!({ PROBLEM_JSON: { "schema": { "$ref": "#/components/schemas/Problem" } } })
}

fn header_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/headers/{name}") })
}

/// The responses every route may give, by component name.
fn shared_responses() -> Vec<(&'static str, Value)> {
    let rate_headers = || {
        json!({
            "Retry-After": header_ref("Retry-After"),
            "RateLimit-Policy": header_ref("RateLimit-Policy"),
            "RateLimit": header_ref("RateLimit"),
        })
    };
    vec![
        (
            "BadRequest",
            json!({
                "description": "`validation_failed` (each refused field is named in `errors`: \
                    a path id that is not a UUID, a query parameter given twice or out of range, \
                    a body field of the wrong type, length or value, an unknown field, a \
                    string or query value holding a refused character: NUL and other controls \
                    but tab and line breaks, invisible format characters but U+200D, U+2028/9, \
                    noncharacters) or `bad_request` (a body that is not JSON, a missing \
                    required header, a body sent with GET, HEAD or DELETE or to a POST route \
                    that takes none, where only an empty body or `{}` is accepted).",
                "content": problem_content(),
            }),
        ),
        (
            "Unauthorized",
            json!({
                "description": "`missing_token`, `invalid_token` (or, on signed routes, the \
                    signature's code). The challenge says which.",
                "headers": { "WWW-Authenticate": header_ref("WWW-Authenticate") },
                "content": problem_content(),
            }),
        ),
        (
            "NotFound",
            json!({
                "description": "`not_found`: no such resource, or not visible to the caller.",
                "content": problem_content(),
            }),
        ),
        (
            "PayloadTooLarge",
            json!({
                "description": "`payload_too_large`: a JSON body over 64 KiB, or any body over \
                    256 KiB.",
                "content": problem_content(),
            }),
        ),
        (
            "UnsupportedMediaType",
            json!({
                "description": "`unsupported_media_type`: the body must be sent as \
                    `application/json`.",
                "content": problem_content(),
            }),
        ),
        (
            "TooManyRequests",
            json!({
                "description": "`rate_limited`: `policy` names the exhausted policy and \
                    `retry_after_seconds` (also `Retry-After`) when to retry.",
                "headers": rate_headers(),
                "content": problem_content(),
            }),
        ),
        (
            "ServiceUnavailable",
            json!({
                "description": "A dependency is unavailable; retry after `Retry-After` when \
                    given: `rate_limiter_unavailable` (money routes fail closed), \
                    `database_busy`, `database_unavailable` (the connection was lost: retry), `auth_unavailable` (signing keys cannot be loaded), \
                    `not_configured`.",
                "headers": {
                    "Retry-After": header_ref("Retry-After"),
                    "RateLimit-Policy": header_ref("RateLimit-Policy"),
                },
                "content": problem_content(),
            }),
        ),
    ]
}

fn operation(path: &str, op: &mut Map<String, Value>, limits: Option<Limits>) {
    let secured = op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| {
            s.iter()
                .any(|r| r.as_object().is_some_and(|r| !r.is_empty()))
        });
    let has_body = op.contains_key("requestBody");
    let limited = limits.is_some_and(|l| !l.policies().is_empty());
    let path_params = path.contains('{');

    let responses = object_at_map(op, "responses");
    for (status, response) in responses.iter_mut() {
        let Some(response) = response.as_object_mut() else {
            continue;
        };
        if response.contains_key("$ref") {
            continue;
        }
        let code: u16 = status.parse().unwrap_or(0);
        if code >= 400 {
            // Whatever the annotation said, errors are problem documents.
            response.insert("content".into(), problem_content());
        }
        let headers = object_at_map(response, "headers");
        match code {
            401 => {
                headers.insert("WWW-Authenticate".into(), header_ref("WWW-Authenticate"));
            }
            429 => {
                for h in ["Retry-After", "RateLimit-Policy", "RateLimit"] {
                    headers.insert(h.into(), header_ref(h));
                }
            }
            503 => {
                headers.insert("Retry-After".into(), header_ref("Retry-After"));
            }
            200..=299 if limited => {
                headers.insert("RateLimit-Policy".into(), header_ref("RateLimit-Policy"));
                headers.insert("RateLimit".into(), header_ref("RateLimit"));
            }
            _ => {}
        }
        if headers.is_empty() {
            response.remove("headers");
        }
    }

    let mut add = |status: &str, component: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| json!({ "$ref": format!("#/components/responses/{component}") }));
    };
    // The shared query rule (a repeated parameter) applies on every route.
    add("400", "BadRequest");
    if secured || path == "/api/v1/auth/access-token-hook" {
        add("401", "Unauthorized");
    }
    if path_params {
        add("404", "NotFound");
    }
    // The body limit is the shared stack's, on every route.
    add("413", "PayloadTooLarge");
    if has_body && !RAW_BODY.contains(&path) {
        add("415", "UnsupportedMediaType");
    }
    if limited {
        add("429", "TooManyRequests");
    }
    // Liveness does no I/O; everything else has a dependency that can be
    // down (the limiter, the database, the signing keys).
    if !matches!(limits, Some(Limits::Exempt(_))) {
        add("503", "ServiceUnavailable");
    }

    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
        for p in params {
            // Query values get the body's character rules, single-line
            // (`guard::request_rules`, ADR 0013): a free-form string (a
            // cursor) says so; uuids, dates and numbers are narrower anyway.
            if p["in"] == "query"
                && p["schema"]["type"] == "string"
                && p["schema"].get("format").is_none()
                && p["schema"].get("pattern").is_none()
            {
                p["schema"]["pattern"] = json!(plain_text(""));
            }
            // A flag's key in the path: the key rule (`flags::valid_key`);
            // anything else is a 400 naming the field.
            if p["in"] == "path" && p["name"] == "key" && path.starts_with("/api/v1/admin/flags/") {
                p["schema"]["pattern"] = json!(stagepass_platform::flags::KEY_PATTERN);
            }
            if p["in"] == "header" && p["name"] == "Idempotency-Key" {
                p["schema"] = json!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": "^[!-~]+$",
                    "description": "1–255 visible ASCII characters (0x21–0x7E); a UUID is a \
                        good choice. The same key with the same body replays the first answer.",
                });
            }
        }
    }
}

/// The problem body exactly as `ApiError::into_response` sends it.
pub fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem document, sent as application/problem+json. \
            Members other than type, title, status and code are present only when they apply \
            (never null).",
        "required": ["type", "title", "status", "code"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri",
                "description": "https://docs.stagepass.app/problems/{code}",
            },
            "title": { "type": "string", "description": "Human-readable, per code." },
            "status": { "type": "integer", "minimum": 400, "maximum": 599 },
            "code": {
                "type": "string",
                "pattern": "^[a-z][a-z0-9_]*$",
                "description": "Stable machine-readable code, e.g. `validation_failed`, \
                    `insufficient_funds`, `rate_limited`. A route gated by a feature flag \
                    answers 403 `feature_disabled` when the flag is off for the caller \
                    (`GET /api/v1/me` lists the caller's flags).",
            },
            "detail": { "type": "string", "description": "Specifics (never for 5xx)." },
            "request_id": {
                "type": "string",
                "description": "Equals the `Request-Id` response header; quote it to support.",
            },
            "errors": {
                "type": "array",
                "minItems": 1,
                "description": "`validation_failed` only: every refused field.",
                "items": { "$ref": "#/components/schemas/FieldError" },
            },
            "policy": {
                "type": "string",
                "description": "`rate_limited` only: the exhausted policy, e.g. `money`.",
            },
            "retry_after_seconds": {
                "type": "integer",
                "minimum": 0,
                "description": "`rate_limited` only: equals `Retry-After`.",
            },
        },
    })
}

fn field_error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["field", "message"],
        "properties": {
            "field": {
                "type": "string",
                "description": "The field's path, e.g. `amount`, `items[2].amount`, `id` (a \
                    path parameter), `limit` (a query parameter), `body`.",
            },
            "message": { "type": "string" },
        },
        "additionalProperties": false,
    })
}

/// Characters refused in every text field besides the controls, from
/// `stagepass_platform::http::text::refused_ranges` (ADR 0013): the format
/// characters (General Category Cf: bidi overrides and isolates, zero-width
/// spaces and marks, the BOM, tag characters, …) except U+200D ZERO WIDTH
/// JOINER, which emoji sequences need; the line and paragraph separators
/// U+2028/9; the Unicode noncharacters. Astral code points are written as
/// the characters themselves: `\u{…}` is not understood by every regex
/// dialect that reads the document (Python's, Schemathesis'), a literal
/// character is, and ECMA-262 with the `u` flag (JSON Schema 2020-12's
/// recommendation) reads it as one code point. A test checks the result
/// against `text::is_forbidden`.
static FORMAT_CHARS: LazyLock<String> = LazyLock::new(|| {
    let one = |c: u32| {
        if c <= 0xFFFF {
            format!("\\u{c:04X}")
        } else {
            // The ranges are constants of valid code points (tested).
            char::from_u32(c).map(String::from).unwrap_or_default()
        }
    };
    stagepass_platform::http::text::refused_ranges()
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                one(lo)
            } else {
                format!("{}-{}", one(lo), one(hi))
            }
        })
        .collect()
});
/// What `str::trim` removes (Unicode White_Space, controls included: the
/// validators trim before they look for controls). Written out because
/// `\s` means different things in ECMAScript, Python and Rust.
const TRIMMED_SPACE: &str =
    r" \u0009-\u000D\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";
/// The part of [`TRIMMED_SPACE`] a body may carry at all: every string is
/// checked *before* a validator trims it, so the refused controls
/// (U+000B, U+000C, U+0085) and separators (U+2028/9) are refused even at
/// the edges.
const ALLOWED_SPACE: &str = r" \u0009\u000A\u000D\u00A0\u1680\u2000-\u200A\u202F\u205F\u3000";

/// A text field trimmed by its validator, then `min..=max` characters long
/// (`min` 0 or 1) with no controls but `allowed_controls` and no format
/// characters.
fn trimmed_text(min: u32, max: u32, allowed_controls: &str) -> String {
    let refused = refused_controls(allowed_controls);
    let space = format!("[{ALLOWED_SPACE}]");
    let format_chars = &*FORMAT_CHARS;
    let edge = format!("[^{TRIMMED_SPACE}{refused}{format_chars}]");
    let inner = format!("[^{refused}{format_chars}]");
    let text = format!("{edge}(?:{inner}{{0,{}}}{edge})?", max - 2);
    if min == 0 {
        format!("^{space}*(?:{text})?{space}*$")
    } else {
        format!("^{space}*{text}{space}*$")
    }
}

/// An untrimmed text field that must hold something other than white
/// space (`!value.trim().is_empty()`), with no controls but `allowed`.
fn not_blank_text(allowed_controls: &str) -> String {
    let refused = refused_controls(allowed_controls);
    let any = format!("[^{refused}{}]", *FORMAT_CHARS);
    format!("^{any}*[^{TRIMMED_SPACE}{refused}{}]{any}*$", *FORMAT_CHARS)
}

/// An untrimmed text field whose controls other than `allowed` are refused.
fn plain_text(allowed_controls: &str) -> String {
    let refused = refused_controls(allowed_controls);
    format!("^[^{refused}{}]*$", *FORMAT_CHARS)
}

/// The C0 and C1 controls (`char::is_control`) except the code points
/// listed in `allowed` (as `\u0009…`), as character-class ranges.
fn refused_controls(allowed: &str) -> String {
    let allowed: Vec<u32> = allowed
        .split("\\u")
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        .collect();
    let refused: Vec<u32> = (0u32..=0x1F)
        .chain(0x7F..=0x9F)
        .filter(|c| !allowed.contains(c))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while i < refused.len() {
        let start = refused[i];
        let mut end = start;
        while i + 1 < refused.len() && refused[i + 1] == end + 1 {
            i += 1;
            end = refused[i];
        }
        if start == end {
            out.push_str(&format!("\\u{start:04X}"));
        } else {
            out.push_str(&format!("\\u{start:04X}-\\u{end:04X}"));
        }
        i += 1;
    }
    out
}

const LINE_BREAKS_AND_TAB: &str = r"\u0009\u000A\u000D";

/// The validators' rules, per request schema and field.
#[expect(
    clippy::panic,
    reason = "a field missing from the annotations is a bug the OpenAPI tests find"
)]
fn constrain(schemas: &mut Map<String, Value>) {
    let set = |schemas: &mut Map<String, Value>, schema: &str, field: &str, rules: Value| {
        // A renamed field must not silently lose its rules (a test builds
        // the document).
        let Some(target) = schemas
            .get_mut(schema)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(field))
            .and_then(Value::as_object_mut)
        else {
            panic!("OpenAPI: {schema}.{field} is not in the document");
        };
        if let Some(rules) = rules.as_object() {
            for (k, v) in rules {
                target.insert(k.clone(), v.clone());
            }
        }
    };

    // POST /api/v1/tips (tips.rs).
    set(
        schemas,
        "TipRequest",
        "amount",
        json!({ "minimum": stagepass_ledger::MIN_TIP, "maximum": stagepass_ledger::MAX_TIP }),
    );
    set(
        schemas,
        "TipRequest",
        "message",
        json!({ "maxLength": 280, "pattern": plain_text(r"\u000A") }),
    );

    // Classes (classes.rs, SPEC §3): the same rules for a new class and a patch.
    for schema in ["NewClass", "ClassPatch"] {
        set(
            schemas,
            schema,
            "title",
            json!({ "pattern": trimmed_text(1, 120, ""),
                    "description": "1–120 characters once trimmed, on one line: no control \
                        characters (tab and line breaks only at the trimmed edges), no invisible \
                        format characters but U+200D, no U+2028/9, no noncharacters." }),
        );
        set(
            schemas,
            schema,
            "description",
            json!({ "maxLength": 5000, "pattern": plain_text(LINE_BREAKS_AND_TAB) }),
        );
        set(
            schemas,
            schema,
            "time_zone",
            json!({ "maxLength": 64,
                    "pattern": "^(UTC|[A-Za-z]+(/[A-Za-z0-9_+-]+)+)$",
                    "examples": ["Europe/Berlin", "America/New_York", "UTC"],
                    "description": "An IANA zone name the database knows, such as \
                        `Europe/Berlin`, or `UTC` (abbreviations and POSIX rules are refused)." }),
        );
        set(
            schemas,
            schema,
            "duration_minutes",
            json!({ "minimum": 15, "maximum": 480 }),
        );
        set(
            schemas,
            schema,
            "capacity",
            json!({ "minimum": 1, "maximum": 1000 }),
        );
        set(
            schemas,
            schema,
            "price_tokens",
            json!({ "minimum": 0, "maximum": 100_000 }),
        );
        set(
            schemas,
            schema,
            "starts_at",
            json!({ "description": "In the future (refused with 400 otherwise).",
                    "examples": ["2099-06-01T18:00:00Z"] }),
        );
    }

    // PATCH /api/v1/me (me.rs): at least one of the two, trimmed.
    set(
        schemas,
        "MePatch",
        "handle",
        json!({ "pattern": format!("^[{ALLOWED_SPACE}]*[A-Za-z0-9_]{{3,30}}[{ALLOWED_SPACE}]*$"),
                "description": "3–30 characters of a-z, 0-9 and _ (case-insensitive; stored \
                    lower-case)." }),
    );
    set(
        schemas,
        "MePatch",
        "display_name",
        json!({ "pattern": trimmed_text(1, 60, ""),
                "description": "1–60 characters once trimmed, no control or invisible format \
                    characters." }),
    );
    // A patch must change something: at least one field given, not null.
    for schema in ["MePatch", "ClassPatch"] {
        at_least_one_field(schemas, schema);
    }

    // PUT /api/v1/admin/users/{id}/role (admin.rs).
    set(
        schemas,
        "RoleChange",
        "reason",
        json!({ "maxLength": 500, "pattern": plain_text(LINE_BREAKS_AND_TAB) }),
    );

    // POST /api/v1/admin/users/{id}/grants (grants.rs, ledger::grants):
    // 1–10,000 tokens; a reason of at most 500 characters, not blank, with
    // no control character at all (tab and line breaks included).
    set(
        schemas,
        "GrantRequest",
        "amount",
        json!({ "minimum": stagepass_ledger::grants::MIN_GRANT,
                "maximum": stagepass_ledger::grants::MAX_GRANT }),
    );
    set(
        schemas,
        "GrantRequest",
        "reason",
        json!({ "maxLength": stagepass_ledger::grants::MAX_REASON_CHARS,
                "pattern": not_blank_text(""),
                "description": "Why (kept in the audit trail): 1–500 characters, not only \
                    spaces, no control characters (tab and line breaks included), no invisible \
                    format characters." }),
    );

    // PUT /api/v1/admin/payout-holds/{id} (payouts.rs): the reason is logged.
    set(
        schemas,
        "HoldRequest",
        "reason",
        json!({ "maxLength": 500, "pattern": not_blank_text(""),
                "description": "Why (logged with the admin's id): 1–500 characters, not only \
                    spaces, no control characters (tab and line breaks included), no invisible \
                    format characters." }),
    );

    // Feature flags (flags.rs, platform::flags, ADR 0016): the same rules for
    // a new flag and a change.
    {
        use stagepass_platform::flags::{BUCKETS, MAX_LIST_USERS, MAX_TEXT_CHARS, ROLES};
        set(
            schemas,
            "NewFlag",
            "key",
            json!({ "pattern": stagepass_platform::flags::KEY_PATTERN }),
        );
        for schema in ["NewFlag", "FlagPatch"] {
            for field in ["description", "reason"] {
                set(
                    schemas,
                    schema,
                    field,
                    json!({ "maxLength": MAX_TEXT_CHARS, "pattern": not_blank_text(""),
                            "description": "1–500 characters, not only spaces, no control \
                                characters (tab and line breaks included), no invisible format \
                                characters." }),
                );
            }
            set(
                schemas,
                schema,
                "rollout_basis_points",
                json!({ "minimum": 0, "maximum": BUCKETS,
                        "description": "Basis points of the users who pass the lists and \
                            roles: 500 = 5 %, 10,000 = all. A user's bucket (0–9,999) is a hash \
                            of the key and their id, so raising the rollout only adds users." }),
            );
            for field in ["allow_users", "deny_users"] {
                set(
                    schemas,
                    schema,
                    field,
                    json!({ "maxItems": MAX_LIST_USERS }),
                );
            }
            set(
                schemas,
                schema,
                "roles",
                json!({ "description": format!("Empty or absent: every role; otherwise some of {}.",
                                              ROLES.join(", ")) }),
            );
        }
    }

    // POST /api/v1/tokens/purchases: one of the packages.
    let ids: Vec<&str> = stagepass_ledger::packages::PACKAGES
        .iter()
        .map(|p| p.id)
        .collect();
    set(
        schemas,
        "PurchaseRequest",
        "package",
        json!({ "enum": ids }),
    );
}

/// `anyOf` one non-null property: the validators refuse an empty patch
/// (`{}` or only nulls) with 400 `body`.
#[expect(
    clippy::panic,
    reason = "a schema missing from the annotations is a bug the OpenAPI tests find"
)]
fn at_least_one_field(schemas: &mut Map<String, Value>, schema: &str) {
    let Some(target) = schemas.get_mut(schema).and_then(Value::as_object_mut) else {
        panic!("OpenAPI: {schema} is not in the document");
    };
    let fields: Vec<String> = target
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        // No properties: no alternatives (the tests see the empty `anyOf`).
        .unwrap_or_default();
    let alternatives: Vec<Value> = fields
        .iter()
        .map(|f| json!({ "required": [f], "properties": { f: { "not": { "type": "null" } } } }))
        .collect();
    target.insert("anyOf".into(), Value::Array(alternatives));
    target.insert("minProperties".into(), json!(1));
}

#[expect(clippy::expect_used, reason = "an object was just put there")]
fn object_at<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    v[key]
        .as_object_mut()
        .expect("an object was just put there")
}

#[expect(clippy::expect_used, reason = "an object was just put there")]
fn object_at_map<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    if !m.get(key).is_some_and(Value::is_object) {
        m.insert(key.to_owned(), json!({}));
    }
    m.get_mut(key)
        .and_then(Value::as_object_mut)
        .expect("an object was just put there")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document's character classes refuse exactly what the server's
    /// text rule refuses, over every Unicode scalar value: the controls
    /// from `refused_controls`, the rest from `text::refused_ranges`.
    #[test]
    fn the_documented_characters_are_the_refused_ones() {
        use stagepass_platform::http::text::is_forbidden;
        let ranges = stagepass_platform::http::text::refused_ranges();
        let listed = |c: u32| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c));
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            let documented =
                (c.is_control() && !matches!(c, '\t' | '\n' | '\r')) || listed(u32::from(c));
            assert_eq!(documented, is_forbidden(c), "U+{:04X}", u32::from(c));
        }
        // Astral code points are literal characters, BMP ones escapes.
        assert!(FORMAT_CHARS.contains('\u{E0020}'));
        assert!(FORMAT_CHARS.contains(r"\u2028-\u202E"));
        assert!(!FORMAT_CHARS.contains(r"\u200D"));
    }

    #[test]
    fn refused_controls_lists_ranges_without_the_allowed_ones() {
        assert_eq!(refused_controls(""), r"\u0000-\u001F\u007F-\u009F");
        assert_eq!(
            refused_controls(LINE_BREAKS_AND_TAB),
            r"\u0000-\u0008\u000B-\u000C\u000E-\u001F\u007F-\u009F"
        );
    }
}
