#!/usr/bin/env bash
# The selective-scan GPU check (the SSD kernel of the Mamba2 form and the recurrent kernels), sized
# for a few minutes on one GPU, from the repository root:
#   1. builds the extension for sm_90 (GPU_SCAN_SKIP_BUILD=1 keeps an existing build),
#   2. runs the scan tests of tests/test_ops_cuda.py (SSD cases, chunk consistency, L up to 16K),
#   3. times the scan on the Mamba2-2.7B shard shapes, SSD beside the recurrence
#      (bench_ssm_ops.py --ops scan --models mamba2-2.7b),
#   4. profiles one SSD launch (8 x 2048, tp 1 shard) with Nsight Compute when ncu is there,
#   5. runs the engine at full depth for mamba2-2.7b with the scan's automatic choice and with the
#      recurrence forced (TTFT and throughput, batch 1 / 8, prompt 512 / 2048),
#   6. runs compute-sanitizer racecheck and memcheck over benchmarks/sanitize_cases.py,
# then prints a short table. Logs and JSON go to benchmarks/out/<stamp>/; with $OUT set (the
# device tool returns up to 8 files from it) the JSON, the test and ncu logs are copied there.
# GPU_SCAN_TESTS="scan" narrows the tests to a -k expression (default: all of
# tests/test_ops_cuda.py);
# GPU_SCAN_SPLITS sets the forced split lengths of the benchmark's extra rows ("" for none).
# TPSSM_GIT_COMMIT=<hash> names the commit in the JSON where the checkout's .git is stale.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK_TAIL=${GPU_SCAN_TAIL:-12}
. benchmarks/check_lib.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
if [ "${GPU_SCAN_SKIP_BUILD:-0}" != 1 ]; then
  stage build 180 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TPSSM_REQUIRE_CUDA_BUILD=1 \
    $PY setup.py build_ext --inplace
fi

test_args=()
[ -n "${GPU_SCAN_TESTS:-}" ] && test_args=(-k "$GPU_SCAN_TESTS")
stage tests 200 $PY -m pytest tests/test_ops_cuda.py -q -ra --timeout=120 "${test_args[@]}"

stage bench 110 $PY benchmarks/bench_ssm_ops.py --ops scan --models mamba2-2.7b --no-ref --reps 10 \
  --scan-split-lens "${GPU_SCAN_SPLITS-512,1024,2048}" --json "$OUTDIR/bench_scan_$STAMP.json"

NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")
if [ -x "$NCU" ]; then
  stage ncu 60 "$NCU" --clock-control none --kernel-name regex:ssd_scan_kernel --launch-skip 1 \
    --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    $PY -c "
import torch, tpssm
from tpssm import ops
T, H, P, N = 8 * 2048, 80, 64, 128
r = lambda *s: torch.randn(*s, device='cuda').to(torch.bfloat16)
u, z, dt, B, C = r(T, H * P), r(T, H * P), r(T, H), r(T, 1, N), r(T, 1, N)
A = -torch.rand(H, device='cuda') * 4 - 0.5
qsl = torch.arange(0, T + 1, 2048, dtype=torch.int32, device='cuda')
for _ in range(2):
    ops.selective_scan(u, dt, A, B, C, torch.randn(H, device='cuda'), z, torch.zeros(H, device='cuda'),
                       delta_softplus=True, query_start_loc=qsl)
torch.cuda.synchronize()
"
fi

# The recurrence only at the point the TTFT target compares (batch 8, prompt 2048): 64 layers of
# it take seconds per prefill.
engine() {  # engine ALGORITHM PROMPT_LENS BATCH_SIZES
  stage "engine_$1" 110 $PY -m tpssm bench --preset mamba2-2.7b --tp 1 --prompt-lens "$2" \
    --batch-sizes "$3" --gen-tokens 8 --repeats 1 --dtype bfloat16 --scan-algorithm "$1" \
    --json "$OUTDIR/engine_mamba2-2.7b_${1}_$STAMP.json"
}
engine auto 512,2048 1,8
engine recurrent 2048 8

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  stage racecheck 90 "$SAN" --tool racecheck --error-exitcode 3 $PY benchmarks/sanitize_cases.py \
    conv scan ssd
  stage memcheck 150 "$SAN" --tool memcheck --error-exitcode 3 $PY benchmarks/sanitize_cases.py
fi

echo
echo "=== tests ==="
grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -1
grep -E "^(FAILED|ERROR) " "$OUTDIR/tests.log" | head -20
echo "=== scan benchmark ==="
sed -n '/^device copy bandwidth/,$p' "$OUTDIR/bench.log" | head -70
echo "=== ncu ==="
grep -E "^ +(Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Theoretical Occupancy|Block Limit) " \
  "$OUTDIR/ncu.log" 2>/dev/null | head -16
echo "=== engine (mamba2-2.7b, full depth) ==="
for algorithm in auto recurrent; do
  echo "-- scan $algorithm"
  grep -E "^ *(tp|1) " "$OUTDIR/engine_$algorithm.log" | head -8
done
echo "=== sanitizers ==="
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR"/racecheck.log "$OUTDIR"/memcheck.log 2>/dev/null
echo "=== summary (total $(( $(date +%s) - T0 )) s) ==="
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then
  cp "$OUTDIR"/*.json "$OUTDIR"/tests.log "$OUTDIR"/ncu.log "$OUT"/ 2>/dev/null || true  # what there is
fi
