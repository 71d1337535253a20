#!/usr/bin/env bash
# Billing on vs off with a real model: one lattice binary, alternated (off on off on …), each run
# on a fresh network, so the host's drift between minutes hits both modes alike.
#
#   bench/routers/billing.sh [--runs 4] [--duration 20] [--conns 8] [--parallel 8]
#                            [--model smollm2-135m] [--max-tokens 16] [BIN]
#
# Per run: a Nexus (with `--no-billing` for "off"; billed requests carry the operator's API key,
# so Nexus authenticates, holds credit, verifies the node's signed receipts and charges) and one
# `node --model MODEL --parallel N` (the real engine, pulled into the model cache if missing),
# both on all CPUs; waits until the model is listed (calibration passed), 5 s of warm-up, then
# `wrk -t1 -cCONNS -dDURATIONs` with the router harness's body (one answer is checked first to be
# a real completion with usage). Prints each run's req/s and the CPU per request of Nexus and
# the node — and, billed, how many requests were answered and how many the user's usage API
# counts as charged (they differ by at most the requests wrk abandons at its end) — then each
# mode's mean and the ratio on ÷ off.
# BIN defaults to ${CARGO_TARGET_DIR:-$LATTICE_CACHE_DIR/target}/dist/lattice (./lattice's build). Needs wrk.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LATTICE_CACHE_DIR="${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}"
BIN="${CARGO_TARGET_DIR:-$LATTICE_CACHE_DIR/target}/dist/lattice"
RUNS=4
DURATION=20
CONNS=8
PARALLEL=8
MODEL=smollm2-135m
MAX_TOKENS=16
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --parallel) PARALLEL="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) BIN="$1"; shift ;;
  esac
done
[ -x "$BIN" ] || { echo "not an executable: $BIN (build with cargo build --release -p lattice-cli)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "needs wrk (bench/routers/run.sh's setup installs it)" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { for p in "$@"; do awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0; done; }

"$BIN" model pull "$MODEL" >/dev/null

RESULTS="$(mktemp)"
trap 'rm -f "$RESULTS"' EXIT
BODY="{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}],\"max_tokens\":$MAX_TOKENS,\"temperature\":0}"

one_run() {
  local mode="$1" work port nexus node
  work="$(mktemp -d)"; port="$(free_port)"
  local extra=()
  [ "$mode" = off ] && extra=(--no-billing)
  "$BIN" nexus --listen "127.0.0.1:$port" --db "$work/nexus.db" \
    --operator-key-file "$work/operator.key" "${extra[@]}" >"$work/nexus.log" 2>&1 </dev/null &
  nexus=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/nexus.log" && break; sleep 0.1; done
  "$BIN" node --nexus "http://127.0.0.1:$port" --model "$MODEL" --port 0 \
    --parallel "$PARALLEL" --key "$work/node.key" >"$work/node.log" 2>&1 </dev/null &
  node=$!
  python3 "$HERE/routers.py" wait-models --url "http://127.0.0.1:$port" --model "$MODEL" \
    --timeout 300 >/dev/null
  local auth="" hdr=()
  if [ "$mode" = on ]; then
    auth="$(cat "$work/operator.key")"
    hdr=(-H "Authorization: Bearer $auth")
  fi
  local url="http://127.0.0.1:$port/v1/chat/completions"
  # One answer first: it must be a real completion with usage.
  local answer
  answer="$(curl -sf -m 60 "$url" -H 'Content-Type: application/json' "${hdr[@]}" -d "$BODY")"
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["usage"]["completion_tokens"]>0, d' "$answer"
  BENCH_BODY="$BODY" BENCH_AUTH="$auth" wrk -t1 -c"$CONNS" -d5s -s "$HERE/post.lua" "$url" \
    >"$work/warm.txt"
  local before after
  before="$(ticks "$nexus" "$node")"
  BENCH_BODY="$BODY" BENCH_AUTH="$auth" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$HERE/post.lua" \
    "$url" >"$work/wrk.txt"
  after="$(ticks "$nexus" "$node")"
  local charged=""
  if [ "$mode" = on ]; then
    charged="$(curl -sf -m 10 "http://127.0.0.1:$port/lattice/v1/usage" "${hdr[@]}" |
      python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)["data"]))' ||
      echo "?")"
  fi
  kill "$nexus" "$node" 2>/dev/null || true
  wait "$nexus" "$node" 2>/dev/null || true
  python3 - "$mode" "$work" "$(getconf CLK_TCK)" "$before" "$after" "$charged" "$RESULTS" <<'PY'
import re, sys
mode, work, hz, before, after, charged, results = sys.argv[1:8]
wrk = open(f"{work}/wrk.txt").read()
reqs = int(re.search(r"(\d+) requests in", wrk).group(1))
warm = int(re.search(r"(\d+) requests in", open(f"{work}/warm.txt").read()).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
b, a = [list(map(int, x.split())) for x in (before, after)]
us = [(y - x) * 1e6 / int(hz) / max(reqs, 1) for x, y in zip(b, a)]
line = f"billing {mode:3}: {rps:7.2f} req/s, CPU per request: Nexus {us[0]:,.0f} us, node {us[1]:,.0f} us"
if charged:
    line += f"; {1 + warm + reqs} answered, {charged} charged (usage API)"
if bad:
    line += f"; {bad.group(1)} non-2xx"
print(line, flush=True)
open(results, "a").write(f"{mode} {rps}\n")
PY
  rm -rf "$work"
}

echo "model $MODEL, node --parallel $PARALLEL, wrk -t1 -c$CONNS -d${DURATION}s, max_tokens $MAX_TOKENS, $RUNS runs per mode"
for _ in $(seq "$RUNS"); do
  one_run off
  one_run on
done
python3 - "$RESULTS" <<'PY'
import sys, statistics
by = {"off": [], "on": []}
for line in open(sys.argv[1]):
    mode, rps = line.split()
    by[mode].append(float(rps))
for mode in ("off", "on"):
    v = by[mode]
    print(f"billing {mode}: mean {statistics.mean(v):.2f} req/s (runs {', '.join(f'{x:.2f}' for x in v)})")
off, on = statistics.mean(by["off"]), statistics.mean(by["on"])
print(f"on / off = {on / off:.3f} (billing costs {100 * (1 - on / off):+.1f} % of throughput)")
PY
