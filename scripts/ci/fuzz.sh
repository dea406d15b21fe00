#!/usr/bin/env bash
# Schema-driven fuzzing (issue 14, ADR 0012): Schemathesis against the
# OpenAPI document served by `stagepass dev`, once with the demo creator's
# token and once with the demo fan's, every phase (examples, coverage,
# fuzzing, stateful) and every check. Fails on any server error or
# conformance failure (undocumented status or content type, schema-invalid
# response, valid request refused, invalid request accepted).
#
#   scripts/ci/fuzz.sh                 # CI: FUZZ_SECONDS=90 per token
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
WORKERS=${FUZZ_WORKERS:-2}
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
API_PORT=$(free_port)
STRIPE_PORT=$(free_port)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$VENV/bin/python" scripts/ci/fuzz/fake_stripe.py "$STRIPE_PORT" &
PIDS+=($!)

say "starting stagepass dev on 127.0.0.1:$API_PORT (log: $OUT/dev.log)"
# Every function configured, so none answers 503 not_configured; Ably and
# QStash point at a closed port (their deliveries fail and are retried in
# the background, as in an outage; no request waits for them). Rate limits
# are off so the fuzzer reaches the handlers rather than 429s; the limiter
# has its own tests (crates/platform/src/ratelimit, tests/rate_limits.rs).
random() { head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'; }
env -u DATABASE_URL HOST=127.0.0.1 PORT="$API_PORT" RATE_LIMITS=off \
  CRON_SECRET="$(random)" \
  STRIPE_SECRET_KEY="sk_test_fuzz$(random)" STRIPE_API_BASE="http://127.0.0.1:$STRIPE_PORT" \
  STRIPE_WEBHOOK_SECRET="whsec_$(random)" \
  ABLY_API_KEY="fuzzapp.fuzzkey:$(random)" ABLY_API_BASE="http://127.0.0.1:9" \
  QSTASH_TOKEN="$(random)" QSTASH_URL="http://127.0.0.1:9" \
  QSTASH_CURRENT_SIGNING_KEY="sig_$(random)" QSTASH_NEXT_SIGNING_KEY="sig_$(random)" \
  RUST_LOG=warn \
  "$BIN" dev --tokens-file "$OUT/tokens.json" >"$OUT/dev.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 240); do
  [ -f "$OUT/tokens.json" ] && break
  kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$OUT/dev.log"; exit 1; }
  sleep 0.5
done
[ -f "$OUT/tokens.json" ] || { echo "stagepass dev did not start" >&2; cat "$OUT/dev.log"; exit 1; }
if grep -q "not configured" "$OUT/dev.log"; then
  echo "some functions are not configured:" >&2
  sed -n '/not configured/,/^$/p' "$OUT/dev.log" >&2
  exit 1
fi
BASE="http://127.0.0.1:$API_PORT"
token() { python3 -c "import json,sys;print(json.load(open('$OUT/tokens.json'))['$1']['token'])"; }

status=0
for who in creator fan; do
  say "$who: ${SECONDS_PER_TOKEN}s, all phases, all checks"
  # The fan's token is sent on every request, including the cron, job and
  # webhook routes, whose own credentials it is not: they must refuse it.
  if ! PYTHONPATH=scripts/ci/fuzz SCHEMATHESIS_HOOKS=hooks \
    "$VENV/bin/schemathesis" --config-file scripts/ci/fuzz/schemathesis.toml run \
    "$BASE/api/v1/openapi.json" \
    --header "Authorization: Bearer $(token "$who")" \
    --phases examples,coverage,fuzzing,stateful --checks all \
    --max-time "$SECONDS_PER_TOKEN" --workers "$WORKERS" ${FUZZ_ARGS:-} \
    --request-timeout 10 --no-color \
    --generation-database "$CACHE/fuzz-examples" \
    --report ndjson,junit --report-dir "$OUT/$who" \
    >"$OUT/$who.log" 2>&1; then
    status=1
  fi
  sed -n '/= SUMMARY =/,$p' "$OUT/$who.log"
  if [ "$status" -ne 0 ]; then
    sed -n '/= FAILURES =/,/= WARNINGS =\|= SUMMARY =/p' "$OUT/$who.log" | head -200
  fi
done

# Server errors also show in the server's log, with their cause.
if grep -q '"request failed"\|request failed' "$OUT/dev.log"; then
  say "server-side errors (from $OUT/dev.log)"
  grep 'request failed' "$OUT/dev.log" | head -20
fi
say "reports in $OUT"
exit "$status"
