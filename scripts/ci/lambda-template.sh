#!/usr/bin/env bash
# The AWS Lambda target's SAM template: generated from the code
# (`stagepass lambda template`, from FUNCTIONS and vercel.json) and validated
# with cfn-lint (PyPI), which also expands the SAM transform. cfn-lint lives
# in a venv in the cache folder, installed once per pinned version.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
CFN_LINT="cfn-lint==1.58.0"
VENV="$CACHE/cfn-lint"
mkdir -p "$CACHE"

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "lambda-template: installing python3-venv"
  apt-get install -y python3-venv
fi
if [ ! -f "$VENV/.installed" ] || [ "$(cat "$VENV/.installed")" != "$CFN_LINT" ]; then
  echo "lambda-template: installing $CFN_LINT into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$CFN_LINT"
  echo "$CFN_LINT" > "$VENV/.installed"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo run --quiet -p stagepass-cli -- lambda template --output "$out/template.json"
functions="$(grep -c '"AWS::Serverless::Function"' "$out/template.json")"
"$VENV/bin/cfn-lint" "$out/template.json"
echo "lambda-template: $functions functions, SAM template passes $CFN_LINT"
