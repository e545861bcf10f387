#!/usr/bin/env bash
# The prepared GPU check: on a fresh GPU machine with torch installed and no internet,
# from the repository root:
#   1. builds the extension for sm_90 (pip install -e, falling back to an in-place build),
#   2. builds the standalone CMake benchmark binaries (when cmake is there) and runs their
#      reference checks,
#   3. runs the GPU tests (tests/test_ops_cuda.py and any other *cuda* / *gpu* tests),
#   4. runs the kernel benchmarks (--quick), JSON to $OUT (else benchmarks/results/), with the
#      peer kernels beside tpssm's where .peer/ was carried (bench_peers.py),
#   5. runs compute-sanitizer memcheck and racecheck on small cases,
#   6. runs the engine sweep at the presets' full depth (gpu_engine_bench.sh) and an ncu profile,
# and prints a compact table last. Each stage has its own timeout, and the whole run keeps inside
# GPU_CHECK_BUDGET_S (default 480 s): a stage gets at most what is left of it, a stage with too
# little left is skipped, so the summary always prints. Logs go to benchmarks/out/<stamp>/; when
# $OUT is set (the device tool returns at most 8 files from it) they are also packed into
# $OUT/gpu_check_logs.tgz after every stage, and the summary and the benchmark JSON land there.
# GPU_CHECK_SKIP="build cmake tests bench engine profile sanitizer" skips stages on a rerun (build:
# keep the extension a previous run built on this machine; engine: the full-depth engine sweep,
# benchmarks/gpu_engine_bench.sh, which runs after the sanitizers). Where the checkout's .git is
# not the tree's own (a copied working tree), TPSSM_GIT_COMMIT=<hash> names the commit the
# benchmark JSON records.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUTDIR=$ROOT/benchmarks/out/$STAMP
mkdir -p "$OUTDIR"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=20  # seconds kept for the summary
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
declare -a SUMMARY=()
T0=$(date +%s)

publish() {  # the logs so far, as one file under $OUT (a killed run still returns them)
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check_logs.tgz" -C "$OUTDIR" . 2>/dev/null
  return 0
}

