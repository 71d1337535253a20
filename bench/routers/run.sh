#!/usr/bin/env bash
# Side-by-side request-routing overhead: lattice (Nexus + node --upstream) vs
# sglang-router, vllm-router and the LiteLLM proxy, all in front of the same canned
# OpenAI-compatible upstream (nginx serving fixed JSON / SSE bodies), plus the
# upstream called directly as the baseline. Everything binds to 127.0.0.1.
#
#   bench/routers/run.sh [--targets direct,lattice,lattice-node,sglang-router,vllm-router,litellm]
#                        [--rates 200,1000] [--fallback-rates 50,20] [--duration 5]
#                        [--wrk-conns 32] [--wrk-duration 5] [--wrk-runs 3] [--conns 64]
#                        [--wait-quiet 120] [--no-pin] [--skip-install] [--note TEXT]
#
# Per target and mode (non-streaming, streaming POST /v1/chat/completions):
#   1. fixed-rate open-loop load at each --rates value for --duration s (after 1 s of
#      warm-up), p50/p99 time to full response; "added" = minus the direct upstream's;
#      if the first rate already saturates a target it is also measured at --fallback-rates
#      (in turn, until one is sustained)
#   2. max throughput: wrk -t1 -c32 -d5s -s post.lua, --wrk-runs times; the median run's
#      req/s and CPU s of the target's processes (every run's req/s in the JSON)
# Before every load it waits (up to --wait-quiet s) for the CPUs to be >= 90% idle.
# By default the router under test is pinned to CPU 0 and nginx + the load generators
# to CPU 1 (--no-pin: no pinning), so "max req/s" is what one core of router does.
#
# Results: bench/routers/results/TS-LABEL-MODE.json, TS-summary.{json,md}, latest.md,
# and the servers' logs in results/TS-logs/.
#
# Env: LATTICE_BIN (default $LATTICE_CACHE_DIR/target/dist/lattice, the build ./lattice runs),
#      LATTICE_LOADGEN (the fixed-rate client; default $LATTICE_CACHE_DIR/target/release/
#      lattice-loadgen, built by `cargo build --release -p lattice-loadgen` or ./test),
#      LATTICE_CACHE_DIR (default ~/.cache/lattice; peer venvs live in its bench/venvs/),
#      PYTHON (default python3; used for the venvs and the harness),
#      BENCH_BILLED_NEXUS_ARGS (extra arguments of the billed Nexus, e.g. --no-chain).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
LATTICE_CACHE_DIR="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
LATTICE_BIN="${LATTICE_BIN:-$LATTICE_CACHE_DIR/target/dist/lattice}"
LATTICE_LOADGEN="${LATTICE_LOADGEN:-$LATTICE_CACHE_DIR/target/release/lattice-loadgen}"
VENVS="$LATTICE_CACHE_DIR/bench/venvs"
RESULTS="$HERE/results"

# Pinned peers. LiteLLM 1.82.7 and 1.82.8 were credential-stealing malware on the
# registry: never install an unpinned LiteLLM.
SGLANG_SPEC="sglang-router==0.3.2"
VLLM_SPEC="vllm-router==0.1.17"
LITELLM_SPEC="litellm[proxy]==1.82.6"
LITELLM_VERSION="1.82.6"

TARGETS="direct,lattice,lattice-billed,lattice-node,sglang-router,vllm-router,litellm"
RATES="200,1000"
FALLBACK_RATES="50,20"
DURATION=5
WRK_CONNS=32
WRK_DURATION=5
WRK_RUNS=3
CONNS=64
WAIT_QUIET=120
PIN=1
INSTALL=1
NOTE=""

usage() { awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --targets) TARGETS="$2"; shift 2 ;;
    --rates) RATES="$2"; shift 2 ;;
    --fallback-rates) FALLBACK_RATES="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --wrk-conns) WRK_CONNS="$2"; shift 2 ;;
    --wrk-duration) WRK_DURATION="$2"; shift 2 ;;
    --wrk-runs) WRK_RUNS="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --wait-quiet) WAIT_QUIET="$2"; shift 2 ;;
    --no-pin) PIN=0; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --note) NOTE="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
