#!/usr/bin/env bash
# A/B of lattice binaries on this host, alternated (A B A B …), so that the host's drift between
# minutes — often larger than the difference between two builds — hits both alike.
#
#   bench/routers/ab.sh [--runs 3] [--mode billed|unbilled] [--stream] [--duration 10] [--perf DIR]
#                       [--count EVENTS] BIN_A BIN_B [BIN…]
#
# Per run: a fresh network like the router harness's (canned nginx SSE upstream and wrk on CPU 1;
# a Nexus — with billing unless --mode unbilled — and one `node --upstream` on CPU 0, a fresh
# database), 3 s of warm-up, then `wrk -t1 -c32 -dDURATIONs`; it prints req/s and the CPU per
# request of every thread of both processes (from /proc/PID/task/*/stat around the measured run).
# --perf DIR also records each run's Nexus and node with `perf record --call-graph dwarf` (1999 Hz)
# from 1 s into the measured run to 1 s before its end, into DIR/RUN-BINARY.data (read with
# `perf report -i FILE --pid PID`; the PIDs are printed): that run's figures include perf's cost.
# --count EVENTS counts perf events (a comma list, e.g. 'syscalls:sys_enter_futex,sched:sched_switch'
# or 'raw_syscalls:sys_enter') in Nexus and the node over the whole measured run, and prints each
# per request and per process: counts, unlike CPU time, do not move with the host's speed.
# Needs nginx and wrk (the router harness's setup installs both; --perf needs `perf`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUNS=3
MODE=billed
STREAM=""
DURATION=10
PERF_DIR=""
COUNT=""
RUN=0
BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --stream) STREAM=1; shift ;;
    --duration) DURATION="$2"; shift 2 ;;
    --perf) PERF_DIR="$2"; shift 2 ;;
    --count) COUNT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) BINS+=("$1"); shift ;;
  esac
done
[ "${#BINS[@]}" -ge 1 ] || { echo "usage: $0 [--runs N] [--mode billed|unbilled] [--stream] BIN…" >&2; exit 2; }
case "$MODE" in billed|unbilled) ;; *) echo "--mode is billed or unbilled" >&2; exit 2 ;; esac
for b in "${BINS[@]}"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }; done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
if ! command -v wrk >/dev/null || [ ! -x "$NGINX" ]; then echo "needs wrk and nginx" >&2; exit 2; fi
if [ -n "$PERF_DIR" ]; then
  command -v perf >/dev/null || { echo "--perf needs perf" >&2; exit 2; }
  [ "$DURATION" -ge 3 ] || { echo "--perf needs --duration 3 or more" >&2; exit 2; }
  mkdir -p "$PERF_DIR"
fi
if [ -n "$COUNT" ] && ! command -v perf >/dev/null; then echo "--count needs perf" >&2; exit 2; fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU ticks of every thread of the given processes: "pid comm ticks tid" lines.
threads() { for p in "$@"; do for t in /proc/"$p"/task/*; do
  echo "$p $(tr ' ' '_' < "$t/comm") $(awk '{print $14+$15}' "$t/stat" 2>/dev/null || echo 0) ${t##*/}"
done; done; }

