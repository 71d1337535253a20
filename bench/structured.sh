#!/usr/bin/env bash
# Grammar-constrained decoding side by side: llama.cpp's llama-server and the lattice node, same
# GGUF, same threads, one slot, alternated ROUNDS times (llama-server, lattice, llama-server, …)
# so the host's drift hits both alike; each round runs bench/structured.py (free text, JSON mode,
# json_schema; medians of --runs).
#
#   bench/structured.sh [--rounds 2] [--runs 5] [--threads 2]
#
# Env: LATTICE_BIN (default $CARGO_TARGET_DIR/dist/lattice), LATTICE_CACHE_DIR.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
LATTICE_BIN="${LATTICE_BIN:-${CARGO_TARGET_DIR:-$CACHE/target}/dist/lattice}"
ROUNDS=2
RUNS=5
THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$LATTICE_BIN" ] || { echo "no lattice binary at $LATTICE_BIN (./lattice builds it)" >&2; exit 2; }
MODEL=smollm2-135m
"$LATTICE_BIN" model pull "$MODEL" >/dev/null
GGUF="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_SERVER="$("$HERE/build-llama-server.sh" | tail -n1)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "server on port $1 did not come up" >&2; return 1
}
one() {
  local label="$1"; shift
  local port; port="$(free_port)"
  "$@" --port "$port" >"/tmp/structured-$label.log" 2>&1 &
  local pid=$!
  wait_up "$port"
  echo "== $label"
  python3 "$HERE/structured.py" --url "http://127.0.0.1:$port" --model "$MODEL" --runs "$RUNS"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
for _ in $(seq 1 "$ROUNDS"); do
  one llama-server "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -np 1 -c 2048 --host 127.0.0.1
  one lattice "$LATTICE_BIN" node --standalone --model "$MODEL" --threads "$THREADS" \
    --parallel 1 --ctx-per-slot 2048 --host 127.0.0.1
done
