#!/usr/bin/env bash
# The tip's SQL path alone (issue 13): pgbench calling `app.money_request`
# directly as `stagepass_app` — the one statement `POST /api/v1/tips` sends,
# with no HTTP, no JWT check and no Rust in the way — against a scratch
# database of the local cluster migrated by this checkout's `stagepass`.
# Prints tips/s for the pairs and hot-creator cases, next to pgbench's
# TPC-B-like on the same cluster, and the costliest functions
# (`track_functions = all`) of the pairs run.
#
# Then the floor: a function doing only what a tip writes (the journal, the
# payer's balance, the legs and their pending credits, `tip.received`, the
# idempotency record; every trigger and index as deployed, so also the
# spending hours, `balance.updated` and the deferred balance check), with
# every id known in advance and no check at all. No tip can be cheaper than
# its writes: "pairs ÷ floor" is how much of a tip's cost is anything else,
# and "floor ÷ TPC-B" is the best any tip could reach against TPC-B-like.
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

psql -q "$admin_db" -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
create table public.bench_floor as
  select b.i, (b.claims::jsonb ->> 'sub')::uuid as payer, b.recipient,
         ledger.account_of('wallet', (b.claims::jsonb ->> 'sub')::uuid) as payer_wallet,
         ledger.account_of('wallet', b.recipient) as recipient_wallet
    from public.bench_pairs b;
grant select on public.bench_floor to stagepass_app;
-- A one-token tip's writes (the fee of 1 token is 0: two legs, one credit).
create function public.bench_floor_tip(p_payer uuid, p_recipient uuid, p_from uuid, p_to uuid)
  returns integer language plpgsql security definer set search_path = '' as $$
declare
  tip uuid := gen_random_uuid();
  journal uuid;
begin
  insert into ledger.journals (kind, reference, metadata)
    values ('tip', tip::text, jsonb_build_object('from', p_payer, 'to', p_recipient, 'message', null))
    returning id into journal;
  update ledger.accounts set balance = balance - 1 where id = p_from;
  with e as (insert into ledger.entries (journal_id, account_id, amount)
               values (journal, p_from, -1), (journal, p_to, 1) returning id, account_id, amount)
  insert into ledger.pending_credits (entry_id, account_id, amount)
    select e.id, e.account_id, e.amount from e where e.amount > 0;
  insert into app.outbox (kind, destination, name, payload, dedup_key)
    values ('realtime', 'user:' || p_recipient, 'tip.received',
            jsonb_build_object('tip_id', tip, 'from', p_payer, 'amount', 1, 'message', null),
            'tip:' || tip);
  insert into app.idempotency_keys (user_id, route, key, fingerprint, status_code, response, expires_at)
    values (p_payer, 'POST /api/v1/tips', tip::text, 'bench', 201,
            jsonb_build_object('tip_id', tip, 'journal_id', journal, 'balance', 0),
            app.now() + interval '24 hours');
  return 1;
end
$$;
grant execute on function public.bench_floor_tip(uuid, uuid, uuid, uuid) to stagepass_app;
SQL
cat > "$work/floor.sql" <<SQL
\set i random(1, 64)
select public.bench_floor_tip(f.payer, f.recipient, f.payer_wallet, f.recipient_wallet)
  from public.bench_floor f where f.i = :i;
SQL
run -T 3 -f "$work/floor.sql" "$app_db" >/dev/null
floor=$(run -f "$work/floor.sql" "$app_db" | tps)
tpcb_again=$(run "$admin_db" | tps)
echo "  floor        ${floor} tips/s (a tip's writes only; TPC-B-like again: ${tpcb_again} tps)"
awk -v f="$floor" -v t="$tpcb_again" -v p="$pairs" 'BEGIN {
  printf "  floor ÷ TPC-B %.2f×, pairs ÷ floor %.2f×\n", f / t, p / f }'
