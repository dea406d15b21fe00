//! The OpenAPI document covers every function, and every function builds.

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
