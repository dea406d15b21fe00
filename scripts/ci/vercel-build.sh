#!/usr/bin/env bash
# Builds every function with Vercel's own tooling — the `vercel` CLI's
# `vercel build` and the `@vercel/rust` builder it loads, pinned in
# scripts/ci/vercel-builder/ — offline, from a copy of this checkout, then
# checks the Build Output (.vercel/output) and runs two of the built
# executables. ADR 0008; README "Deploying → Vercel".
#
#   scripts/ci/vercel-build.sh              # CI: unoptimised release profile
#   STAGEPASS_VERCEL_RELEASE=1 scripts/ci/vercel-build.sh
#                                           # the real profile (fat LTO), as Vercel builds it
#
# No Vercel account: scripts/ci/vercel-project.json stands in for the
# `.vercel/project.json` that `vercel link`/`vercel pull` would write.
# Installs into $CACHE/vercel-builder (reused while the lockfile is unchanged).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
DIR="$CACHE/vercel-builder"
WORK="$DIR/work"
mkdir -p "$DIR"

say() { printf '\n== vercel-build: %s\n' "$*"; }

# Node.js >= 20 (the CLI's engines field).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  say "installing nodejs and npm (apt)"
  apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  { echo "vercel-build: Node.js >= 20 is required (have $(node --version))" >&2; exit 1; }

say "builder (cached in $DIR)"
# package.json pins vercel 64.0.2, which pins its builder, @vercel/rust
# 20.0.0 (same code as 20.0.1). Keep that one: given another version the CLI
# downloads its own into the project's .vercel/builders on every build.
# vercel 64.0.2 also pins `sandbox` 4.4.0, which the registry does not serve;
# `vercel build` never loads it, so it is overridden to 4.5.0.
STAMP="$(cat scripts/ci/vercel-builder/package.json scripts/ci/vercel-builder/package-lock.json | sha256sum | cut -c1-16)"
if [ ! -x "$DIR/node_modules/.bin/vercel" ] || [ "$(cat "$DIR/.installed" 2>/dev/null)" != "$STAMP" ]; then
  cp scripts/ci/vercel-builder/package.json scripts/ci/vercel-builder/package-lock.json "$DIR/"
  # `npm install` with the lockfile, not `npm ci`: the lockfile cannot list
  # the CLI's optional native packages for other platforms (not served here),
  # and `npm ci` refuses a lockfile without them.
  (cd "$DIR" && npm install --no-audit --no-fund --loglevel=error)
  echo "$STAMP" > "$DIR/.installed"
fi
"$DIR/node_modules/.bin/vercel" --version 2>/dev/null | tail -n1

