#!/usr/bin/env bash
# The engine's GPU figures at the presets' full depth: tp 1 throughput, TTFT and decode
# latency with the state cache on and off, and rank 0's shard of tp 2 / 4 timed alone
# (per-rank compute at shard sizes; one GPU has no peers). gpu_check.sh runs it as its engine
# stage; alone, run it where the extension is built (or set GPU_ENGINE_BUILD=1).
# GPU_ENGINE_PRESETS and GPU_ENGINE_LAYERS trim it; GPU_ENGINE_SWEEP replaces the sweep's
# arguments (e.g. "--prompt-lens 16 --batch-sizes 1 --gen-tokens 2" for a quick check);
# GPU_ENGINE_EXTRA adds bench options and GPU_ENGINE_TAG names the files of such a run (e.g.
# GPU_ENGINE_EXTRA=--sequence-parallel GPU_ENGINE_TAG=sp: the rank shards' prefill
# sequence-parallel). JSON and PNG go to $OUT (or benchmarks/out/); each preset's JSON is
# rewritten after every tp degree.
# Timing on an H100 (2026-11-27), when random weights were still sampled on the CPU (30-73 s per
# model load, three loads per preset; they are generated on the GPU now, not yet timed):
# mamba-2.8b ~3 min, falcon-mamba-7b > 5 min (its 300 s timeout hit in the tp 2 shard load; tp 1
# alone: 73 s loading + 33 s timed), mamba2-2.7b not finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/out}
mkdir -p "$OUTDIR"
if [ "${GPU_ENGINE_BUILD:-0}" = 1 ]; then
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install -q --no-build-isolation --no-deps -e . \
    || exit 1
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
status=0
layers=()
[ -n "${GPU_ENGINE_LAYERS:-}" ] && layers=(--num-layers "$GPU_ENGINE_LAYERS")
# Without the state cache every new token recomputes the prefix: 16 new tokens keep the
# baseline's longest points under a minute.
read -r -a sweep <<< "${GPU_ENGINE_SWEEP:---prompt-lens 512,2048 --batch-sizes 1,8 --gen-tokens 16 --repeats 2}"
read -r -a extra <<< "${GPU_ENGINE_EXTRA:-}"
tag=${GPU_ENGINE_TAG:+_$GPU_ENGINE_TAG}
for preset in ${GPU_ENGINE_PRESETS:-mamba-2.8b falcon-mamba-7b mamba2-2.7b zamba2-2.7b}; do
  timeout 300 $PY -m tpssm bench --preset "$preset" "${layers[@]}" --tp 1 --rank-shard 2,4 \
    "${sweep[@]}" "${extra[@]}" --compare-state-cache --dtype bfloat16 \
    --json "$OUTDIR/engine_${preset}${tag}_$STAMP.json" \
    --plot "$OUTDIR/engine_${preset}${tag}_$STAMP.png" || status=1
done
exit $status
