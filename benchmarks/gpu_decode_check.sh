#!/usr/bin/env bash
# The decode GPU check (issue 12: projections, programmatic launch, batch-1 decode), sized for
# about five minutes on one GPU, from the repository root:
#   1. builds the extension for sm_90 (GPU_DECODE_SKIP_BUILD=1 keeps an existing build),
#   2. runs the GPU tests of gemv, programmatic launch, the norms and the engine's decode graph,
#   3. times the decode projections, cuBLAS beside gemv (mamba-2.8b and mamba2-2.7b, tp 1 / 4,
#      1 and 8 tokens), in_proj with its conv (cuBLAS or gemv, then the conv update; the fused
#      gemv_conv_update), and gemv at every launch option (mamba-2.8b, 1 token),
#   4. times batch-1 graph decode at full depth (GPU_DECODE_PRESETS, default mamba-2.8b; tp 1 and
#      the tp 4 rank shard) three ways: cuBLAS projections, gemv, gemv + programmatic launch,
#   5. times the conv and state updates beside the peers' (bench_peers.py; .peer/ carried),
#      lists the kernels of one decode step with gemv (tp 1 and the tp 4 shard),
#   6. runs compute-sanitizer memcheck over the decode cases of sanitize_cases.py,
#   7. with GPU_DECODE_BATCH64=1, batch-64 decode throughput of each preset at tp 1 (the
#      projections are GEMMs there: the state update and conv kernels decide it),
# then prints a short table. Logs and JSON go to benchmarks/out/<stamp>/; with $OUT set (the
# device tool returns few files from it) one merged JSON and a tarball of the logs go there.
# TPSSM_GIT_COMMIT=<hash> names the commit in the JSON where the checkout's .git is stale.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECK_TAIL=${GPU_DECODE_TAIL:-12}
CHECK_LOGS_TGZ=gpu_decode_logs.tgz
. benchmarks/check_lib.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
if [ "${GPU_DECODE_SKIP_BUILD:-0}" != 1 ]; then
  stage build 180 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 TPSSM_REQUIRE_CUDA_BUILD=1 \
    $PY setup.py build_ext --inplace
fi

stage tests 150 $PY -m pytest tests/test_linear_ops_cuda.py tests/test_programmatic_launch_cuda.py \
  tests/test_norm_ops_cuda.py tests/test_engine_cuda.py -q -ra --timeout=120

stage projections 120 $PY benchmarks/bench_projections.py --presets mamba-2.8b,mamba2-2.7b \
  --tps 1,4 --tokens 1,8 --in-proj-conv --json "$OUTDIR/decode_projections_$STAMP.json"
stage gemv_sweep 60 $PY benchmarks/bench_projections.py --presets mamba-2.8b --tps 1,4 \
  --tokens 1 --kernels gemv --gemv-sweep --json "$OUTDIR/decode_gemv_sweep_$STAMP.json"

variants() {  # batch-1 graph decode, three ways, for each preset
  local rc=0 preset name flags
  for preset in ${GPU_DECODE_PRESETS:-mamba-2.8b}; do
    while read -r name flags; do
      timeout 100 $PY -m tpssm bench --preset "$preset" --tp 1 --rank-shard 4 \
        --prompt-lens 512 --batch-sizes 1 --gen-tokens 32 --repeats 2 --dtype bfloat16 \
        $flags --json "$OUTDIR/decode_${preset}_${name}_$STAMP.json" || rc=1
    done <<'VARIANTS'
torch --projection-kernel torch
gemv --projection-kernel gemv
gemv_pdl --projection-kernel gemv --programmatic-launch
VARIANTS
  done
  return $rc
}
export -f variants
export PY OUTDIR STAMP
stage decode 330 bash -c variants

# The decode kernels beside vLLM's, mamba_ssm's and causal-conv1d's (needs .peer/:
# benchmarks/stage_peers.py here, carry ".peer"; without it the stage says so and passes).
stage peers 120 $PY benchmarks/bench_peers.py --quick --ops conv_update,state_update \
  --json "$OUTDIR/decode_peers_$STAMP.json"

stage profile 90 $PY benchmarks/profile_step.py --preset mamba-2.8b --batch 1 --tp-shards 1,4 \
  --projection-kernel gemv --json "$OUTDIR/decode_profile_gemv_$STAMP.json"

SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SAN" ]; then
  stage memcheck 90 "$SAN" --tool memcheck --error-exitcode 3 \
    $PY benchmarks/sanitize_cases.py decode
fi

if [ "${GPU_DECODE_BATCH64:-0}" = 1 ]; then
  batch64() {
    local rc=0 preset
    for preset in mamba-2.8b falcon-mamba-7b mamba2-2.7b; do
      timeout 110 $PY -m tpssm bench --preset "$preset" --tp 1 --prompt-lens 128 \
        --batch-sizes 64 --gen-tokens 32 --repeats 1 --dtype bfloat16 \
        --json "$OUTDIR/batch64_${preset}_$STAMP.json" || rc=1
    done
    return $rc
  }
  export -f batch64
  stage batch64 330 bash -c batch64
fi

echo
echo "=== decode, ms per token (graph replay; tp 1, then the tp 4 rank shard; b = batch;"
echo "    % = the step's memory floor (weights + states / copy bandwidth) over its time) ==="
$PY - "$OUTDIR" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/decode_*_*.json")
                   + glob.glob(f"{sys.argv[1]}/batch64_*.json")):
    if any(part in path for part in ("projections", "sweep", "profile", "peers")):
        continue
    rows = json.load(open(path)).get("rows", [])
    cells = []
    for r in rows:
        pct = r.get("decode_pct_of_floor")
        cell = (f"tp{r.get('tp')}{' shard' if r.get('rank_shard_only') else ''} "
                f"b{r.get('batch')} {r.get('decode_ms_per_token', float('nan')):.3f}"
                + ("" if pct is None else f" ({pct:.0f}%)"))
        if r.get("batch", 1) > 1 and r.get("decode_tok_s"):
            cell += f" {r['decode_tok_s']:.0f} tok/s"
        cells.append(cell)
    print(f"{path.rsplit('/', 1)[-1]:<48} " + "  ".join(cells))
PY
grep -hE "^  (torch|gemv)" "$OUTDIR/projections.log" 2>/dev/null
sed -n '/^device copy bandwidth/,$p' "$OUTDIR/peers.log" 2>/dev/null | head -50
grep -hE "ERROR SUMMARY" "$OUTDIR/memcheck.log" 2>/dev/null
echo
echo "=== gpu_decode_check summary (total $(( $(date +%s) - T0 )) s) ==="
printf '%s\n' "${SUMMARY[@]}"
# Every JSON of the run in one file (the device tool returns few files): {file name: content}.
$PY - "$OUTDIR" "$STAMP" <<'PY'
import glob, json, os, sys
out, stamp = sys.argv[1], sys.argv[2]
merged = {os.path.basename(p): json.load(open(p)) for p in sorted(glob.glob(f"{out}/*.json"))
          if not os.path.basename(p).startswith("gpu_decode_")}
json.dump(merged, open(f"{out}/gpu_decode_{stamp}.json", "w"), indent=1)
PY
if [ -n "${OUT:-}" ]; then
  cp "$OUTDIR/gpu_decode_$STAMP.json" "$OUT"/ 2>/dev/null
  tar czf "$OUT/gpu_decode_logs.tgz" -C "$OUTDIR" . 2>/dev/null
fi
echo "logs and JSON: $OUTDIR (copy the JSON to benchmarks/results/ to keep it)"
