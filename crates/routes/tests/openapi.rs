//! The OpenAPI document covers every function, and every function builds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions
)]

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use http::StatusCode;
use serde_json::Value;
use stagepass_platform::serve::Resources;
use stagepass_routes::FUNCTIONS;

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_is_served_and_lists_every_function_path() {
    let app = TestApp::new().await;
    let r = app.get("/api/v1/openapi.json").send().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.header("content-type")
    );
    let doc = r.json();
    let version = doc["openapi"].as_str().expect("openapi member");
    assert!(version.starts_with("3.1"), "OpenAPI version {version}");
    assert!(doc["info"]["title"].is_string());
    let paths = doc["paths"].as_object().expect("paths object");

    for function in FUNCTIONS {
        assert!(
            !function.paths.is_empty(),
            "{} serves no path",
            function.name
        );
        for path in function.paths {
            let item = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{} path {path} is not documented", function.name));
            let operations = HTTP_METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .count();
            assert!(operations > 0, "{path} has no operation");
        }
    }

    // And the other way round: nothing documented that no function serves.
    let served: BTreeSet<&str> = FUNCTIONS
        .iter()
        .flat_map(|f| f.paths.iter().copied())
        .collect();
    for documented in paths.keys() {
        assert!(
            served.contains(documented.as_str()),
            "{documented} is documented but no function serves it"
        );
    }

    // Every operation declares its responses; bearer routes name the scheme.
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    for (path, item) in paths {
        for method in HTTP_METHODS {
            if let Some(op) = item.get(method) {
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} has no responses"
                );
            }
        }
    }
    for (path, method) in [("/api/v1/me", "get"), ("/api/v1/me", "patch")] {
        assert!(
            paths[path][method]["security"].is_array(),
            "{method} {path} must declare bearer security"
        );
    }
    assert!(paths["/api/v1/admin/users/{id}/role"]["put"]["security"].is_array());

    // The alias serves the very same document.
    let alias = app.get("/api/v1/openapi").send().await;
    assert_eq!(alias.status, StatusCode::OK);
    assert_eq!(alias.json(), doc);
    assert_eq!(
        serde_json::from_str::<Value>(stagepass_routes::openapi::document()).expect("JSON"),
        doc
    );
}

#[test]
fn every_function_has_a_unique_name_and_unique_paths() {
    let mut names = BTreeSet::new();
    let mut paths = BTreeSet::new();
    for f in FUNCTIONS {
        assert!(names.insert(f.name), "duplicate function name {}", f.name);
        for p in f.paths {
            assert!(p.starts_with("/api/"), "{p} is not under /api/");
            assert!(paths.insert(*p), "path {p} served by two functions");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_function_router_builds_with_the_full_test_env() {
    // No database connection is made: the pool connects lazily.
    let env = common::test_env("postgres://stagepass_app@127.0.0.1:5432/unused");
    for function in FUNCTIONS {
        let mut loader = common::loader(&env);
        let resources = Resources::default();
        let built = (function.build)(&mut loader, &resources);
        match loader.finish() {
            Ok(warnings) => assert!(
                warnings.is_empty(),
                "{}: unexpected warnings {warnings:?}",
                function.name
            ),
            Err(e) => panic!("{}: configuration refused: {e}", function.name),
        }
        assert!(built.is_some(), "{} did not build a router", function.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn functions_needing_settings_report_them_instead_of_building() {
    // Liveness needs nothing; everything else reports what is missing.
    for function in FUNCTIONS {
        let mut loader = common::loader(&[]);
        let built = (function.build)(&mut loader, &Resources::default());
        let result = loader.finish();
        match function.name {
            "health" | "v1_openapi" | "v1_tokens_packages" => {
                assert!(
                    built.is_some(),
                    "{} must build with no settings",
                    function.name
                );
                assert!(result.is_ok());
            }
            _ => {
                assert!(built.is_none(), "{} built without settings", function.name);
                let errors = result.expect_err("problems recorded");
                assert!(
                    errors.0.iter().any(|p| p.variable == "DATABASE_URL"),
                    "{}: {errors}",
                    function.name
                );
            }
        }
    }
}

/// `api/v1/admin/users/[id]/role.rs` for `/api/v1/admin/users/{id}/role`.
fn api_file(path: &str) -> String {
    let file = path
        .trim_start_matches('/')
        .trim_end_matches(".json")
        .replace('{', "[")
        .replace('}', "]");
    format!("{file}.rs")
}

#[test]
fn every_function_has_an_api_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    for function in FUNCTIONS {
        let file = api_file(function.paths[0]);
        let entry = format!("name = \"{}\"\npath = \"{file}\"", function.name);
        assert!(
            manifest.contains(&entry),
            "root Cargo.toml lacks the [[bin]] {entry:?}"
        );
        let source =
            std::fs::read_to_string(root.join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            source.contains("serve::run(stagepass_routes::"),
            "{file} does not run a function"
        );
    }
}

// ---------------------------------------------------------------------------
// The document tells the truth (issue 14): where parameters are, what
// errors look like, which statuses and headers a route can answer with, and
// the validators' limits.

fn document() -> Value {
    serde_json::from_str(stagepass_routes::openapi::document()).expect("the document is JSON")
}

/// Follows a local `$ref` (`#/components/…`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => v,
    }
}

fn operations(doc: &Value) -> Vec<(String, &'static str, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in HTTP_METHODS {
            if let Some(op) = item.get(method) {
                out.push((path.clone(), method, op));
            }
        }
    }
    out
}

fn param<'a>(op: &'a Value, name: &str) -> &'a Value {
    op["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no parameter {name}"))
}

