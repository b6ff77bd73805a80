# Sourced by the device scripts (gpu_session.sh, gpu_8b.sh): strict mode, $OUT, and the
# stage clock: `stamp NAME` prints the seconds since the start, `cap N` is N or the seconds left
# before DEADLINE (default 540), so every stage ends in time for the archive to be written.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }
cap() { local left=$(( ${DEADLINE:-540} - ($(date +%s) - t0) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo $1; }
