#!/usr/bin/env bash
# Schema-driven fuzzing (issue 14, ADR 0012): Schemathesis against the
# OpenAPI document served by `stagepass dev`, once with the demo creator's
# token, once with the demo fan's and briefly with the demo admin's (rate
# limits off), then briefly with rate limits on; every phase (examples, coverage, fuzzing, stateful) and
# every check. Fails on any server error or
# conformance failure (undocumented status or content type, schema-invalid
# response, valid request refused, invalid request accepted).
#
#   scripts/ci/fuzz.sh                 # CI: 90 s creator, 90 s fan, 30 s admin, 30 s limited
#   FUZZ_SECONDS=1800 scripts/ci/fuzz.sh   # the long run
#   FUZZ_ARGS="--include-path /api/v1/tips" scripts/ci/fuzz.sh  # more options
#
# Examples that once failed are kept in $CACHE/fuzz-examples and tried
# first on the next run (Hypothesis' database).
#
# Only 127.0.0.1 is targeted. Installs Schemathesis into
# $CACHE/openapi-venv (shared with scripts/ci/openapi.sh) once.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${STAGEPASS_CACHE:-/root/.cache/stagepass}
VENV="$CACHE/openapi-venv"
SECONDS_PER_TOKEN=${FUZZ_SECONDS:-90}
LIMITED_SECONDS=${FUZZ_LIMITED_SECONDS:-30}
ADMIN_SECONDS=${FUZZ_ADMIN_SECONDS:-30}
# One worker: with two, CPython 3.11.7's `ast` can fail under threads
# (SystemError "AST constructor recursion depth mismatch" inside
# Hypothesis), an error of the tool, not of the API; and the server under
# test shares the machine's two cores anyway.
WORKERS=${FUZZ_WORKERS:-1}
OUT=${FUZZ_OUT:-$(mktemp -d /tmp/stagepass-fuzz.XXXXXX)}
say() { printf '\n== fuzz: %s\n' "$*"; }

# shellcheck source=scripts/ci/openapi-tools.sh
. scripts/ci/openapi-tools.sh
python_tools "$VENV"