stage() {  # stage NAME TIMEOUT_S COMMAND...: runs, logs, records status and duration
  local name=$1 limit=$2
  shift 2
  local start rc log="$OUTDIR/$name.log"
  start=$(date +%s)
  local left=$(( T0 + BUDGET - RESERVE - start ))
  if [ $left -lt 15 ]; then
    SUMMARY+=("$(printf '%-26s %-12s' "$name" "skipped (budget)")")
    return 1
  fi
  [ $left -lt $limit ] && limit=$left
  echo "=== $name (timeout ${limit}s) ==="
  # Through bash so that the exported shell functions below run under `timeout` too.
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage-cmd "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; elif [ $rc -ne 0 ]; then status="FAIL(rc=$rc)"; fi
  SUMMARY+=("$(printf '%-26s %-12s %5ss  %s' "$name" "$status" "$(( $(date +%s) - start ))" "$log")")
  publish
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

# Stages to skip on a rerun: GPU_CHECK_SKIP="build cmake tests bench engine profile sanitizer".
want() { [[ " ${GPU_CHECK_SKIP:-} " != *" $1 "* ]]; }

build() {
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . \
    || { echo "pip install -e failed; trying an in-place build"; \
         TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace; }
}
export -f build
export PY
export TPSSM_REQUIRE_CUDA_BUILD=1

# The extension has few translation units: the CMake binaries build beside it on the idle cores.
HAVE_CMAKE=0
B=build-cmake-gpu
if want cmake && command -v cmake >/dev/null 2>&1; then
  HAVE_CMAKE=1
  ( start=$(date +%s)
    timeout 240 env CMAKE_CUDA_ARCHITECTURES=90 MAX_JOBS=8 TPSSM_CMAKE_BUILD_DIR=$B \
      ./.ci/build_cmake.sh > "$OUTDIR/build_cmake.log" 2>&1
    echo "$? $(( $(date +%s) - start ))" > "$OUTDIR/build_cmake.status" ) &
  CMAKE_PID=$!
fi
if want build; then
  stage build_extension 300 build
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import tpssm; assert tpssm.has_cuda_kernels(), 'no CUDA kernels in the build'; print('tpssm CUDA kernels: ok')" \
  || echo "gpu_check: the extension does not import with CUDA kernels; later stages will fail"

if want tests; then
  stage gpu_tests 270 $PY -m pytest tests/test_ops_cuda.py -q -ra --timeout=200 \
    --junitxml="$OUTDIR/gpu_tests.xml"
  # Other test files with GPU cases (device checks, ...): their CUDA tests skip on CPU.
  # test_build.py: the build's own checks (linkage) on the machine's toolchain.
  others=(tests/test_build.py)
  for t in $(grep -l -E "cuda.is_available|device=.cuda|\.cuda\(\)" tests/test_*.py); do
    [ "$t" != tests/test_ops_cuda.py ] && [ "$t" != tests/test_thread_ranks.py ] && others+=("$t")
  done
  if [ ${#others[@]} -gt 0 ]; then
    # Mostly CPU work (gloo ranks, error cases): spread over 4 workers when xdist is there.
    xdist=()
    $PY -c "import xdist" 2>/dev/null && xdist=(-n 4)
    stage other_gpu_tests 200 $PY -m pytest "${others[@]}" "${xdist[@]}" -q -ra --timeout=150 \
      --junitxml="$OUTDIR/other_gpu_tests.xml"
  fi
  # tp 2 / 4 ranks as threads of one process, one CUDA graph of all ranks' decode step against
  # eager decode (issue 14's one-GPU graph check), and sequence-parallel prefill against tp 1
  # on the GPU: its own stage, 9 cases.
  stage thread_rank_graphs 180 $PY -m pytest tests/test_thread_ranks.py -k "one_gpu or cuda" \
    -q -ra -s \
    --timeout=170 --junitxml="$OUTDIR/thread_rank_graphs.xml"
fi

JSON="$OUTDIR/bench_ssm_ops_$STAMP.json"
if want bench; then
  stage benchmarks 240 $PY benchmarks/bench_ssm_ops.py --quick --scan-split-lens 512,2048 \
    --scan-lanes 1,4,8 --scan-direct --conv-chunk-lens 256 --json "$JSON"
fi

if want bench; then
  stage bench_qallreduce 60 $PY benchmarks/bench_qallreduce.py --json "${JSON%.json}_qallreduce.json"
  # Decode-sized projections (M = 1 / 8 tokens) against their weight bytes: cuBLAS and gemv.
  stage bench_projections 150 $PY benchmarks/bench_projections.py --tokens 1,8 \
    --json "${JSON%.json}_projections.json"
  # Beside the peer kernels engines use (the conv prefills of causal-conv1d and vLLM, the
  # Mamba-1 and SSD scans, state updates and norms of mamba_ssm and vLLM), same inputs, same
  # process: needs .peer/ (benchmarks/stage_peers.py here; carry ".peer").
  stage bench_peers 210 $PY benchmarks/bench_peers.py --quick \
    --json "${JSON%.json}_peers.json"
  # Where step time goes: the kernels of one decode step (tp 1 and the tp 4 rank shard) and of
  # one prefill step (tp 1 against the tp 2 / 4 shards, per phase), mamba-2.8b and mamba2-2.7b.
  stage profile_decode 120 $PY benchmarks/profile_step.py --preset mamba-2.8b --batch 1 \
    --tp-shards 1,4 --json "${JSON%.json}_decode_profile.json"
  # The same tp 4 shard with the whole LM head on the rank (what the vocabulary split saves).
  stage profile_decode_whole_head 60 $PY benchmarks/profile_step.py --preset mamba-2.8b \
    --batch 1 --tp-shard 4 --replicated-head --json "${JSON%.json}_decode_profile_whole_head.json"
  stage profile_decode_m2 90 $PY benchmarks/profile_step.py --preset mamba2-2.7b --batch 1 \
    --json "${JSON%.json}_decode_profile_mamba2.json"
  stage profile_prefill 150 $PY benchmarks/profile_step.py --preset mamba-2.8b --phase prefill \
    --batch 8 --prompt-len 2048 --steps 3 --tp-shards 1,2,4 \
    --json "${JSON%.json}_prefill_profile.json"
  # The tp 4 shard's prefill again, sequence-parallel: its norms on a quarter of the tokens
  # (against the shard's "norms" and "other" rows above).
  stage profile_prefill_sp 70 $PY benchmarks/profile_step.py --preset mamba-2.8b \
    --phase prefill --batch 8 --prompt-len 2048 --steps 3 --tp-shard 4 --sequence-parallel \
    --json "${JSON%.json}_prefill_profile_sp.json"
  # The hybrids' attention: which SDPA backend each preset's head_dim gets (Zamba-7B: 464), and
  # tpssm's decode_attention with and without key splits against the copy bandwidth.
  stage attention_backends 90 $PY benchmarks/attention_backends.py \
    --json "${JSON%.json}_attention.json"
fi

if [ $HAVE_CMAKE -eq 1 ]; then
  wait "$CMAKE_PID"
  read -r cmake_rc cmake_s < "$OUTDIR/build_cmake.status"
  tail -n 5 "$OUTDIR/build_cmake.log"
  SUMMARY+=("$(printf '%-26s %-12s %5ss  %s' build_cmake \
    "$([ "$cmake_rc" = 0 ] && echo ok || echo "FAIL(rc=$cmake_rc)")" "$cmake_s" \
    "$OUTDIR/build_cmake.log")")
  [ "$cmake_rc" = 0 ] || HAVE_CMAKE=0
fi
if [ $HAVE_CMAKE -eq 1 ]; then
  microbench() {  # every binary runs; the stage fails if any check failed
    local rc=0
    $B/bench_causal_conv1d --mode prefill --batch 1 --seqlen 16384 --dim 1280 --iterations 50 || rc=1
    $B/bench_causal_conv1d --mode update --batch 256 --dim 5120 --iterations 50 || rc=1
    $B/bench_selective_scan --form mamba1 --batch 1 --seqlen 16384 --nheads 1280 --iterations 10 || rc=1
    $B/bench_selective_scan --form mamba2 --batch 8 --seqlen 2048 --nheads 20 --iterations 10 || rc=1
    $B/bench_selective_state_update --form mamba1 --batch 256 --nheads 2048 --iterations 50 || rc=1
    $B/bench_selective_state_update --form mamba2 --batch 256 --nheads 20 --iterations 50 || rc=1
    $B/bench_gemv --m 1 --n 10240 --k 2560 --iterations 50 || rc=1
    $B/bench_gemv --m 8 --n 192 --k 5120 --iterations 50 || rc=1
    return $rc
  }
  export B
  export -f microbench
  stage microbench_cmake 90 microbench
elif want cmake; then
  SUMMARY+=("$(printf '%-26s %-12s' microbench_cmake "skipped (no cmake build)")")
fi

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if ! want sanitizer; then
  :
elif [ -x "$SAN" ]; then
  export SAN
  if [ $HAVE_CMAKE -eq 1 ]; then
    san_bins() {  # $1: tool; every case runs, the stage fails if any reported errors
      local rc=0
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_causal_conv1d --batch 2 --seqlen 100 --dim 136 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_causal_conv1d --mode update --batch 3 --dim 72 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_scan --form mamba1 --batch 1 --seqlen 700 --nheads 40 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_scan --form mamba2 --batch 2 --seqlen 130 --nheads 2 --headdim 16 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_scan --form mamba2 --batch 2 --seqlen 130 --nheads 2 --headdim 64 --dstate 64 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_state_update --form mamba1 --batch 3 --nheads 64 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_selective_state_update --form mamba2 --batch 3 --nheads 2 --headdim 8 --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_gemv --m 3 --n 45 --k 2056 --bias --iterations 1 --warmup 0 || rc=1
      "$SAN" --tool "$1" --error-exitcode 3 $B/bench_gemv --m 5 --n 37 --k 100 --dtype f16 --iterations 1 --warmup 0 || rc=1
      return $rc
    }
    export -f san_bins
    stage sanitizer_memcheck_bins 60 san_bins memcheck
    stage sanitizer_racecheck_bins 60 san_bins racecheck
  fi
  # Varlen, padded rows, distinct slots and forced chunks: the paths the binaries do not take;
  # memcheck also over malformed index values (slots out of range, bad query_start_loc).
  stage sanitizer_memcheck_py 180 "$SAN" --tool memcheck --error-exitcode 3 \
    $PY benchmarks/sanitize_cases.py
  if [ $HAVE_CMAKE -eq 0 ]; then
    stage sanitizer_racecheck_py 120 "$SAN" --tool racecheck --error-exitcode 3 \
      $PY benchmarks/sanitize_cases.py conv scan staged ssd
  fi
else
  SUMMARY+=("$(printf '%-26s %-12s' sanitizer "skipped (no compute-sanitizer)")")
fi

# The engine at the presets' full depth: tp 1 with the state cache on and off, and rank
# 0's shard of tp 2 / 4 alone (one GPU has no peers). After the correctness stages, since it takes
# what is left of the budget; each preset's JSON is written as it finishes (and rewritten after
# every tp degree), so a cut-short run keeps what it measured. GPU_ENGINE_PRESETS picks presets.
if want engine; then
  stage bench_engine 300 env OUT="$OUTDIR" bash benchmarks/gpu_engine_bench.sh
fi

# Nsight Compute on one launch of the main kernels (speed of light, occupancy, stall reasons):
# where the next tuning step should go. GPU_CHECK_SKIP=profile skips it.
NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")
if [ $HAVE_CMAKE -eq 1 ] && want profile && [ -x "$NCU" ]; then
  export NCU
  profile() {  # one launch of each kernel below: regex of its name, binary, arguments
    local rc=0 kernel bin args
    local sections="--section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis"
    while read -r kernel bin args; do
      "$NCU" --clock-control none --launch-count 1 --kernel-name "regex:$kernel" $sections \
        "$B/$bin" $args --iterations 1 --warmup 0 --no-check || rc=1
    done <<'CASES'
scan_output bench_selective_scan --form mamba1 --batch 8 --seqlen 2048 --nheads 5120
chunk_state bench_selective_scan --form mamba1 --batch 1 --seqlen 16384 --nheads 5120
scan_output bench_selective_scan --form mamba1 --batch 1 --seqlen 16384 --nheads 5120 --lanes 8
scan_output bench_selective_scan --form mamba1 --batch 8 --seqlen 2048 --nheads 1280 --lanes 4
scan_output bench_selective_scan --form mamba2 --batch 8 --seqlen 2048 --nheads 20 --algorithm recurrent
ssd_scan bench_selective_scan --form mamba2 --batch 8 --seqlen 2048 --nheads 80
tile_kernel bench_causal_conv1d --mode prefill --batch 8 --seqlen 2048 --dim 5120
update bench_selective_state_update --form mamba1 --batch 256 --nheads 5120
update bench_selective_state_update --form mamba2 --batch 64 --nheads 80
update bench_causal_conv1d --mode update --batch 256 --dim 5120
gemv_kernel bench_gemv --m 1 --n 10240 --k 2560
gemv_kernel bench_gemv --m 1 --n 192 --k 1280
CASES
    return $rc
  }
  export -f profile
  stage ncu_profile 120 profile
fi

if [ -e "$OUTDIR/benchmarks.log" ]; then
  echo
  echo "=== benchmark table ($JSON) ==="
  sed -n '/^device copy bandwidth/,$p' "$OUTDIR/benchmarks.log" | head -90
fi
if [ -e "$OUTDIR/bench_peers.log" ]; then
  echo
  echo "=== tpssm beside the peer kernels (bench_peers.py; x peer > 1: tpssm faster) ==="
  sed -n '/^device copy bandwidth/,$p' "$OUTDIR/bench_peers.log" | head -70
fi
if [ -e "$OUTDIR/bench_engine.log" ]; then
  echo
  echo "=== engine, tp 1 (state cache on, then off; full rows and shards in the JSON) ==="
  grep -E "^bench: .* at tp 1$|^ +(tp|1) +(cache|on|off) " "$OUTDIR/bench_engine.log" | head -40
fi
echo
echo "=== test summary ==="
for f in gpu_tests other_gpu_tests; do
  [ -e "$OUTDIR/$f.log" ] && echo "$f: $(grep -E "passed|failed|error" "$OUTDIR/$f.log" | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUTDIR/$f.log" 2>/dev/null | head -15
done
grep -hE "^(time|check .*FAIL)" "$OUTDIR"/microbench_cmake.log 2>/dev/null | head -16
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR"/sanitizer_*.log 2>/dev/null | sort | uniq -c
# ncu: each profiled kernel's name, then its time, throughputs, occupancy and registers.
grep -hE "Context [0-9]+, Stream|^ +(Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread) " \
  "$OUTDIR"/ncu_profile.log 2>/dev/null | sed -E 's/^ +//; s/\(anonymous namespace\):://; s/^(void )?tpssm::([a-z_0-9]+)<.*\) \(/\2 (/' | cut -c1-110 | head -40
echo
echo "=== gpu_check summary (total $(( $(date +%s) - T0 )) s) ===" | tee "$OUTDIR/summary.txt"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUTDIR/summary.txt"
publish
if [ -n "${OUT:-}" ]; then cp "$OUTDIR"/summary.txt "$OUTDIR"/*.json "$OUT"/ 2>/dev/null; fi
echo "logs and JSON: $OUTDIR (copy the JSON to benchmarks/results/ to keep it)"
