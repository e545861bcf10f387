#!/usr/bin/env bash
# Builds the standalone CMake microbenchmark binaries (CUDA toolkit needed, no GPU): proves the
# kernel sources compile outside the Python build and that the binaries link.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ARCHS=${CMAKE_CUDA_ARCHITECTURES:-90}
BUILD_DIR=${TPSSM_CMAKE_BUILD_DIR:-build-cmake}
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
start=$(date +%s)
cmake -S . -B "$BUILD_DIR" "${generator[@]}" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS"
cmake --build "$BUILD_DIR" -j "${MAX_JOBS:-$(nproc)}"
for bin in bench_causal_conv1d bench_selective_scan bench_selective_state_update bench_gemv; do
  test -x "$BUILD_DIR/$bin" || { echo "build_cmake: $bin missing" >&2; exit 1; }
done
echo "build_cmake: built 4 benchmark binaries in $(( $(date +%s) - start )) s"