(( WRK_DURATION <= 10 )) || { echo "--wrk-duration must be <= 10" >&2; exit 2; }
(( WRK_RUNS >= 1 && WRK_RUNS <= 5 )) || { echo "--wrk-runs must be 1 to 5" >&2; exit 2; }

log() { echo "[routers] $*" >&2; }
want() { [[ ",$TARGETS," == *",$1,"* ]]; }

TS="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lattice-routers.XXXXXX")"
LOGS="$RESULTS/$TS-logs"
mkdir -p "$LOGS"
NOTES="$WORK/notes.json"
echo '{}' > "$NOTES"
note() {  # note LABEL TEXT: shown under the table (and as the row when a target did not run)
  "$PYTHON" - "$NOTES" "$1" "$2" <<'PY'
import json, sys
p, k, v = sys.argv[1:]
d = json.load(open(p))
d[k] = (d.get(k, "") + ("; " if d.get(k) else "") + v)
json.dump(d, open(p, "w"))
PY
}

if [[ "$PIN" == 1 && "$(nproc)" -ge 2 ]] && command -v taskset >/dev/null; then
  ROUTER_PIN=(taskset -c 0); CLIENT_PIN=(taskset -c 1); CLIENT_CPU=1
else
  PIN=0; ROUTER_PIN=(); CLIENT_PIN=(); CLIENT_CPU=""
fi

