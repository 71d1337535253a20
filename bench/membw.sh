#!/usr/bin/env bash
# Build (if needed) and run membw.c. Extra args go to membw (--json, --threads 1,2, --mib, --passes).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${BENCH_CACHE_DIR:-${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}/bench}/membw"
mkdir -p "$(dirname "$OUT")"
if [[ ! -x "$OUT" || "$HERE/membw.c" -nt "$OUT" ]]; then
  ${CC:-gcc} -O3 -march=x86-64-v3 -pthread -o "$OUT" "$HERE/membw.c"
fi
exec "$OUT" "$@"
