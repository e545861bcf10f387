#!/usr/bin/env bash
# The prepared GPU check (issue 3): on a fresh GPU machine with torch installed and no internet,
# from the repository root:
#   1. builds the extension for sm_90 (pip install -e, falling back to an in-place build),
#   2. builds the standalone CMake benchmark binaries (when cmake is there) and runs their
#      reference checks,
#   3. runs the GPU tests (tests/test_ops_cuda.py and any other *cuda* / *gpu* tests),
#   4. runs the benchmarks (--quick), JSON to $OUT (else benchmarks/results/),
#   5. runs compute-sanitizer memcheck and racecheck on small cases,
# and prints a compact table last. Each stage has its own timeout; designed for < 8 minutes on an
# H100. Logs go to $OUT (or benchmarks/out/).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$ROOT/benchmarks/out}
mkdir -p "$OUTDIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
declare -a SUMMARY=()
T0=$(date +%s)

stage() {  # stage NAME TIMEOUT_S COMMAND...: runs, logs, records status and duration
  local name=$1 limit=$2
  shift 2
  local start rc log="$OUTDIR/$name.log"
  start=$(date +%s)
  echo "=== $name (timeout ${limit}s) ==="
  # Through bash so that the exported shell functions below run under `timeout` too.
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage-cmd "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; elif [ $rc -ne 0 ]; then status="FAIL(rc=$rc)"; fi
  SUMMARY+=("$(printf '%-26s %-12s %5ss  %s' "$name" "$status" "$(( $(date +%s) - start ))" "$log")")
  return $rc
}

echo "=== environment ==="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
command -v nvcc >/dev/null && nvcc --version | tail -1

if ! $PY -c "import nvidia.nccl" 2>/dev/null; then
  echo "gpu_check: the python3 here has no nvidia-nccl wheel (import nvidia.nccl fails);"
  echo "gpu_check: setup.py links NCCL from that wheel, so the CUDA build cannot proceed."
  echo "gpu_check: install nvidia-nccl-cu$($PY -c 'import torch; print(torch.version.cuda.split(".")[0])') (no internet here: bring the wheel) and rerun."
  exit 1
fi

build() {
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . \
    || { echo "pip install -e failed; trying an in-place build"; \
         TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace; }
}
export -f build
export PY
export TPSSM_REQUIRE_CUDA_BUILD=1
stage build_extension 300 build
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import tpssm; assert tpssm.has_cuda_kernels(), 'no CUDA kernels in the build'; print('tpssm CUDA kernels: ok')" \
  || echo "gpu_check: the extension does not import with CUDA kernels; later stages will fail"

HAVE_CMAKE=0
if command -v cmake >/dev/null 2>&1; then
  HAVE_CMAKE=1
  stage build_cmake 240 env CMAKE_CUDA_ARCHITECTURES=90 MAX_JOBS=16 \
    TPSSM_CMAKE_BUILD_DIR=build-cmake-gpu ./.ci/build_cmake.sh
  B=build-cmake-gpu
  microbench() {
    set -e
    $B/bench_causal_conv1d --mode prefill --batch 1 --seqlen 16384 --dim 1280 --iterations 50
    $B/bench_causal_conv1d --mode update --batch 256 --dim 5120 --iterations 50
    $B/bench_selective_scan --form mamba1 --batch 1 --seqlen 16384 --nheads 1280 --iterations 10
    $B/bench_selective_scan --form mamba2 --batch 8 --seqlen 2048 --nheads 20 --iterations 10
    $B/bench_selective_state_update --form mamba1 --batch 256 --nheads 2048 --iterations 50
    $B/bench_selective_state_update --form mamba2 --batch 256 --nheads 20 --iterations 50
  }
  export B
  export -f microbench
  stage microbench_cmake 120 microbench
else
  SUMMARY+=("$(printf '%-26s %-12s' build_cmake "skipped (no cmake)")")
fi

stage gpu_tests 300 $PY -m pytest tests/test_ops_cuda.py -q -ra --timeout=240 \
  --junitxml="$OUTDIR/gpu_tests.xml"
# Other test files with GPU cases (device checks, compile, engine): their CUDA tests skip on CPU.
others=()
for t in $(grep -l -E "cuda.is_available|device=.cuda|\.cuda\(\)" tests/test_*.py); do
  [ "$t" != tests/test_ops_cuda.py ] && others+=("$t")
done
if [ ${#others[@]} -gt 0 ]; then
  stage other_gpu_tests 150 $PY -m pytest "${others[@]}" -q -ra --timeout=120 \
    --junitxml="$OUTDIR/other_gpu_tests.xml"
fi

if [ -n "${OUT:-}" ]; then JSON="$OUT/bench_ssm_ops_$STAMP.json"; else
  mkdir -p benchmarks/results; JSON="benchmarks/results/bench_ssm_ops_$STAMP.json"; fi
stage benchmarks 270 $PY benchmarks/bench_ssm_ops.py --quick --json "$JSON"

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  stage sanitizer_memcheck_py 150 "$SAN" --tool memcheck --error-exitcode 3 \
    $PY benchmarks/sanitize_cases.py
  if [ $HAVE_CMAKE -eq 1 ]; then
    san_bins() {  # $1: tool
      set -e
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_causal_conv1d --batch 2 --seqlen 100 --dim 136 --iterations 1 --warmup 0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_causal_conv1d --mode update --batch 3 --dim 72 --iterations 1 --warmup 0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_scan --form mamba1 --batch 1 --seqlen 700 --nheads 40 --iterations 1 --warmup 0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_scan --form mamba2 --batch 2 --seqlen 130 --nheads 2 --headdim 16 --iterations 1 --warmup 0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_state_update --form mamba1 --batch 3 --nheads 64 --iterations 1 --warmup 0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_state_update --form mamba2 --batch 3 --nheads 2 --headdim 8 --iterations 1 --warmup 0
    }
    export SAN
    export -f san_bins
    stage sanitizer_memcheck_bins 90 san_bins memcheck
    stage sanitizer_racecheck_bins 90 san_bins racecheck
  else
    stage sanitizer_racecheck_py 150 "$SAN" --tool racecheck --error-exitcode 3 \
      $PY benchmarks/sanitize_cases.py
  fi
else
  SUMMARY+=("$(printf '%-26s %-12s' sanitizer "skipped (no compute-sanitizer)")")
fi

echo
echo "=== benchmark table ($JSON) ==="
sed -n '/^device copy bandwidth/,$p' "$OUTDIR/benchmarks.log" 2>/dev/null | head -90
echo
echo "=== test summary ==="
for f in gpu_tests other_gpu_tests; do
  [ -e "$OUTDIR/$f.log" ] && echo "$f: $(grep -E "passed|failed|error" "$OUTDIR/$f.log" | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUTDIR/$f.log" 2>/dev/null | head -15
done
grep -hE "^check .*FAIL" "$OUTDIR"/microbench_cmake.log 2>/dev/null | head -10
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR"/sanitizer_*.log 2>/dev/null | sort | uniq -c
echo
echo "=== gpu_check summary (total $(( $(date +%s) - T0 )) s) ==="
printf '%s\n' "${SUMMARY[@]}"
