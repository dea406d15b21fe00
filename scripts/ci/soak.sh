#!/usr/bin/env bash
# Soak (issue 14): one minute of mixed traffic over every route family through
# `stagepass dev` on a throwaway PostgreSQL cluster, at 80 % of the capacity
# measured first; fails on any 5xx, an unclean ledger audit, resident memory
# growth beyond the documented bound, or p99 drift (the last 15 s against the
# first: above 3 × + 50 ms) (docs/RELIABILITY.md, "Soak").
#
# Uses the debug `stagepass` binary that `cargo test --workspace --all-targets`
# already built (no release build in CI); builds it if it is missing.
# The longer run: `stagepass bench soak --minutes 10`.
set -euo pipefail
cd "$(dirname "$0")/../.."

# initdb/pg_ctl for the throwaway cluster (CI runs as root).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  apt-get update -qq || true
  apt-get install -y postgresql
fi

# The binary `cargo test --workspace --all-targets` built (crates/cli/tests
# needs it); else cargo builds it and names where it is (the target directory
# may be set by a wrapper rather than CARGO_TARGET_DIR).
BIN="${CARGO_TARGET_DIR:-target}/debug/stagepass"
if [ ! -x "$BIN" ]; then
  BIN=$(cargo build -q -p stagepass-cli --bin stagepass --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\/stagepass\)".*/\1/p' | tail -1)
fi
if [ ! -x "$BIN" ]; then
  echo "soak: could not find the stagepass binary" >&2
  exit 1
fi
"$BIN" bench soak --minutes "${SOAK_MINUTES:-1}"
