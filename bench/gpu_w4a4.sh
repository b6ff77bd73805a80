#!/usr/bin/env bash
# One device call for issue 15's end-to-end row: the 1B-shaped checkpoint compiled to w4a8 /
# KV4 and to w4a4 / KV4 (RTN: FMPQ's calibration does not run, so every activation block is
# 4-bit; on sm90 every block runs s8 MMAs, so the share does not change the work), both built
# for this GPU, then qbench on each, 64 x 1024 / QBENCH_OUT (128), one after the other in this
# call (same GPU, same clocks), JSON and logs in $OUT/{w4a8,w4a4}.
source "$(dirname "$0")/gpu_common.sh"
ART2_ARGS="--precision w4a4" kernels_and_artifact
for p in w4a8 w4a4; do
  art=/tmp/art1b; [ $p = w4a4 ] && art=/tmp/art1b_2
  [ -f $art/manifest.json ] || { echo "no $p artifact"; tail -5 "$OUT/compile_2.log"; continue; }
  stamp "qbench $p"
  mkdir -p "$OUT/$p"
  timeout $(cap 200) qbench $art --input-len 1024 --output-len ${QBENCH_OUT:-128} \
    --num-prompts 64 --max-seqs 64 --out "$OUT/$p" -q > "$OUT/$p/qbench.log" 2>&1
  grep -E "^qbench|^\| qcompile|fallback|reference" "$OUT/$p/qbench.log" | tail -4
done
stamp done