say "project copy"
# What a deployment uploads: the checked-in files (plus uncommitted edits),
# never target/ or ignored files such as .env.
rm -rf "$WORK"
mkdir -p "$WORK/.vercel"
git ls-files -z --cached --others --exclude-standard |
  (while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
  tar --null -T - -cf - | tar -xf - -C "$WORK"
# tar restores the files' times but not the directories' (they are not in the
# archive): a fresh `migrations/` would look changed to the platform build
# script's rerun-if-changed and rebuild every crate on every run.
find "$WORK" -type d -print0 | xargs -0 touch -h -d @946684800
cp scripts/ci/vercel-project.json "$WORK/.vercel/project.json"

# As on Vercel's build image: with VERCEL_BUILD_IMAGE set, @vercel/rust runs
# `cargo build --bin <name> --release` natively; without it, it cross-builds
# with `cargo zigbuild` (a `vercel build` for `vercel deploy --prebuilt` on a
# laptop). A target directory of its own: the unoptimised profile below must
# not overwrite the real release binaries in the shared one.
export VERCEL_BUILD_IMAGE=1 VERCEL_TELEMETRY_DISABLED=1 NO_UPDATE_NOTIFIER=1
export CARGO_TARGET_DIR="$DIR/target"
if [ "${STAGEPASS_VERCEL_RELEASE:-0}" = 1 ]; then
  variant="release (fat LTO, Cargo.toml's [profile.release])"
else
  # The builder has no fast variant for `vercel build` (its debug mode is
  # `vercel dev` only): same commands, same builder, the release profile
  # overridden to compile quickly. Fat LTO of 27 binaries takes far longer
  # than a CI run on 2 cores.
  variant="CI (release profile without LTO/optimisation)"
  export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=256 CARGO_PROFILE_RELEASE_INCREMENTAL=true
fi

say "vercel build: $variant"
start=$(date +%s)
if ! (cd "$WORK" && "$DIR/node_modules/.bin/vercel" build --yes >"$DIR/build.log" 2>&1); then
  tail -n 60 "$DIR/build.log"
  echo "vercel-build: vercel build failed (full log: $DIR/build.log)" >&2
  exit 1
fi
elapsed=$(( $(date +%s) - start ))
grep -E 'Build Completed' "$DIR/build.log" || true
# The builder must be the pinned one from the cache, not a download.
if grep -q 'Installing Builder' "$DIR/build.log"; then
  grep 'Installing Builder' "$DIR/build.log"
  echo "vercel-build: the CLI downloaded a builder instead of using its pinned one" >&2
  exit 1
fi
echo "vercel build took ${elapsed}s ($variant)"

say "build output"
node scripts/ci/vercel-output-check.cjs "$WORK" "$DIR"

say "built executables answer"
# Started as Vercel's runtime starts them locally (vercel_runtime's dev
# server on VERCEL_DEV_PORT), from the paths the output points at.
exe_of() {
  node -e '
    const [work, fn] = process.argv.slice(1);
    const cfg = require(`${work}/.vercel/output/functions/${fn}.func/.vc-config.json`);
    const m = (cfg.filePathMap || {})[cfg.handler];
    console.log(m ? require("path").resolve(work, m) : `${work}/.vercel/output/functions/${fn}.func/${cfg.handler}`);
  ' "$WORK" "$1"
}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start_fn() { # function-path port env...
  local exe port=$2
  exe="$(exe_of "$1")"
  shift 2
  env -i PATH="$PATH" VERCEL_DEV_PORT="$port" "$@" "$exe" >"$DIR/run-$port.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/_vercel/ping" && return 0
    sleep 0.1
  done
  cat "$DIR/run-$port.log"
  echo "vercel-build: $exe did not start" >&2
  return 1
}
expect() { # want-status url
  local got
  got=$(curl -s -o "$DIR/body" -w '%{http_code}' "$2")
  if [ "$got" != "$1" ]; then
    echo "vercel-build: $2 answered $got, want $1: $(cat "$DIR/body")" >&2
    exit 1
  fi
  echo "$1 $2"
}
port_health=$((20000 + RANDOM % 20000))
start_fn api/health "$port_health" APP_ENV=development
expect 200 "http://127.0.0.1:$port_health/api/health"
grep -q '"status":"ok"' "$DIR/body"
# `[id].rs` as Vercel delivers `/api/v1/classes/<uuid>?id=x`: the segment
# added to the query next to the client's own `id`. Not refused as a
# repeated parameter (401: it reached the handler, which wants a token);
# another repeated parameter still is (400). Its database is never reached.
port_class=$((port_health + 1))
start_fn 'api/v1/classes/[id]' "$port_class" APP_ENV=development \
  DATABASE_URL=postgres://nobody:none@127.0.0.1:9/none SUPABASE_URL=http://127.0.0.1:9
id=0b7d6a2e-0000-4000-8000-000000000001
expect 401 "http://127.0.0.1:$port_class/api/v1/classes/$id?id=$id&id=x"
expect 401 "http://127.0.0.1:$port_class/api/v1/classes/$id?id=x&id=$id"
expect 400 "http://127.0.0.1:$port_class/api/v1/classes/$id?id=$id&a=1&a=2"
echo "vercel-build: OK in ${elapsed}s of vercel build ($variant)"
