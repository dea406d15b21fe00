#!/usr/bin/env bash
# Crash safety (issue 14): `stagepass bench crash` SIGKILLs the money
# functions (debug binaries, as `cargo test --workspace --all-targets` left
# them) during tips, enrolments, withdrawals, Stripe webhooks, class cancellations and
# the settlement cron, retries each request with the same key (or event id),
# and fails on any lost or doubled effect (ledger audit,
# outbox, journals per request, wallet balances). About a minute.
#
# Usage: scripts/ci/crash.sh [extra bench options, e.g. --kills 1000 --seed 42]
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
# Where cargo really builds (a wrapper may redirect CARGO_TARGET_DIR).
TARGET=$(cargo metadata -q --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BIN="$TARGET/debug"

# A no-op after `cargo test --workspace --all-targets`; builds what is
# missing when run alone.
cargo build -q -p stagepass-cli --bin stagepass
cargo build -q -p stagepass-functions --bin v1_tips --bin v1_classes_enrollments \
  --bin webhooks_stripe --bin v1_classes_cancel --bin cron_settle_classes \
  --bin v1_classes_enrollments_me

# 100 kills, capped at 90 s of killing (the check comes after it).
"$BIN/stagepass" bench crash --kills "${CRASH_KILLS:-100}" --seconds 90 --bin-dir "$BIN" "$@"
