//! What Vercel's builder compiles into a function. `@vercel/rust` runs
//! `cargo build --bin <name> --release` at the workspace root without `-p`,
//! so cargo resolves features for the workspace's default members. Test-only
//! code (`feature = "testing"`: fake clocks, fixed keys, test tokens) must not
//! be unified into that build. ADR 0008; the builder itself runs in
//! scripts/ci/vercel-build.sh.

use std::process::Command;

/// `cargo tree` the way the builder's `cargo build` resolves: at the root, no
/// `-p`, normal and build dependencies only (dev-dependencies are not part of
/// a `cargo build --bin`), one line per package with its enabled features.
fn deployed_feature_graph() -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p} features=[{f}]",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn the_builders_cargo_build_has_no_testing_feature() {
    let graph = deployed_feature_graph();
    let ours: Vec<&str> = graph
        .lines()
        .filter(|l| l.starts_with("stagepass-"))
        .collect();
    // The graph really is the functions' graph (the test cannot pass on an
    // empty or unrelated tree) ...
    assert!(
        ours.iter().any(|l| l.starts_with("stagepass-functions ")),
        "{graph}"
    );
    assert!(
        ours.iter().any(|l| l.starts_with("stagepass-platform ")),
        "{graph}"
    );
    // ... and only the deployed crates are in it: the CLI and the Upstash
    // stand-in are tools, not part of any function.
    for tool in ["stagepass-cli ", "upstash-shim "] {
        assert!(
            !graph.lines().any(|l| l.starts_with(tool)),
            "{tool}is built into the functions:\n{graph}"
        );
    }
    let with_testing: Vec<&&str> = ours.iter().filter(|l| l.contains("testing")).collect();
    assert!(
        with_testing.is_empty(),
        "test-only code would be deployed (default-members must be only \".\"): {with_testing:#?}"
    );
}
