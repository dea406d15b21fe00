#!/usr/bin/env bash
# The test command (README). Starts what the tests need, installs the test
# stand-ins into a cache folder outside the clone (reused between runs), then
# runs formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
mkdir -p "$CACHE"

say() { printf '\n== %s\n' "$*"; }

say "services"
# PostgreSQL (local cluster, trust auth on 127.0.0.1).
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432
# Redis (rate limiting tests).
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping

say "test stand-ins (cached in $CACHE)"
# kent: a fake Sentry server; localstripe: a stateful fake Stripe that signs
# webhooks (both PyPI). Pinned; installed once.
STANDINS="kent==2.2.0 localstripe==1.15.10"
if [ ! -f "$CACHE/venv/.installed" ] || [ "$(cat "$CACHE/venv/.installed")" != "$STANDINS" ]; then
  rm -rf "$CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet $STANDINS
  echo "$STANDINS" > "$CACHE/venv/.installed"
fi
export KENT_BIN="$CACHE/venv/bin/kent-server"
export LOCALSTRIPE_BIN="$CACHE/venv/bin/localstripe"
# localstripe keeps its state in a fixed file; a stale one breaks it.
rm -f /tmp/localstripe.pickle

say "leftover test databases"
psql -h 127.0.0.1 -U postgres -d postgres -Atc \
  "select datname from pg_database where datname like 'stagepass_t_%'" |
  while read -r db; do
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$db\" with (force)" || true
  done

say "format"
cargo fmt --all -- --check

say "lints"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --bins --features lambda -- -D warnings

say "tests"
cargo test --workspace --all-targets
# The Lambda target: API Gateway events through the same stack.
cargo test -p stagepass-platform --features lambda --lib serve::lambda_tests
scripts/ci/openapi.sh  # OpenAPI validation, TypeScript client drift, Schemathesis (ADR 0012)
