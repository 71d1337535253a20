#!/usr/bin/env bash
# Rebuilds contracts/artifacts/ from the Solidity sources (needs `npm ci` in contracts/).
# With --check, builds into a temporary directory and fails if the committed artifacts differ.
# FORGE_OUT / FORGE_CACHE reuse a build directory across runs (./test keeps one in its cache).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x node_modules/.bin/forge ] || [ -x node_modules/@foundry-rs/forge-linux-amd64/bin/forge ] || npm ci --no-audit --no-fund
forge=node_modules/@foundry-rs/forge-linux-amd64/bin/forge
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out="${FORGE_OUT:-$tmp/out}"
"$forge" build --skip test --out "$out" --cache-path "${FORGE_CACHE:-$tmp/cache}" >/dev/null
if [ "${1:-}" = "--check" ]; then
  node scripts/artifacts.js "$out" "$tmp/artifacts"
  if ! diff -r "$tmp/artifacts" artifacts >/dev/null; then
    echo "contracts/artifacts/ is stale: run contracts/scripts/artifacts.sh and commit the result" >&2
    exit 1
  fi
  echo "contracts/artifacts/ is current"
else
  node scripts/artifacts.js "$out" artifacts
  echo "wrote contracts/artifacts/"
fi
