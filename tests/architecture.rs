//! docs/ARCHITECTURE.md's crate table is true: it lists exactly the
//! workspace's members, and each row's "depends on (ours)" column is exactly
//! that crate's normal dependencies on other members (read from the
//! manifests through `cargo metadata`). A new crate or a new edge between
//! our crates fails here until the table says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

/// A member's directory relative to the workspace root: `crates/ledger`, or
/// `.` for the root package.
fn member_dir(manifest_path: &str) -> String {
    let dir = Path::new(manifest_path).parent().expect("manifest dir");
    let rel = dir
        .strip_prefix(root())
        .expect("member inside the workspace");
    if rel.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        rel.to_string_lossy().replace('\\', "/")
    }
}

/// member dir -> the member dirs it depends on (normal dependencies only).
fn manifests() -> BTreeMap<String, BTreeSet<String>> {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    let dir_of_name: BTreeMap<String, String> = packages
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_owned(),
                member_dir(p["manifest_path"].as_str().expect("manifest_path")),
            )
        })
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| dir_of_name.get(d["name"].as_str().expect("dep name")))
                .cloned()
                .collect();
            (
                member_dir(p["manifest_path"].as_str().expect("manifest_path")),
                deps,
            )
        })
        .collect()
}

/// The crate table of docs/ARCHITECTURE.md, in the same shape.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("read doc");
    let section = doc
        .split("\n## Crates\n")
        .nth(1)
        .expect("a `## Crates` section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let dir = |cell: &str| -> String {
        let cell = cell.trim().trim_matches('`');
        if cell == "root package" {
            ".".to_owned()
        } else if cell.starts_with("crates/") {
            cell.to_owned()
        } else {
            format!("crates/{cell}")
        }
    };
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let first = cells[0].trim();
        if first == "crate" || first.starts_with("---") {
            continue;
        }
        assert_eq!(cells.len(), 4, "a crate row has four columns: {line}");
        let deps = cells[2].trim();
        let deps = if deps == "—" {
            BTreeSet::new()
        } else {
            deps.split(',').map(dir).collect()
        };
        assert!(
            table.insert(dir(first), deps).is_none(),
            "{first} is listed twice"
        );
    }
    table
}

#[test]
fn the_crate_table_matches_the_workspace_manifests() {
    let manifests = manifests();
    // The real workspace (the test cannot pass on an empty one).
    assert!(manifests.contains_key("crates/ledger"), "{manifests:?}");
    assert!(manifests.contains_key("."), "{manifests:?}");
    assert_eq!(
        documented(),
        manifests,
        "docs/ARCHITECTURE.md's crate table (left) differs from the manifests (right)"
    );
}
