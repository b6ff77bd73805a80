#!/usr/bin/env bash
# One device call for the 1B shape's prefill variance (session 16: prefill steps of 24.3 ms
# at p50 on a load that reused the Inductor cache, 17.7 ms on the cold load just before):
# the w4a8 artifact served by qbench twice in two processes, first with an empty Inductor cache
# (cold) and then with the cache that run filled (warm), each followed by
# `profile_step.py --compile` (a profiled prefill and decode step, same cache state) and the
# SM clock, temperature and power logged. Everything lands in $OUT/warm.tgz.
#   RUNS (default "cold warm"), QBENCH_OUT (128)
source "$(dirname "$0")/gpu_common.sh"
kernels_and_artifact
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_warmtest
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
for run in ${RUNS:-cold warm}; do
  stamp "qbench $run"
  mkdir -p "$OUT/$run"
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active \
    --format=csv >> "$OUT/$run/clocks.txt" 2>&1
  timeout $(cap 200) qbench /tmp/art1b --input-len 1024 --output-len ${QBENCH_OUT:-128} \
    --num-prompts 64 --max-seqs 64 --out "$OUT/$run" -q > "$OUT/$run/qbench.log" 2>&1
  grep -E "^qbench|^\| qcompile" "$OUT/$run/qbench.log" | tail -3
  nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader \
    >> "$OUT/$run/clocks.txt" 2>&1
  timeout $(cap 150) python bench/profile_step.py /tmp/art1b --batch 64 --input-len 1024 \
    --compile --out "$OUT/$run" > "$OUT/$run/profile.log" 2>&1
  grep -E "^load|GPU kernel time|prefill step" "$OUT/$run/profile.log" | head -4
done
stamp done
tar czf /tmp/warm.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/warm.tgz "$OUT/"