#[test]
fn query_parameters_are_optional_query_parameters() {
    let doc = document();
    for (path, names) in [
        ("/api/v1/classes", &["creator", "cursor", "limit"][..]),
        ("/api/v1/tokens/ledger", &["cursor", "limit"][..]),
    ] {
        let op = &doc["paths"][path]["get"];
        for name in names {
            let p = param(op, name);
            assert_eq!(p["in"], "query", "{path} {name}");
            assert_ne!(p["required"], true, "{path} {name} must be optional");
        }
        let limit = &param(op, "limit")["schema"];
        assert_eq!(limit["minimum"], 1, "{path}");
        assert_eq!(limit["maximum"], 100, "{path}");
    }
    assert_eq!(
        param(&doc["paths"]["/api/v1/classes"]["get"], "creator")["schema"]["format"],
        "uuid"
    );
    // The schedule's bounds are required by its validator (400 without).
    let schedule = &doc["paths"]["/api/v1/schedule"]["get"];
    for name in ["from", "to"] {
        let p = param(schedule, name);
        assert_eq!(p["in"], "query");
        assert_eq!(p["required"], true);
        assert_eq!(p["schema"]["format"], "date-time");
    }
    // Path parameters are exactly the path's template variables.
    for (path, method, op) in operations(&doc) {
        for p in op["parameters"].as_array().into_iter().flatten() {
            if p["in"] == "path" {
                let name = p["name"].as_str().unwrap_or_default();
                assert!(
                    path.contains(&format!("{{{name}}}")),
                    "{method} {path}: path parameter {name} is not in the path"
                );
            }
        }
    }
}

