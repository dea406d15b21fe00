# Sourced by scripts/ci/openapi.sh and scripts/ci/fuzz.sh: installs the
# pinned OpenAPI tools into the cache (outside the repository), once per
# version set. Re-running reuses them.

# Python: an independent OpenAPI 3.1 validator and Schemathesis.
OPENAPI_PY_TOOLS="openapi-spec-validator==0.9.0 schemathesis==4.32.5"
# npm: the TypeScript type generator, and tsc to check what it makes.
OPENAPI_NPM_TOOLS="openapi-typescript@7.13.0 typescript@5.9.3"

python_tools() {
  local venv=$1
  if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$OPENAPI_PY_TOOLS" ]; then
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
      apt-get install -y python3-venv
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet $OPENAPI_PY_TOOLS
    echo "$OPENAPI_PY_TOOLS" >"$venv/.installed"
  fi
}

npm_tools() {
  local dir=$1
  if ! command -v npm >/dev/null; then
    apt-get install -y nodejs npm
  fi
  if [ ! -f "$dir/.installed" ] || [ "$(cat "$dir/.installed")" != "$OPENAPI_NPM_TOOLS" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    echo '{ "private": true }' >"$dir/package.json"
    # shellcheck disable=SC2086
    (cd "$dir" && npm install --silent --no-audit --no-fund --save-exact $OPENAPI_NPM_TOOLS)
    echo "$OPENAPI_NPM_TOOLS" >"$dir/.installed"
  fi
}
