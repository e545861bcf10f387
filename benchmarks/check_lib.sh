# Shared by the focused GPU checks (gpu_scan_check.sh, gpu_decode_check.sh); sourced from the
# repository root after `set -uo pipefail`. Sets PY, STAMP, OUTDIR (benchmarks/out/<stamp>), T0,
# SUMMARY and the CUDA / Python paths, and defines `stage NAME TIMEOUT_S COMMAND...`: runs the
# command under a timeout, logs it to $OUTDIR/NAME.log, prints its last CHECK_TAIL lines (12) and
# records its status and duration in SUMMARY. With CHECK_LOGS_TGZ set and $OUT set, the logs so
# far are packed into $OUT/$CHECK_LOGS_TGZ after every stage (a killed run still returns them).
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUTDIR=benchmarks/out/$STAMP
mkdir -p "$OUTDIR"
T0=$(date +%s)
declare -a SUMMARY=()
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (timeout ${limit}s) ==="
  timeout --kill-after=5 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  tail -n "${CHECK_TAIL:-12}" "$OUTDIR/$name.log"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status="FAIL($rc)"; fi
  SUMMARY+=("$(printf '%-18s %-10s %4ss' "$name" "$status" "$(( $(date +%s) - start ))")")
  if [ -n "${CHECK_LOGS_TGZ:-}" ] && [ -n "${OUT:-}" ]; then
    tar czf "$OUT/$CHECK_LOGS_TGZ" -C "$OUTDIR" . 2>/dev/null
  fi
  return 0
}
