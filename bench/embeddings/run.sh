#!/usr/bin/env bash
# Side by side: /v1/embeddings of a lattice node (candle) and of llama.cpp's llama-server, the same
# all-MiniLM-L6-v2 weights in F32 (converted to GGUF by to_gguf.py: llama.cpp's own converter
# needs torch), 2 threads each, one server at a time on 127.0.0.1, the same load from bench.py:
# sequential requests of BATCH texts, then single-text requests from CLIENTS threads.
#
#   bench/embeddings/run.sh [--requests 20] [--batch 64] [--clients 4] [--singles 200]
#
# Env: LATTICE_BIN (default: the dist binary), LATTICE_CACHE_DIR (~/.cache/lattice).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LATTICE_CACHE_DIR="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
CACHE="$LATTICE_CACHE_DIR/bench"
LATTICE_BIN="${LATTICE_BIN:-${CARGO_TARGET_DIR:-$LATTICE_CACHE_DIR/target}/dist/lattice}"
PY="$LATTICE_CACHE_DIR/venv/bin/python"
ARGS=("$@")
OUT="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

"$LATTICE_BIN" model pull all-minilm-l6-v2 >&2
SERVER="$("$HERE/../build-llama-server.sh" | tail -n1)"
LCPP="$(ls -d "$CACHE"/llama-cpp-python-*/vendor/llama.cpp | head -n1)"
GGUF="$CACHE/all-MiniLM-L6-v2.f32.gguf"
if [ ! -f "$GGUF" ]; then
  PYTHONPATH="$LCPP/gguf-py" "$PY" "$HERE/to_gguf.py" "$LATTICE_CACHE_DIR/models" "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$SERVER" -m "$GGUF" --embedding --pooling mean -t 2 -tb 2 -c 16384 -b 4096 -ub 4096 -np 8 \
  --host 127.0.0.1 --port "$port" >"$OUT/llama-server.log" 2>&1 &
peer=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
"$PY" "$HERE/bench.py" run --url "http://127.0.0.1:$port/v1" --name llama-server --out "$OUT/peer.json" "${ARGS[@]}"
kill "$peer"; wait "$peer" 2>/dev/null || true

"$LATTICE_BIN" node --standalone --model all-minilm-l6-v2 --port 0 --queue 64 >"$OUT/node.log" 2>&1 &
node=$!
for _ in $(seq 300); do grep -q "listening on" "$OUT/node.log" && break; sleep 0.2; done
url="$(grep -m1 "listening on" "$OUT/node.log" | awk '{print $NF}')"
"$PY" "$HERE/bench.py" run --url "$url/v1" --name lattice --out "$OUT/ours.json" "${ARGS[@]}"
kill "$node"; wait "$node" 2>/dev/null || true

echo "binary: $LATTICE_BIN ($(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')); llama-server: $SERVER"
"$PY" "$HERE/bench.py" report "$OUT/ours.json" "$OUT/peer.json"
