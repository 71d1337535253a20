#!/usr/bin/env bash
# Idempotent machine setup for building, running and testing Lattice on Debian/Ubuntu:
# system packages, a Python venv for the end-to-end tests. Models are pulled by `lattice`.
set -euo pipefail

CACHE="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
mkdir -p "$CACHE"

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# bindgen (llama-cpp-sys-2) needs libclang.
# (libclang.so itself: libclang-cpp.so, which other packages bring, does not do.)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# PostgreSQL server for the ledger tests against a second database (scripts/postgres.sh).
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
# Node.js runs the local OpenID provider for the OpenID Connect sign-in test (tests/oidc).
{ command -v node && command -v npm; } >/dev/null 2>&1 || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
fi

# The official OpenAI Python client drives our end-to-end API tests; numpy and Hugging Face's
# tokenizers run the independent reference the embeddings are checked against.
VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import openai, pytest, numpy, tokenizers' >/dev/null 2>&1; then
  echo "setup: installing the test venv (openai, pytest, numpy, tokenizers)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check 'openai>=1.50,<3' \
    'pytest>=8,<10' 'numpy>=1.26,<3' 'tokenizers>=0.19,<1' >&2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The contracts' toolchain (solc-js, forge) and anvil, the real EVM node the chain and
# settlement tests run against — all pinned in contracts/package-lock.json.
if [ ! -x "$ROOT/contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil" ] ||
   [ ! -x "$ROOT/contracts/node_modules/@foundry-rs/forge-linux-amd64/bin/forge" ]; then
  echo "setup: installing the contracts toolchain (npm ci in contracts)" >&2
  (cd "$ROOT/contracts" && npm ci --silent --no-audit --no-fund >&2)
fi

# oidc-provider, the real OpenID provider crates/accounts/tests/oidc.rs signs in against.
OIDC_DIR="$ROOT/tests/oidc"
if [ ! -d "$OIDC_DIR/node_modules/oidc-provider" ]; then
  echo "setup: installing the test OpenID provider (npm ci in tests/oidc)" >&2
  (cd "$OIDC_DIR" && npm ci --silent --no-audit --no-fund >&2)
fi

# Headless Chromium and playwright-core + axe-core (tests/ui/package-lock.json) for the web UI
# tests in a real browser. Debian's chromium: playwright never downloads a browser here.
if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium (web UI tests)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
fi
UI_DIR="$ROOT/tests/ui"
if [ ! -d "$UI_DIR/node_modules/playwright-core" ] || [ ! -d "$UI_DIR/node_modules/axe-core" ]; then
  echo "setup: installing the web UI test driver (npm ci in tests/ui)" >&2
  (cd "$UI_DIR" && npm ci --silent --no-audit --no-fund >&2)
fi
