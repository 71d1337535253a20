#!/usr/bin/env bash
# Build llama.cpp's own llama-server + llama-bench (the peer for side-by-side
# benchmarks) from the llama.cpp vendored in the PyPI source package
# llama-cpp-python==$LCP_VERSION. Idempotent: re-running reuses the download,
# the unpacked tree and the cmake build dir.
#
# CPU flags match how our Rust build compiles llama.cpp (llama-cpp-sys-2):
# x86-64-v3 (AVX2/FMA/F16C/BMI2), GGML_NATIVE=OFF, no AVX-512 / AMX.
#
# Env:  LATTICE_CACHE_DIR (default ~/.cache/lattice); BENCH_CACHE_DIR
#       (default $LATTICE_CACHE_DIR/bench); JOBS (default 2);
#       LCP_VERSION (default 0.3.36); PYTHON (default python3)
# Output: last line of stdout is the llama-server path. Versions are written
#         to bench/results/versions.txt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LCP_VERSION="${LCP_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
CACHE="${BENCH_CACHE_DIR:-${LATTICE_CACHE_DIR:-$HOME/.cache/lattice}/bench}"
DL="$CACHE/dl"
SRC="$CACHE/llama-cpp-python-$LCP_VERSION"
LCPP="$SRC/vendor/llama.cpp"
BUILD="$CACHE/build-llama-server-$LCP_VERSION-x86-64-v3"
RESULTS="$HERE/results"
mkdir -p "$DL" "$RESULTS"

log() { echo "[build-llama-server] $*" >&2; }

# 1. fetch the sdist (pip knows the registry)
find_sdist() {
  local f
  for f in "$DL/llama_cpp_python-$LCP_VERSION.tar.gz" "$DL/llama-cpp-python-$LCP_VERSION.tar.gz"; do
    [[ -f "$f" ]] && { echo "$f"; return 0; }
  done
  return 0
}
SDIST="$(find_sdist)"
if [[ -z "$SDIST" ]]; then
  log "downloading llama-cpp-python==$LCP_VERSION source package"
  # (pip prepares the sdist's metadata, which installs scikit-build-core into
  # a throw-away build env; that takes a minute)
  "$PYTHON" -m pip download --no-deps --no-binary=:all: \
      "llama-cpp-python==$LCP_VERSION" -d "$DL" >&2
  SDIST="$(find_sdist)"
  [[ -n "$SDIST" ]] || { log "download failed: no sdist in $DL"; exit 1; }
fi

# 2. unpack
if [[ ! -f "$LCPP/CMakeLists.txt" ]]; then
  log "unpacking $SDIST"
  tmp="$CACHE/unpack.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  tar -xzf "$SDIST" -C "$tmp"
  rm -rf "$SRC"; mv "$tmp"/* "$SRC"; rm -rf "$tmp"
fi
[[ -d "$LCPP/tools/server" ]] || { log "no tools/server in $LCPP"; exit 1; }

# 3. configure + build only the needed targets
ARCH_FLAGS="-march=x86-64-v3"
SERVER="$BUILD/bin/llama-server"
BENCHBIN="$BUILD/bin/llama-bench"
if [[ ! -x "$SERVER" || ! -x "$BENCHBIN" || "${FORCE_REBUILD:-0}" == 1 ]]; then
  log "configuring in $BUILD"
  cmake -S "$LCPP" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
    -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \
    -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$ARCH_FLAGS" -DCMAKE_CXX_FLAGS="$ARCH_FLAGS" >&2
  log "building llama-server llama-bench with -j$JOBS (takes ~10+ min on 2 busy cores)"
  cmake --build "$BUILD" --config Release -j"$JOBS" --target llama-server llama-bench >&2
fi

# 4. record versions of both vendored llama.cpp copies
lcpp_version() {  # $1 = llama.cpp dir -> "llama.cpp X ggml Y [commit Z]"
  local d="$1" llama ggml commit=""
  llama="$(sed -n 's/^set(LLAMA_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)).*/\2/p' "$d/CMakeLists.txt" 2>/dev/null | paste -sd. -)"
  ggml="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\)).*/\2/p' "$d/ggml/CMakeLists.txt" 2>/dev/null | paste -sd. -)"
  # the llama-cpp-python sdist ships the submodule's git dir; the crate does not
  if [[ -e "$d/.git" ]]; then
    commit="$(git -C "$d" rev-parse HEAD 2>/dev/null || true)"
  fi
  echo "llama.cpp ${llama:-?}, ggml ${ggml:-?}, commit ${commit:-not recorded}"
}
SYS_DIR="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-0.1.161 2>/dev/null | head -n1 || true)"
{
  echo "# llama.cpp versions used by bench (written by build-llama-server.sh $(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo "peer: llama-cpp-python==$LCP_VERSION vendor/llama.cpp: $(lcpp_version "$LCPP")"
  cl="$(awk -v v="## [$LCP_VERSION]" '$0==v{f=1;next} f&&/^## /{exit} f&&/llama.cpp@/{print; exit}' "$SRC/CHANGELOG.md" 2>/dev/null | sed 's/^- *//')"
  [[ -n "$cl" ]] && echo "peer: llama-cpp-python $LCP_VERSION CHANGELOG: $cl"
  if [[ -x "$SERVER" ]]; then
    echo "peer: llama-server --version: $("$SERVER" --version 2>&1 | grep -i -m1 'version' || true)"
  fi
  if [[ -n "$SYS_DIR" ]]; then
    sha="$(sed -n 's/.*"sha1": *"\([0-9a-f]*\)".*/\1/p' "$SYS_DIR/.cargo_vcs_info.json" 2>/dev/null || true)"
    echo "ours: llama-cpp-sys-2 0.1.161 (llama-cpp-rs git $sha) vendored: $(lcpp_version "$SYS_DIR/llama.cpp") (the crate drops llama.cpp's git metadata; its build reports build 0 / commit unknown)"
  else
    echo "ours: llama-cpp-sys-2 0.1.161 not found in cargo registry"
  fi
  echo "flags (both): -march=x86-64-v3, GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C/BMI2=ON, no AVX-512/AMX"
} > "$RESULTS/versions.txt"
cat "$RESULTS/versions.txt" >&2

echo "$SERVER"
