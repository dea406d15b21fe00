#!/usr/bin/env bash
# The tip's SQL path alone (issue 13): pgbench calling `app.money_request`
# directly as `stagepass_app` — the one statement `POST /api/v1/tips` sends,
# with no HTTP, no JWT check and no Rust in the way — against a scratch
# database of the local cluster migrated by this checkout's `stagepass`.
# Prints tips/s for the pairs and hot-creator cases, next to pgbench's
# TPC-B-like on the same cluster, and the costliest functions
# (`track_functions = all`) of the pairs run.
#
#   scripts/bench/sql-tips.sh [SECONDS] [CLIENTS]     (default 20 s, 4 clients)
#
# Needs DATABASE_ADMIN_URL (a superuser URL of the cluster; default
# postgres://postgres@127.0.0.1:5432/postgres), pgbench, and the `stagepass`
# binary (STAGEPASS_BIN, default target/release/stagepass under
# CARGO_TARGET_DIR, else the debug one). Only 127.0.0.1 is contacted; the
# scratch database is dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECONDS_RUN="${1:-20}"
CLIENTS="${2:-4}"
ADMIN="${DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${STAGEPASS_BIN:-}"
if [ -z "$BIN" ]; then
  for b in "$TARGET/release/stagepass" "$TARGET/debug/stagepass"; do
    if [ -x "$b" ]; then BIN="$b"; break; fi
  done
fi
[ -x "$BIN" ] || { echo "sql-tips: no stagepass binary (set STAGEPASS_BIN)" >&2; exit 1; }

DB="sqltips_$$"
base="${ADMIN%/*}"
admin_db="$base/$DB"
app_db="$(echo "$admin_db" | sed -E 's#//[^@/]*@#//stagepass_app@#')"
work="$(mktemp -d)"
cleanup() {
  psql -q "$ADMIN" -c "drop database if exists $DB with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$ADMIN" -c "create database $DB" >/dev/null
DATABASE_ADMIN_URL="$admin_db" "$BIN" migrate >/dev/null
psql -q "$admin_db" -v ON_ERROR_STOP=1 >/dev/null <<SQL
alter database $DB set track_functions = 'all';
-- 64 fans, 64 creators; fan i tips creator i (pairs) or creator 1 (hot).
create table public.bench_pairs (i int primary key, claims text not null,
                                 recipient uuid not null, hot uuid not null);
with f as (select i, gen_random_uuid() as fan, gen_random_uuid() as creator
             from generate_series(1, 64) i),
     u as (insert into app.users (id, role)
             select fan, 'fan' from f union all select creator, 'creator' from f)
insert into public.bench_pairs
  select i, jsonb_build_object('sub', fan, 'role', 'authenticated', 'aud', 'authenticated',
                               'email', 'fan' || i || '@bench.test',
                               'user_metadata', jsonb_build_object('email_verified', true))::text,
         creator, (select creator from f where i = 1)
    from f;
insert into app.user_private (user_id, email, email_verified, daily_spend_limit_tokens)
  select (claims::jsonb ->> 'sub')::uuid, claims::jsonb ->> 'email', true, 10000000
    from public.bench_pairs;
select ledger.post('purchase', 'bench-' || i, array[ledger.singleton('stripe_clearing'),
                   ledger.account_of('wallet', (claims::jsonb ->> 'sub')::uuid)],
                   array[-100000000::bigint, 100000000::bigint], null)
  from public.bench_pairs;
grant select on public.bench_pairs to stagepass_app;
SQL

tip_script() {
  cat > "$work/$1.sql" <<SQL
\set i random(1, 64)
select m.outcome from public.bench_pairs b,
  app.money_request(b.claims, 'POST /api/v1/tips', gen_random_uuid()::text, 'bench', 24,
                    201::smallint, 'tip',
                    jsonb_build_object('tip_id', gen_random_uuid(), 'recipient_id', b.$2,
                                       'amount', 1, 'message', null)) m
 where b.i = :i;
SQL
}
tip_script pairs recipient
tip_script hot hot

tps() { sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1; }
run() { pgbench -n -M prepared -c "$CLIENTS" -j "$(( CLIENTS < 2 ? CLIENTS : 2 ))" -T "$SECONDS_RUN" "$@" 2>&1; }

# Warm-up: first sight and plans of every connection.
run -T 3 -f "$work/pairs.sql" "$app_db" >/dev/null
psql -q "$admin_db" -c "select pg_stat_reset()" >/dev/null
pairs=$(run -f "$work/pairs.sql" "$app_db" | tps)
psql -q "$admin_db" -At -F ' ' -c "
  select round(self_time::numeric / calls, 3) as self_ms_per_call, calls, schemaname || '.' || funcname
    from pg_stat_user_functions order by self_time desc limit 12" > "$work/functions.txt"
hot=$(run -f "$work/hot.sql" "$app_db" | tps)
applied=$(psql -At "$admin_db" -c "select count(*) from ledger.journals where kind = 'tip'")

pgbench -i -q -s 1 "$admin_db" >/dev/null 2>&1
tpcb=$(run "$admin_db" | tps)

echo "sql-tips: ${SECONDS_RUN} s each, ${CLIENTS} clients, ${applied} tips applied"
echo "  pairs        ${pairs} tips/s"
echo "  hot creator  ${hot} tips/s"
echo "  TPC-B-like   ${tpcb} tps (pgbench, same cluster)"
awk -v p="$pairs" -v h="$hot" -v t="$tpcb" 'BEGIN {
  printf "  pairs ÷ TPC-B %.2f×, hot ÷ pairs %.2f×\n", p / t, h / p }'
echo "costliest functions of the pairs run (self ms per call, calls):"
sed 's/^/  /' "$work/functions.txt"
