//! The ledger knows nothing of HTTP (docs/ARCHITECTURE.md, "Crates"): its
//! errors are domain errors, and the routes map them to problems
//! (`stagepass_routes::problems`). This test reads the dependency graph
//! cargo resolves for the crate, so adding an HTTP crate (or the platform
//! crate, which holds the HTTP layer) to its `[dependencies]`, directly or
//! through another dependency, fails here.

use std::process::Command;

/// Every package the ledger's normal (non-dev) dependencies pull in.
fn normal_dependencies() -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "stagepass-ledger",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => unreachable!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => unreachable!("cannot run cargo tree: {e}"),
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_ledger_depends_on_no_http_crate() {
    let packages = normal_dependencies();
    // The graph is really the ledger's (the test cannot pass on an empty one).
    assert!(
        packages.iter().any(|p| p == "stagepass-ledger"),
        "{packages:?}"
    );
    assert!(packages.iter().any(|p| p == "sqlx"), "{packages:?}");
    let http = [
        "axum",
        "axum-core",
        "http",
        "http-body",
        "hyper",
        "hyper-util",
        "tower",
        "tower-http",
        "reqwest",
        "vercel_runtime",
        "lambda_http",
        "stagepass-platform",
        "stagepass-routes",
        "stagepass-integrations",
    ];
    let found: Vec<&String> = packages
        .iter()
        .filter(|p| http.contains(&p.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "the ledger would depend on HTTP through {found:?}"
    );
}