say "building the CLI"
cargo build -q -p stagepass-cli
BIN=$(cargo build -q -p stagepass-cli --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable"): print(m["executable"])')

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
STRIPE_PORT=$(free_port)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$VENV/bin/python" scripts/ci/fuzz/fake_stripe.py "$STRIPE_PORT" &
PIDS+=($!)

random() { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'; }
hex32() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
DEV_PID= BASE= TOKENS=

# start_dev NAME RATE_LIMITS: `stagepass dev` on a free port with a fresh
# throwaway PostgreSQL. Every function is configured, so none answers 503
# not_configured; Ably and QStash point at a closed port (their deliveries
# fail and are retried in the background, as in an outage; no request
# waits for them), Stripe at the stand-in.
start_dev() {
  local name=$1 limits=$2 port
  port=$(free_port)
  TOKENS="$OUT/$name-tokens.json"
  say "$name: stagepass dev on 127.0.0.1:$port, RATE_LIMITS=$limits (log: $OUT/$name-dev.log)"
  env -u DATABASE_URL HOST=127.0.0.1 PORT="$port" RATE_LIMITS="$limits" \
    CRON_SECRET="$(random)" \
    STRIPE_SECRET_KEY="sk_test_fuzz$(random)" STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT" \
    STRIPE_WEBHOOK_SECRET="whsec_$(random)" STRIPE_CONNECT_WEBHOOK_SECRET="whsec_$(random)" \
    APP_BASE_URL="https://app.stagepass.test" \
    ABLY_API_KEY="fuzzapp.fuzzkey:$(random)" ABLY_API_BASE="http://127.0.0.1:9" \
    QSTASH_TOKEN="$(random)" QSTASH_URL="http://127.0.0.1:9" \
    QSTASH_CURRENT_SIGNING_KEY="sig_$(random)" QSTASH_NEXT_SIGNING_KEY="sig_$(random)" \
    AGORA_APP_ID="$(hex32)" AGORA_APP_CERTIFICATE="$(hex32)" AGORA_NOTIFICATION_SECRET="$(random)" \
    RUST_LOG=warn FLAGS_CACHE_SECONDS=1 \
    "$BIN" dev --tokens-file "$TOKENS" >"$OUT/$name-dev.log" 2>&1 &
  DEV_PID=$!
  PIDS+=("$DEV_PID")
  for _ in $(seq 1 240); do
    [ -f "$TOKENS" ] && break
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$OUT/$name-dev.log"; exit 1; }
    sleep 0.5
  done
  [ -f "$TOKENS" ] || { echo "stagepass dev did not start" >&2; cat "$OUT/$name-dev.log"; exit 1; }
  if grep -q "not configured" "$OUT/$name-dev.log"; then
    echo "some functions are not configured:" >&2
    sed -n '/not configured/,/^$/p' "$OUT/$name-dev.log" >&2
    exit 1
  fi
  BASE="http://127.0.0.1:$port"
}

# stop_dev: SIGTERM, so it removes its throwaway cluster.
stop_dev() {
  kill "$DEV_PID" 2>/dev/null || true
  wait "$DEV_PID" 2>/dev/null || true
}

token() { python3 -c "import json,sys;print(json.load(open('$TOKENS'))['$1']['token'])"; }

status=0
# fuzz_as LABEL WHO SECONDS
fuzz_as() {
  local label=$1 who=$2 seconds=$3
  say "$label: $who's token, ${seconds}s, all phases, all checks"
  # The token is sent on every request, including the cron, job and
  # webhook routes, whose own credentials it is not: they must refuse it.
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
  if ! PYTHONPATH=scripts/ci/fuzz SCHEMATHESIS_HOOKS=hooks \
    "$VENV/bin/schemathesis" --config-file scripts/ci/fuzz/schemathesis.toml run \
    "$BASE/api/v1/openapi.json" \
    --header "Authorization: Bearer $(token "$who")" \
    --phases examples,coverage,fuzzing,stateful --checks all \
    --max-time "$seconds" --workers "$WORKERS" ${FUZZ_ARGS:-} \
    --request-timeout 10 --no-color \
    --generation-database "$CACHE/fuzz-examples" \
    --report ndjson,junit --report-dir "$OUT/$label" \
    >"$OUT/$label.log" 2>&1; then
    status=1
    sed -n '/= FAILURES =/,/= WARNINGS =\|= SUMMARY =/p' "$OUT/$label.log" | head -200
  fi
  sed -n '/= SUMMARY =/,$p' "$OUT/$label.log"
}

# Flags seeded off would keep the fuzzer at 403 feature_disabled: turn the
# call and payout routes on for everyone (as an admin would) and give the
# demo creator call settings, so requests reach the handlers.
enable_calls() {
  for flag in calls payouts; do
    curl -fsS -o /dev/null -X PATCH "$BASE/api/v1/admin/flags/$flag" \
      -H "Authorization: Bearer $(token admin)" -H 'Content-Type: application/json' \
      -d "{\"enabled\":true,\"rollout_basis_points\":10000,\"reason\":\"fuzz the $flag routes\"}"
  done
  sleep 1.2 # FLAGS_CACHE_SECONDS
  curl -fsS -o /dev/null -X PUT "$BASE/api/v1/me/call-settings" \
    -H "Authorization: Bearer $(token creator)" -H 'Content-Type: application/json' \
    -d '{"price_per_minute":5,"audio_enabled":true,"video_enabled":true}'
}

# Rate limits off: the fuzzer reaches the handlers rather than 429s.
start_dev handlers off
enable_calls
fuzz_as creator creator "$SECONDS_PER_TOKEN"
fuzz_as fan fan "$SECONDS_PER_TOKEN"
# The admin routes answer 403 to the others; the admin's pass comes last,
# as it may change the demo users' roles.
fuzz_as admin admin "$ADMIN_SECONDS"
stop_dev
# Rate limits on (the in-process limiter of development): the 429s and the
# RateLimit headers must be as documented too.
start_dev limited on
fuzz_as limited fan "$LIMITED_SECONDS"
stop_dev

# Server errors also show in the server's log, with their cause.
if grep -q 'request failed' "$OUT"/*-dev.log; then
  say "server-side errors (from $OUT/*-dev.log)"
  grep -h 'request failed' "$OUT"/*-dev.log | head -20
fi
say "reports in $OUT"
exit "$status"