# ---- process bookkeeping: each server runs in its own session (setsid), stopped by id
PIDS=()
start_bg() {  # start_bg LOGFILE CMD... ; sets BG_PID (= the session id, used to stop it)
  local logf="$1"; shift
  setsid "$@" > "$logf" 2>&1 < /dev/null &
  BG_PID=$!
  PIDS+=("$BG_PID")
}
stop_pid() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
stop_all() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  PIDS=()
}
cleanup() {
  stop_all
  [[ -n "${NGINX_PID:-}" ]] && stop_pid "$NGINX_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# the fixed-rate client (crates/loadgen), a private copy like the lattice binary's
if [[ ! -x "$LATTICE_LOADGEN" ]]; then
  echo "no load generator at $LATTICE_LOADGEN: cargo build --release -p lattice-loadgen (or set LATTICE_LOADGEN)" >&2
  exit 2
fi
cp "$LATTICE_LOADGEN" "$WORK/loadgen-bin"

free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
wait_ok() {  # wait_ok URL [--stream] TIMEOUT_S : one good chat completion through URL
  local url="$1" flag="$2" t="$3" i
  for ((i = 0; i < t * 2; i++)); do
    if "$PYTHON" "$HERE/routers.py" check --url "$url" $flag --timeout 5 > "$WORK/check.out" 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  log "no good answer from $url after ${t}s: $(head -c 400 "$WORK/check.out")"
  return 1
}
measure() {  # measure LABEL MODE URL PIDS UPSTREAM_PATH NOTE [RATES] ; PID_NAMES from env
  "${CLIENT_PIN[@]}" "$PYTHON" "$HERE/routers.py" measure --label "$1" --mode "$2" --url "$3" \
    --pids "$4" --pid-names "${PID_NAMES:-}" --upstream-pids "$NGINX_PID" --upstream-path "$5" --note "$6" \
    --rates "${7:-$RATES}" --fallback-rate "$FALLBACK_RATES" --duration "$DURATION" \
    --conns "$CONNS" --loadgen "$WORK/loadgen-bin" --wrk-conns "$WRK_CONNS" --wrk-duration "$WRK_DURATION" --wrk-runs "$WRK_RUNS" \
    ${CLIENT_CPU:+--client-cpu "$CLIENT_CPU"} --wait-quiet "$WAIT_QUIET" \
    --out "$RESULTS/$TS-$1-$2.json" \
    || { log "$1 $2: measurement failed"; note "$1" "$2 measurement failed"; }
}

# ---- 0. tools -----------------------------------------------------------------
for tool in nginx wrk; do
  if ! command -v "$tool" >/dev/null && [[ ! -x "/usr/sbin/$tool" ]]; then
    if [[ "$INSTALL" == 1 ]] && command -v apt-get >/dev/null; then
      log "installing nginx and wrk (Debian packages)"
      apt-get install -y nginx wrk > "$LOGS/apt.log" 2>&1 \
        || { apt-get update > /dev/null 2>&1 && apt-get install -y nginx wrk > "$LOGS/apt.log" 2>&1; } \
        || { log "apt-get install nginx wrk failed (see $LOGS/apt.log)"; exit 1; }
    else
      log "$tool missing: apt-get install -y nginx wrk"; exit 1
    fi
  fi
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# ---- 1. peer venvs (pinned) -----------------------------------------------------
ensure_venv() {  # ensure_venv NAME PIP_SPEC DIST VERSION
  local name="$1" spec="$2" dist="$3" ver="$4" dir="$VENVS/$1" have
  have="$("$dir/bin/python" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true)"
  if [[ "$have" == "$ver" ]]; then return 0; fi
  if [[ "$INSTALL" == 0 ]]; then log "$name: not installed in $dir (--skip-install)"; return 1; fi
  log "installing $spec into $dir"
  rm -rf "$dir"
  mkdir -p "$VENVS"
  "$PYTHON" -m venv "$dir" \
    && "$dir/bin/pip" install -q "$spec" > "$LOGS/install-$name.log" 2>&1 \
    || { log "$name: pip install $spec failed (see $LOGS/install-$name.log)"; return 1; }
  have="$("$dir/bin/python" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true)"
  [[ "$have" == "$ver" ]] || { log "$name: got version '$have', wanted $ver"; return 1; }
}
PEER_OK=()
if want sglang-router; then
  ensure_venv sglang-router "$SGLANG_SPEC" sglang-router 0.3.2 && PEER_OK+=(sglang-router) \
    || note sglang-router "not run: install of $SGLANG_SPEC failed"
fi
if want vllm-router; then
  ensure_venv vllm-router "$VLLM_SPEC" vllm-router 0.1.17 && PEER_OK+=(vllm-router) \
    || note vllm-router "not run: install of $VLLM_SPEC failed"
fi
if want litellm; then
  ensure_venv litellm "$LITELLM_SPEC" litellm "$LITELLM_VERSION" && PEER_OK+=(litellm) \
    || note litellm "not run: install of $LITELLM_SPEC failed"
fi
peer_ok() { [[ " ${PEER_OK[*]:-} " == *" $1 "* ]]; }

# ---- 2. canned upstream -----------------------------------------------------------
JSON_PORT="$(free_port)"; SSE_PORT="$(free_port)"
"$PYTHON" "$HERE/routers.py" nginx-conf --json-port "$JSON_PORT" --sse-port "$SSE_PORT" \
  --dir "$WORK/nginx" > /dev/null
cp "$WORK/nginx/nginx.conf" "$LOGS/nginx.conf"
setsid "${CLIENT_PIN[@]}" "$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" -e "$WORK/nginx/error.log" \
  > "$LOGS/nginx.log" 2>&1 < /dev/null &
NGINX_PID=$!
JSON_URL="http://127.0.0.1:$JSON_PORT"
SSE_URL="http://127.0.0.1:$SSE_PORT"
wait_ok "$JSON_URL" "" 10 && wait_ok "$SSE_URL" --stream 10 \
  || { log "canned upstream did not come up"; cat "$WORK/nginx/error.log" >&2 || true; exit 1; }
log "upstream: nginx pid $NGINX_PID, JSON $JSON_URL, SSE $SSE_URL (pinned: $([[ $PIN == 1 ]] && echo 'router cpu0, upstream+client cpu1' || echo no))"

# ---- 3. targets -------------------------------------------------------------------
if want direct; then
  # direct is also measured at the fallback rates: the baseline for peers that saturate
  measure direct nonstream "$JSON_URL" "$NGINX_PID" "JSON :$JSON_PORT" "" "$FALLBACK_RATES,$RATES"
  measure direct stream "$SSE_URL" "$NGINX_PID" "SSE :$SSE_PORT" "" "$FALLBACK_RATES,$RATES"
fi

if want lattice || want lattice-node || want lattice-billed; then
  if [[ ! -x "$LATTICE_BIN" ]]; then
    log "lattice: no binary at $LATTICE_BIN"; note lattice "not run: no binary at $LATTICE_BIN"
  else
    # run a private copy: a concurrent cargo build may replace $LATTICE_BIN mid-run
    LATTICE_BUILT="$(date -u -r "$LATTICE_BIN" +%FT%TZ)"
    cp "$LATTICE_BIN" "$WORK/lattice-bin"
    LATTICE_SHA="$(sha256sum "$WORK/lattice-bin" | cut -c1-12)"
    log "lattice: $LATTICE_BIN (built $LATTICE_BUILT, sha256 $LATTICE_SHA)"
    LATTICE_RUN="$WORK/lattice-bin"
    NEXUS_PORT="$(free_port)"
    mkdir -p "$WORK/lattice"
    start_bg "$LOGS/lattice-nexus.log" "${ROUTER_PIN[@]}" "$LATTICE_RUN" nexus --no-billing \
      --listen "127.0.0.1:$NEXUS_PORT" --db "$WORK/lattice/nexus.db" --max-in-flight 4096
    NEXUS_PID=$BG_PID
    for _ in $(seq 100); do grep -q "listening on" "$LOGS/lattice-nexus.log" && break; sleep 0.1; done
    start_bg "$LOGS/lattice-node.log" "${ROUTER_PIN[@]}" "$LATTICE_RUN" node \
      --nexus "http://127.0.0.1:$NEXUS_PORT" --upstream "$SSE_URL/v1" --model-id bench-model \
      --port 0 --key "$WORK/lattice/node.key" --parallel 256 --queue 4096 --max-in-flight 4096
    NODE_PID=$BG_PID
    NEXUS_URL="http://127.0.0.1:$NEXUS_PORT"
    if "$PYTHON" "$HERE/routers.py" wait-models --url "$NEXUS_URL" --timeout 60 > "$WORK/models.out" 2>&1 \
       && wait_ok "$NEXUS_URL" "" 30 && wait_ok "$NEXUS_URL" --stream 10; then
      LNOTE="client -> Nexus -> node -> SSE upstream in both modes (Nexus aggregates the stream for non-streaming clients)"
      if want lattice; then
        PID_NAMES=nexus,node measure lattice nonstream "$NEXUS_URL" "$NEXUS_PID,$NODE_PID" "SSE :$SSE_PORT (node always streams)" "$LNOTE"
        PID_NAMES=nexus,node measure lattice stream "$NEXUS_URL" "$NEXUS_PID,$NODE_PID" "SSE :$SSE_PORT" "$LNOTE"
      fi
      # the same node called directly (no Nexus): splits lattice's cost into Nexus vs node
      NODE_URL="$(grep -o 'listening on http://[0-9.:]*' "$LOGS/lattice-node.log" | head -n1 | sed 's/listening on //')"
      if want lattice-node && [[ -n "$NODE_URL" ]] && wait_ok "$NODE_URL" "" 10; then
        NNOTE="client -> node -> SSE upstream (the node's own OpenAI endpoint, bypassing Nexus; still linked)"
        measure lattice-node nonstream "$NODE_URL" "$NODE_PID" "SSE :$SSE_PORT (node always streams)" "$NNOTE"
        measure lattice-node stream "$NODE_URL" "$NODE_PID" "SSE :$SSE_PORT" "$NNOTE"
      fi
    else
      log "lattice did not come up: $(cat "$WORK/models.out")"; tail -n 20 "$LOGS"/lattice-*.log >&2
      note lattice "not run: Nexus never listed bench-model / answered (see $TS-logs/)"
    fi
    stop_pid "$NODE_PID"; stop_pid "$NEXUS_PID"
    # The same network with billing on: API key auth, hold, signed receipt, charge per request.
    if want lattice-billed; then
      BPORT="$(free_port)"; mkdir -p "$WORK/billed"
      start_bg "$LOGS/lattice-billed-nexus.log" "${ROUTER_PIN[@]}" "$LATTICE_RUN" nexus \
        --listen "127.0.0.1:$BPORT" --db "$WORK/billed/nexus.db" --max-in-flight 4096 \
        --operator-key-file "$WORK/billed/operator.key" ${BENCH_BILLED_NEXUS_ARGS:-}
      BNEXUS_PID=$BG_PID
      for _ in $(seq 100); do grep -q "listening on" "$LOGS/lattice-billed-nexus.log" && break; sleep 0.1; done
      start_bg "$LOGS/lattice-billed-node.log" "${ROUTER_PIN[@]}" "$LATTICE_RUN" node \
        --nexus "http://127.0.0.1:$BPORT" --upstream "$SSE_URL/v1" --model-id bench-model \
        --port 0 --key "$WORK/billed/node.key" --parallel 256 --queue 4096 --max-in-flight 4096
      BNODE_PID=$BG_PID
      export BENCH_AUTH="$(cat "$WORK/billed/operator.key" 2>/dev/null)"
      BURL="http://127.0.0.1:$BPORT"
      if "$PYTHON" "$HERE/routers.py" wait-models --url "$BURL" --timeout 60 > "$WORK/models.out" 2>&1 \
         && wait_ok "$BURL" "" 30 && wait_ok "$BURL" --stream 10; then
        BNOTE="as lattice, with billing on: API key, hold, EIP-712 receipt verified, charge (SQLite ledger)"
        PID_NAMES=nexus,node measure lattice-billed nonstream "$BURL" "$BNEXUS_PID,$BNODE_PID" "SSE :$SSE_PORT (node always streams)" "$BNOTE"
        PID_NAMES=nexus,node measure lattice-billed stream "$BURL" "$BNEXUS_PID,$BNODE_PID" "SSE :$SSE_PORT" "$BNOTE"
      else
        log "lattice-billed did not come up"; tail -n 20 "$LOGS"/lattice-billed-*.log >&2
        note lattice-billed "not run: did not come up (see $TS-logs/)"
      fi
      unset BENCH_AUTH
      stop_pid "$BNODE_PID"; stop_pid "$BNEXUS_PID"
    fi
  fi
fi

# run_peer LABEL MODE UPSTREAM_URL NOTE CMD... : start CMD (PORT in $PEER_PORT), measure, stop
run_peer() {
  local label="$1" mode="$2" up="$3" pnote="$4"; shift 4
  local flag=""; [[ "$mode" == stream ]] && flag="--stream"
  start_bg "$LOGS/$label-$mode.log" "${ROUTER_PIN[@]}" "$@"
  local pid=$BG_PID
  if wait_ok "http://127.0.0.1:$PEER_PORT" "$flag" 90; then
    measure "$label" "$mode" "http://127.0.0.1:$PEER_PORT" "$pid" \
      "$([[ $mode == stream ]] && echo "SSE :$SSE_PORT" || echo "JSON :$JSON_PORT")" "$pnote"
  else
    log "$label ($mode) did not answer; last log lines:"; tail -n 20 "$LOGS/$label-$mode.log" >&2
    note "$label" "$mode not run: router never answered (see $TS-logs/$label-$mode.log)"
  fi
  stop_pid "$pid"
}

for mode in nonstream stream; do
  up="$JSON_URL"; [[ "$mode" == stream ]] && up="$SSE_URL"
  if want sglang-router && peer_ok sglang-router; then
    PEER_PORT="$(free_port)"; PROM_PORT="$(free_port)"
    run_peer sglang-router "$mode" "$up" "policy round_robin, log warn" \
      "$VENVS/sglang-router/bin/sglang-router" launch --host 127.0.0.1 --port "$PEER_PORT" \
      --worker-urls "$up" --policy round_robin --log-level warn \
      --prometheus-host 127.0.0.1 --prometheus-port "$PROM_PORT"
  fi
  if want vllm-router && peer_ok vllm-router; then
    PEER_PORT="$(free_port)"; PROM_PORT="$(free_port)"
    run_peer vllm-router "$mode" "$up" "policy round_robin (not the default cache_aware), log warning" \
      "$VENVS/vllm-router/bin/vllm-router" --host 127.0.0.1 --port "$PEER_PORT" \
      --worker-urls "$up" --policy round_robin --log-level warning \
      --prometheus-host 127.0.0.1 --prometheus-port "$PROM_PORT"
  fi
  if want litellm && peer_ok litellm; then
    PEER_PORT="$(free_port)"
    "$PYTHON" "$HERE/routers.py" litellm-conf --api-base "$up/v1" --out "$WORK/litellm-$mode.yaml" \
      --log-config "$WORK/litellm-log.json"
    cp "$WORK/litellm-$mode.yaml" "$LOGS/"
    run_peer litellm "$mode" "$up" "1 uvicorn worker, no DB, access log off" \
      env LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
      "$VENVS/litellm/bin/litellm" --config "$WORK/litellm-$mode.yaml" --host 127.0.0.1 \
      --port "$PEER_PORT" --num_workers 1 --telemetry False --log_config "$WORK/litellm-log.json"
  fi
done

# ---- 4. report ----------------------------------------------------------------------
HDR="Canned nginx upstream (JSON for non-streaming peers, SSE for streaming peers and for lattice always); $(nproc) cores"
[[ "$PIN" == 1 ]] && HDR+=", router under test pinned to cpu0, nginx + load generators to cpu1"
HDR+=". Added latency = p50/p99 of time to full response minus the direct upstream's at the same rate (open loop, ${DURATION}s). Max req/s: wrk -t1 -c$WRK_CONNS -d${WRK_DURATION}s, median of $WRK_RUNS runs."
[[ -n "$NOTE" ]] && HDR+=" Note: $NOTE"
vers() {  # vers VENV DIST
  "$VENVS/$1/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))" 2>/dev/null || echo "-"
}
"$PYTHON" - "$RESULTS/$TS-versions.json" \
  "lattice=$("${LATTICE_RUN:-$LATTICE_BIN}" --version 2>/dev/null | awk '{print $NF}' || echo -) (binary built ${LATTICE_BUILT:-?}, sha256 ${LATTICE_SHA:-?}; tree at $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$HERE" diff --quiet HEAD -- ../../crates 2>/dev/null || echo ', crates/ modified'))" \
  "sglang-router=$(vers sglang-router sglang-router)" "vllm-router=$(vers vllm-router vllm-router)" \
  "litellm=$(vers litellm litellm)" "nginx=$("$NGINX" -v 2>&1 | sed 's|.*/||')" \
  "wrk=$(wrk -v 2>&1 | head -n1 | awk '{print $2}')" <<'PY'
import json, sys
json.dump(dict(kv.split("=", 1) for kv in sys.argv[2:]), open(sys.argv[1], "w"), indent=2)
PY
"$PYTHON" "$HERE/routers.py" report --dir "$RESULTS" --ts "$TS" --notes "$NOTES" --rates "$RATES" \
  --versions "$RESULTS/$TS-versions.json" --header "$HDR"
cp "$RESULTS/$TS-summary.md" "$RESULTS/latest.md"
cp "$NOTES" "$RESULTS/$TS-notes.json"
printf '%s\n' "$HDR" > "$RESULTS/$TS-header.txt"
log "results: $RESULTS/$TS-*.json, table: $RESULTS/latest.md"