one_run() {
  local bin="$1" work; work="$(mktemp -d)"
  local json_port sse_port nexus_port
  json_port="$(free_port)"; sse_port="$(free_port)"; nexus_port="$(free_port)"
  python3 "$HERE/routers.py" nginx-conf --json-port "$json_port" --sse-port "$sse_port" \
    --dir "$work/nginx" >/dev/null
  taskset -c 1 "$NGINX" -c "$work/nginx/nginx.conf" -p "$work/nginx" -e "$work/nginx/error.log" \
    >"$work/nginx.log" 2>&1 </dev/null &
  local extra=()
  [ "$MODE" = unbilled ] && extra=(--no-billing)
  taskset -c 0 "$bin" nexus --listen "127.0.0.1:$nexus_port" --db "$work/nexus.db" \
    --max-in-flight 4096 --operator-key-file "$work/operator.key" "${extra[@]}" \
    >"$work/nexus.log" 2>&1 </dev/null &
  local nexus=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/nexus.log" && break; sleep 0.1; done
  taskset -c 0 "$bin" node --nexus "http://127.0.0.1:$nexus_port" \
    --upstream "http://127.0.0.1:$sse_port/v1" --model-id bench-model --port 0 \
    --key "$work/node.key" --parallel 256 --queue 4096 --max-in-flight 4096 \
    >"$work/node.log" 2>&1 </dev/null &
  local node=$!
  local url="http://127.0.0.1:$nexus_port/v1/chat/completions"
  python3 "$HERE/routers.py" wait-models --url "http://127.0.0.1:$nexus_port" \
    --model bench-model --timeout 60 >/dev/null
  if [ "$MODE" = billed ]; then export BENCH_AUTH="$(cat "$work/operator.key")"; else unset BENCH_AUTH; fi
  if [ -n "$STREAM" ]; then
    export BENCH_BODY='{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0,"stream":true}'
  else
    unset BENCH_BODY
  fi
  taskset -c 1 wrk -t1 -c32 -d3s -s "$HERE/post.lua" "$url" >/dev/null
  threads "$nexus" "$node" >"$work/before"
  RUN=$((RUN + 1))
  local perf_pid=""
  if [ -n "$PERF_DIR" ]; then
    local data; data="$PERF_DIR/$RUN-$(basename "$bin").data"
    (sleep 1; exec perf record -q -F 1999 --call-graph dwarf,16384 -o "$data" -p "$nexus,$node" \
      -- sleep $((DURATION - 2))) >/dev/null 2>&1 &
    perf_pid=$!
    echo "run $RUN: perf data $data (nexus pid $nexus, node pid $node)"
  fi
  local count_pids=()
  if [ -n "$COUNT" ]; then
    for p in "$nexus" "$node"; do
      perf stat -x, -e "$COUNT" -p "$p" -o "$work/count-$p.csv" >/dev/null 2>&1 &
      count_pids+=($!)
    done
  fi
  taskset -c 1 wrk -t1 -c32 -d"${DURATION}s" -s "$HERE/post.lua" "$url" >"$work/wrk.txt"
  threads "$nexus" "$node" >"$work/after"
  for p in "${count_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -z "$perf_pid" ] || wait "$perf_pid" || true
  kill "$nexus" "$node" 2>/dev/null || true
  pkill -f "nginx -c $work/nginx/nginx.conf" 2>/dev/null || true
  wait "$nexus" "$node" 2>/dev/null || true
  python3 - "$work" "$nexus" "$node" "$bin" "$(getconf CLK_TCK)" <<'PY'
import re, sys
work, nexus, node, binary, clk_tck = sys.argv[1:6]
wrk = open(f"{work}/wrk.txt").read()
reqs = int(re.search(r"(\d+) requests in", wrk).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
def load(path):
    out = {}
    for line in open(path):
        pid, comm, ticks, tid = line.split()
        out[(pid, tid)] = (comm, int(ticks))
    return out
before, after = load(f"{work}/before"), load(f"{work}/after")
hz = int(clk_tck)  # /proc's ticks per second
per = {}
for key, (comm, ticks) in after.items():
    spent = ticks - before.get(key, (comm, 0))[1]
    if spent:
        proc = "nexus" if key[0] == nexus else "node"
        per[(proc, comm)] = per.get((proc, comm), 0) + spent * 1e6 / hz / reqs
total = sum(per.values())
threads = ", ".join(f"{p} {c} {us:.1f}" for (p, c), us in sorted(per.items()))
print(f"{binary}: {rps:,.0f} req/s, {total:.1f} us/req ({threads})"
      + (f", {bad.group(1)} non-2xx" if bad else ""))
import os
for proc, pid in (("nexus", nexus), ("node", node)):
    path = f"{work}/count-{pid}.csv"
    if not os.path.exists(path):
        continue
    counts = []
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            v = float(f[0]) / reqs
            if v >= 0.005:
                counts.append(f"{f[2].split(':')[-1]} {v:.2f}")
    print(f"  {proc} per request: " + ", ".join(counts))
PY
  rm -rf "$work"
}

echo "mode $MODE$([ -n "$STREAM" ] && echo ", streaming"), ${RUNS} rounds of ${#BINS[@]} binaries, wrk -t1 -c32 -d${DURATION}s"
for _ in $(seq "$RUNS"); do
  for b in "${BINS[@]}"; do one_run "$b"; done
done