#[test]
fn every_error_is_a_problem_document_and_the_shared_statuses_are_listed() {
    let doc = document();
    let limited: BTreeSet<&str> = FUNCTIONS
        .iter()
        .filter(|f| !f.limits.policies().is_empty())
        .flat_map(|f| f.paths.iter().copied())
        .collect();
    for (path, method, op) in operations(&doc) {
        let responses = op["responses"].as_object().expect("responses");
        for (status, response) in responses {
            let response = resolve(&doc, response);
            let code: u16 = status.parse().expect("numeric status");
            if code >= 400 {
                let content = response["content"].as_object().expect("error content");
                assert_eq!(
                    content.keys().collect::<Vec<_>>(),
                    ["application/problem+json"],
                    "{method} {path} {status}"
                );
                assert_eq!(
                    content["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
            }
        }
        let has = |s: &str| responses.contains_key(s);
        assert!(
            has("400"),
            "{method} {path}: 400 (repeated query parameter)"
        );
        assert!(has("413"), "{method} {path}: 413 (body limit)");
        if path.contains('{') {
            assert!(has("404"), "{method} {path}: 404");
        }
        if op["security"].as_array().is_some_and(|s| !s.is_empty()) {
            let r401 = resolve(&doc, &responses["401"]);
            let header = resolve(&doc, &r401["headers"]["WWW-Authenticate"]);
            assert_eq!(header["required"], true, "{method} {path}");
        }
        if op["requestBody"]["content"]["application/json"].is_object()
            && !path.starts_with("/api/webhooks/")
            && !path.starts_with("/api/jobs/")
            && path != "/api/v1/auth/access-token-hook"
        {
            assert!(has("415"), "{method} {path}: 415");
        }
        if limited.contains(path.as_str()) {
            let r429 = resolve(&doc, &responses["429"]);
            for h in ["Retry-After", "RateLimit-Policy", "RateLimit"] {
                assert!(r429["headers"][h].is_object(), "{method} {path}: 429 {h}");
            }
            let r503 = resolve(&doc, &responses["503"]);
            assert!(
                r503["headers"]["Retry-After"].is_object(),
                "{method} {path}"
            );
            let ok = responses
                .iter()
                .find(|(s, _)| s.starts_with('2'))
                .map(|(_, r)| resolve(&doc, r))
                .expect("a success");
            assert!(
                ok["headers"]["RateLimit-Policy"].is_object(),
                "{method} {path}"
            );
        }
    }
}

/// The documented `Problem` has exactly the members of the body type the
/// server serialises (`ProblemBody`): every member, and as required exactly
/// those that are always sent. A member added to the type fails to compile
/// here (the literal below) until it is documented.
#[test]
fn the_problem_schema_has_exactly_the_members_of_the_body_type() {
    use stagepass_platform::http::FieldError;
    use stagepass_platform::http::problem::ProblemBody;
    let errors = [FieldError {
        field: "amount".into(),
        message: "too large".into(),
    }];
    let full = ProblemBody {
        type_: "https://docs.stagepass.app/problems/rate_limited".into(),
        title: "t",
        status: 429,
        code: "rate_limited",
        detail: Some("d".into()),
        request_id: Some("r".into()),
        errors: Some(&errors),
        policy: Some("money"),
        retry_after_seconds: Some(1),
    };
    let minimal = ProblemBody {
        type_: "https://docs.stagepass.app/problems/not_found".into(),
        title: "t",
        status: 404,
        code: "not_found",
        detail: None,
        request_id: None,
        errors: None,
        policy: None,
        retry_after_seconds: None,
    };
    let keys = |body: &ProblemBody<'_>| -> Vec<String> {
        let mut keys: Vec<String> = serde_json::to_value(body)
            .expect("serialises")
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    };
    let doc = document();
    let problem = &doc["components"]["schemas"]["Problem"];
    let mut documented: Vec<String> = problem["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect();
    documented.sort();
    let mut required: Vec<String> = problem["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    required.sort();
    assert_eq!(documented, keys(&full), "documented members");
    assert_eq!(required, keys(&minimal), "required members");
}

#[test]
fn the_problem_schema_describes_every_body_the_server_sends() {
    use stagepass_platform::http::{ApiError, FieldError};
    let doc = document();
    let problem = &doc["components"]["schemas"]["Problem"];
    let properties = problem["properties"].as_object().expect("properties");
    let required: Vec<&str> = problem["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let errors = [
        ApiError::Validation(vec![FieldError {
            field: "amount".into(),
            message: "must be between 1 and 10000".into(),
        }]),
        ApiError::BadRequest("the body is not valid JSON".into()),
        ApiError::Unauthenticated("invalid_token"),
        ApiError::Forbidden("creator_required"),
        ApiError::NotFound,
        ApiError::Conflict("class_full", "no seat left".into()),
        ApiError::PayloadTooLarge,
        ApiError::UnsupportedMediaType,
        ApiError::Unprocessable("insufficient_funds", "balance 3".into()),
        ApiError::RateLimited {
            policy: "money".into(),
            retry_after_seconds: 42,
        },
        ApiError::Unavailable("database_busy", "retry".into()),
    ];
    for error in errors {
        let body = error.body_json();
        let body = body.as_object().expect("an object");
        for key in &required {
            assert!(body.contains_key(*key), "{key} missing from {body:?}");
        }
        for (key, value) in body {
            let schema = properties
                .get(key)
                .unwrap_or_else(|| panic!("{key} is sent but not documented"));
            assert!(!value.is_null(), "{key} is sent as null");
            let ty = schema["type"].as_str().expect("a single type");
            let matches = match ty {
                "string" => value.is_string(),
                "integer" => value.is_u64() || value.is_i64(),
                "array" => value.is_array(),
                other => panic!("unexpected type {other}"),
            };
            assert!(matches, "{key}: {value} is not {ty}");
        }
    }
    // The rate-limit members (issue 9) and the per-field errors.
    assert!(properties.contains_key("policy"));
    assert!(properties.contains_key("retry_after_seconds"));
    let field_error = &doc["components"]["schemas"]["FieldError"];
    assert_eq!(
        field_error["required"],
        serde_json::json!(["field", "message"])
    );
}

#[test]
fn the_validators_limits_are_in_the_document() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let tip = &schemas["TipRequest"]["properties"];
    assert_eq!(tip["amount"]["minimum"], 1);
    assert_eq!(tip["amount"]["maximum"], 10_000);
    assert_eq!(tip["message"]["maxLength"], 280);
    for schema in ["NewClass", "ClassPatch"] {
        let p = &schemas[schema]["properties"];
        assert_eq!(p["duration_minutes"]["minimum"], 15, "{schema}");
        assert_eq!(p["duration_minutes"]["maximum"], 480, "{schema}");
        assert_eq!(p["capacity"]["minimum"], 1, "{schema}");
        assert_eq!(p["capacity"]["maximum"], 1000, "{schema}");
        assert_eq!(p["price_tokens"]["maximum"], 100_000, "{schema}");
        assert_eq!(p["description"]["maxLength"], 5000, "{schema}");
        assert!(
            p["title"]["pattern"]
                .as_str()
                .is_some_and(|r| r.contains("{0,118}"))
        );
        assert!(p["time_zone"]["pattern"].is_string());
    }
    assert!(
        schemas["MePatch"]["properties"]["handle"]["pattern"]
            .as_str()
            .is_some_and(|r| r.contains("[A-Za-z0-9_]{3,30}"))
    );
    assert_eq!(
        schemas["RoleChange"]["properties"]["reason"]["maxLength"],
        500
    );
    let packages: Vec<&str> = stagepass_ledger::packages::PACKAGES
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        schemas["PurchaseRequest"]["properties"]["package"]["enum"],
        serde_json::json!(packages)
    );
    // The admin grant (ADR 0011): 1–10,000 tokens, a reason of 1–500
    // characters without any control character.
    let grant = &schemas["GrantRequest"]["properties"];
    assert_eq!(grant["amount"]["minimum"], 1);
    assert_eq!(grant["amount"]["maximum"], 10_000);
    assert_eq!(grant["reason"]["maxLength"], 500);
    assert!(
        grant["reason"]["pattern"]
            .as_str()
            .is_some_and(|r| r.contains(r"\u0000-\u001F\u007F-\u009F"))
    );
    // The gate's answer (ADR 0016) is a published response component.
    assert_eq!(
        doc["components"]["responses"]["FeatureDisabled"]["content"]["application/problem+json"]["schema"]
            ["$ref"],
        "#/components/schemas/Problem"
    );
    // Feature flags (ADR 0016): key pattern, basis points, list sizes, texts.
    assert_eq!(
        schemas["NewFlag"]["properties"]["key"]["pattern"],
        "^[a-z][a-z0-9_]{1,39}$"
    );
    for schema in ["NewFlag", "FlagPatch"] {
        let p = &schemas[schema]["properties"];
        assert_eq!(p["rollout_basis_points"]["minimum"], 0, "{schema}");
        assert_eq!(p["rollout_basis_points"]["maximum"], 10_000, "{schema}");
        assert_eq!(p["allow_users"]["maxItems"], 1000, "{schema}");
        assert_eq!(p["deny_users"]["maxItems"], 1000, "{schema}");
        assert_eq!(p["reason"]["maxLength"], 500, "{schema}");
        assert_eq!(p["description"]["maxLength"], 500, "{schema}");
    }
    assert!(
        schemas["Me"]["properties"]["flags"]["additionalProperties"]["type"] == "boolean",
        "the session's flags: {}",
        schemas["Me"]["properties"]["flags"]
    );
    // Text rules (ADR 0013): titles and display names are single-line (no
    // tab or line break inside), the bidi overrides are refused everywhere,
    // the zero width joiner of emoji sequences is not.
    for title in [
        &schemas["NewClass"]["properties"]["title"]["pattern"],
        &schemas["MePatch"]["properties"]["display_name"]["pattern"],
    ] {
        let title = title.as_str().expect("pattern");
        assert!(title.contains(r"[^\u0000-\u001F\u007F-\u009F"), "{title}");
        assert!(title.contains(r"\u2028-\u202E"), "{title}");
        assert!(!title.contains(r"\u200D"), "{title}");
    }
    // Query values: a free-form one gets the character rule, the ledger's
    // cursor is a positive entry id.
    let classes = &doc["paths"]["/api/v1/classes"]["get"];
    assert!(param(classes, "cursor")["schema"]["pattern"].is_string());
    let ledger = &doc["paths"]["/api/v1/tokens/ledger"]["get"];
    assert_eq!(param(ledger, "cursor")["schema"]["minimum"], 1);
    let key = &param(&doc["paths"]["/api/v1/tips"]["post"], "Idempotency-Key")["schema"];
    assert_eq!(key["minLength"], 1);
    assert_eq!(key["maxLength"], 255);
    assert_eq!(key["pattern"], "^[!-~]+$");
}

#[test]
fn the_realtime_messages_have_published_schemas() {
    let doc = document();
    for (component, name, file) in stagepass_routes::openapi::REALTIME {
        let published: Value = serde_json::from_str(file).expect("schema file is JSON");
        assert_eq!(
            published["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        let in_doc = &doc["components"]["schemas"][component];
        assert_eq!(in_doc["properties"], published["properties"], "{name}");
        assert!(
            in_doc["required"]
                .as_array()
                .is_some_and(|r| r.iter().any(|f| f == "seq")),
            "{name}"
        );
    }
}

/// Behaviour the merged branches changed (ADR 0011, 0013), as documented.
#[test]
fn the_signature_and_reschedule_answers_are_documented() {
    let doc = document();
    // The Stripe webhook checks the signature first: 401 `invalid_signature`
    // for a bad one (400 before ADR 0011), 429 for a flood of them.
    let webhook = &doc["paths"]["/api/webhooks/stripe"]["post"]["responses"];
    for status in ["401", "429"] {
        assert!(webhook[status].is_object(), "webhook {status}");
    }
    assert!(
        resolve(&doc, &webhook["401"])["description"]
            .as_str()
            .is_some_and(|d| d.contains("invalid_signature"))
    );
    // A paid class cannot be moved inside the cut-off.
    let patch = &doc["paths"]["/api/v1/classes/{id}"]["patch"]["responses"]["409"];
    assert!(
        patch["description"]
            .as_str()
            .is_some_and(|d| d.contains("reschedule_too_soon")),
        "{patch}"
    );
    // Enrolments say until when the fan may withdraw; the audit counts
    // unaudited grants.
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["Class"]["properties"]["withdraw_until"].is_object());
    assert!(schemas["AuditReport"]["properties"]["unaudited_grants"].is_object());
    assert!(schemas["RealtimeClassUpdated"]["properties"]["refund_window_until"].is_object());
}
