#!/usr/bin/env bash
# The test command (README). Checks its prerequisites, starts what the tests
# need, installs the test stand-ins into a cache folder outside the clone
# (reused between runs), then runs formatting, lints and every test.
#
# CI runs it as root with PostgreSQL (trust) on 127.0.0.1:5432 and Redis on
# 127.0.0.1:6379, starting them if they are stopped, and installs missing
# Debian packages itself. As another user with no such PostgreSQL it runs a
# throwaway cluster (initdb into the cache folder, a free port) and a private
# Redis, and stops both at the end; a missing package is named with the
# command that installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
mkdir -p "$CACHE"

STARTED=$(date +%s)
say() {
  local t=$(($(date +%s) - STARTED))
  printf '\n== [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*"
}
ROOT=false
[ "$(id -u)" = 0 ] && ROOT=true
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Whether the PostgreSQL at $1 (a URL) lets us in as postgres without a password.
pg_trusted() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1 </dev/null; }
# The directory with initdb and pg_ctl (as crates/cli/src/pgcluster.rs finds it).
pg_bindir() {
  local d
  d=$(pg_config --bindir 2>/dev/null || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; fi
}

say "prerequisites"
ADMIN_URL_DEFAULT="postgres://postgres@127.0.0.1:5432/postgres"
# A PostgreSQL we can use as is: the one named by DATABASE_ADMIN_URL, or a
# trusted one on the standard port. Otherwise we need the server binaries.
need_pg_server=true
if command -v psql >/dev/null && pg_trusted "${DATABASE_ADMIN_URL:-$ADMIN_URL_DEFAULT}"; then
  need_pg_server=false
fi
missing=() # "debian-package|what it is for"
command -v python3 >/dev/null || missing+=("python3|Python 3, for the test stand-ins")
python3 -c 'import venv, ensurepip' 2>/dev/null ||
  missing+=("python3-venv|Python's venv module, for the test stand-ins")
command -v psql >/dev/null && command -v pg_isready >/dev/null ||
  missing+=("postgresql-client|psql and pg_isready")
if $need_pg_server && [ -z "$(pg_bindir)" ] && ! { $ROOT && ls /etc/postgresql/*/main >/dev/null 2>&1; }; then
  missing+=("postgresql|PostgreSQL server binaries (initdb, pg_ctl): no trusted server answers on 127.0.0.1:5432")
fi
command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
  missing+=("redis-server|Redis, for the rate limit tests")
command -v openssl >/dev/null || missing+=("openssl|openssl, for the database TLS test's throwaway CA")
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] ||
  missing+=("pgbouncer|PgBouncer, the transaction pooler the tests run through")
if [ "${#missing[@]}" -gt 0 ]; then
  packages=()
  for m in "${missing[@]}"; do
    echo "missing: ${m#*|} (Debian package ${m%%|*})"
    packages+=("${m%%|*}")
  done
  if $ROOT && command -v apt-get >/dev/null; then
    say "installing ${packages[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo >&2
    echo "install them with: sudo apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null; then
  echo "missing: cargo (the Rust toolchain; rust-toolchain.toml pins the version)" >&2
  echo "install it with: curl --proto '=https' -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal" >&2
  exit 1
fi

# Whatever this script starts for a non-root run is stopped at the end.
CLEANUP=()
cleanup() {
  local c
  for c in "${CLEANUP[@]}"; do eval "$c" || true; done
}
trap cleanup EXIT

say "services"
# PostgreSQL (trust auth on 127.0.0.1). The tests read DATABASE_ADMIN_URL.
if [ -n "${DATABASE_ADMIN_URL:-}" ] && pg_trusted "$DATABASE_ADMIN_URL"; then
  echo "PostgreSQL: $DATABASE_ADMIN_URL"
elif pg_trusted "$ADMIN_URL_DEFAULT"; then
  export DATABASE_ADMIN_URL="$ADMIN_URL_DEFAULT"
elif $ROOT && ls /etc/postgresql/*/main >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  # CI: the machine's cluster, stopped.
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  pg_isready -h 127.0.0.1 -p 5432
  export DATABASE_ADMIN_URL="$ADMIN_URL_DEFAULT"
else
  # A throwaway cluster of our own, kept in the cache (the migrated template
  # survives between runs), on a free port, stopped at the end.
  BINDIR=$(pg_bindir)
  PGDATA_DIR="$CACHE/pgdata"
  if $ROOT; then
    echo "PostgreSQL refuses to run as root and no trusted server answers on 127.0.0.1:5432" >&2
    exit 1
  fi
  if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
    echo "initdb into $PGDATA_DIR (first run)"
    rm -rf "$PGDATA_DIR"
    "$BINDIR/initdb" -D "$PGDATA_DIR" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
  fi
  PG_PORT=$(free_port)
  "$BINDIR/pg_ctl" start -w -t 30 -D "$PGDATA_DIR" -l "$CACHE/postgres.log" \
    -o "-p $PG_PORT -k $PGDATA_DIR -c listen_addresses=127.0.0.1 -c fsync=off" >/dev/null
  CLEANUP+=("'$BINDIR/pg_ctl' stop -m fast -D '$PGDATA_DIR' >/dev/null")
  export DATABASE_ADMIN_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "PostgreSQL: throwaway cluster on 127.0.0.1:$PG_PORT ($PGDATA_DIR)"
fi
# Redis (rate limiting tests). The tests read REDIS_URL.
if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
elif $ROOT; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.2; done
  redis-cli -h 127.0.0.1 -p 6379 ping
else
  REDIS_PORT=$(free_port)
  mkdir -p "$CACHE/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$CACHE/redis" --logfile "$CACHE/redis/redis.log" --pidfile "$CACHE/redis/redis.pid"
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null
  CLEANUP+=("redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1")
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  echo "Redis: private server on 127.0.0.1:$REDIS_PORT"
fi

say "test stand-ins (cached in $CACHE)"
# kent: a fake Sentry server; localstripe: a stateful fake Stripe that signs
# webhooks (both PyPI). Pinned; installed once.
STANDINS="kent==2.2.0 localstripe==1.15.10"
if [ ! -f "$CACHE/venv/.installed" ] || [ "$(cat "$CACHE/venv/.installed")" != "$STANDINS" ]; then
  echo "installing $STANDINS into $CACHE/venv (first run: about a minute)"
  rm -rf "$CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet --progress-bar off $STANDINS
  echo "$STANDINS" > "$CACHE/venv/.installed"
fi
export KENT_BIN="$CACHE/venv/bin/kent-server"
export LOCALSTRIPE_BIN="$CACHE/venv/bin/localstripe"
# localstripe keeps its state in a fixed file; a stale one breaks it.
rm -f /tmp/localstripe.pickle 2>/dev/null || true

say "Stripe's published OpenAPI spec (cached in $CACHE)"
# The Connect fake's shapes are checked against it (issue 12).
# shellcheck source=ci/stripe-openapi.sh
. scripts/ci/stripe-openapi.sh
echo "STRIPE_OPENAPI_SPEC=$STRIPE_OPENAPI_SPEC"

say "leftover test databases"
psql "$DATABASE_ADMIN_URL" -Atc \
  "select datname from pg_database where datname like 'stagepass_t_%'" |
  while read -r db; do
    psql "$DATABASE_ADMIN_URL" -qc "drop database if exists \"$db\" with (force)" || true
  done

say "format"
cargo fmt --all -- --check

say "lints (the first run compiles every crate: several minutes)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --bins --features lambda -- -D warnings

say "tests"
cargo test --workspace --all-targets
# The Lambda target: API Gateway events through the same stack.
cargo test -p stagepass-platform --features lambda --lib lambda
bash scripts/ci/pgbouncer.sh # the functions through a transaction pooler (ADR 0010)
bash scripts/ci/lambda-template.sh # the Lambda target's SAM template, through cfn-lint
bash scripts/ci/vercel-build.sh # every function through Vercel's own builder (ADR 0008)
bash scripts/ci/openapi.sh  # OpenAPI validation, TypeScript client drift, Schemathesis (ADR 0012)
bash scripts/ci/crash.sh    # kill -9 during money requests, 100 kills: 0 lost, 0 doubled (issue 14)
bash scripts/ci/soak.sh    # 60 s soak through stagepass dev: 0 5xx, memory flat (issue 14)
