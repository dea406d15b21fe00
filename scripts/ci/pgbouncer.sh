#!/usr/bin/env bash
# The functions through a transaction pooler (issue 9, ADR 0010): starts
# Debian's PgBouncer (1.18: no prepared-statement support in transaction
# mode, refuses unknown startup parameters: the strict stand-in for
# Supabase's Supavisor on port 6543) in `pool_mode = transaction` in front of
# the local PostgreSQL, then runs the end-to-end suites and the in-process
# route suites with every `stagepass_app` connection routed through it
# (STAGEPASS_TEST_DB_PROXY, crates/platform/src/testing.rs). Stops it on exit.
#
# Usage: scripts/ci/pgbouncer.sh [cargo test arguments…]
#   (default: the pooler test, tests/e2e*.rs and every crates/routes suite
#   but the long money simulation, which runs the tip and webhook code the
#   tips and stripe_webhooks suites cover, and takes two minutes; it passes
#   through the pooler too: scripts/ci/pgbouncer.sh -p stagepass-routes --test simulation)
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
# The PostgreSQL the tests use (DATABASE_ADMIN_URL, as the tests read it).
read -r PGHOST_ADDR PGPORT_NUM < <(python3 -c 'import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 5432)' \
  "${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}")

say() { printf '\n== %s\n' "$*"; }

PGBOUNCER=$(command -v pgbouncer || true)
[ -z "$PGBOUNCER" ] && [ -x /usr/sbin/pgbouncer ] && PGBOUNCER=/usr/sbin/pgbouncer
if [ -z "$PGBOUNCER" ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing pgbouncer (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer >/dev/null; }
    PGBOUNCER=/usr/sbin/pgbouncer
  else
    echo "missing: pgbouncer — install it with: sudo apt-get install -y pgbouncer" >&2
    exit 1
  fi
fi
# The Debian package starts its own service; ours is separate (own config,
# own port) and the system one is left as it is.

DIR=$(mktemp -d "${TMPDIR:-/tmp}/stagepass-pgbouncer.XXXXXX")
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# PgBouncer refuses to run as root: run it as the postgres OS user then.
RUN=()
if [ "$(id -u)" = 0 ]; then
  RUN=(runuser -u postgres --)
  chown postgres: "$DIR"
fi

cat > "$DIR/pgbouncer.ini" <<INI
[databases]
; Every database (each test creates its own) on the local server.
* = host=$PGHOST_ADDR port=$PGPORT_NUM

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
pidfile = $DIR/pgbouncer.pid
logfile = $DIR/pgbouncer.log
auth_type = trust
auth_file = $DIR/userlist.txt
pool_mode = transaction
; Small pools, so concurrent clients really share server connections, and
; round robin, so consecutive transactions of one client land on different
; ones: anything that leans on session state fails here.
default_pool_size = 2
min_pool_size = 0
reserve_pool_size = 0
server_round_robin = 1
max_client_conn = 1000
; Deliberately no ignore_startup_parameters: a client that sends
; \`options\` or \`extra_float_digits\` is refused, as PgBouncer does by default.
INI
printf '"stagepass_app" ""\n"postgres" ""\n' > "$DIR/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR"/*

stop() {
  if [ -f "$DIR/pgbouncer.pid" ]; then
    kill "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do [ -f "$DIR/pgbouncer.pid" ] || break; sleep 0.1; done
  fi
  rm -rf "$DIR"
}
trap stop EXIT

say "pgbouncer $("$PGBOUNCER" --version | head -n1 | awk '{print $2}') on 127.0.0.1:$PORT (transaction mode)"
"${RUN[@]}" "$PGBOUNCER" -d "$DIR/pgbouncer.ini"
for _ in $(seq 1 50); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.1
done
pg_isready -h 127.0.0.1 -p "$PORT" >/dev/null || { cat "$DIR/pgbouncer.log" >&2; exit 1; }

export STAGEPASS_TEST_DB_PROXY="127.0.0.1:$PORT"
if [ "$#" -gt 0 ]; then
  cargo test "$@"
else
  say "tests through the pooler: its own tests, the end-to-end binaries, the route suites"
  started=$(date +%s)
  suites=()
  for f in crates/routes/tests/*.rs; do
    name=$(basename "$f" .rs)
    [ "$name" = simulation ] || suites+=(--test "$name")
  done
  cargo test -p stagepass-platform --features testing --test pooler
  cargo test -p stagepass-functions --test e2e --test e2e_money
  cargo test -p stagepass-routes "${suites[@]}"
  # `stagepass users set-role` with the functions' DATABASE_URL.
  cargo test -p stagepass-cli users::
  echo "through pgbouncer: $(($(date +%s) - started)) s"
fi
