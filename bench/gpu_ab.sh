#!/usr/bin/env bash
# One device call: the 1B shape's Inductor decode step profiled twice, with an environment
# switch off and on (AB_ENV, default QCOMPILE_FAST_KV_ROTATION; values AB_VALUES, default
# "0 1"), each a cold compile in its own process: load time, unprofiled step, GPU time by
# kind and the glue kernels, side by side in $OUT/ab_<value>/. Then (SERVE=1) gpu_common.sh's
# serve_stage on the same artifact.
source "$(dirname "$0")/gpu_common.sh"
kernels_and_artifact
var=${AB_ENV:-QCOMPILE_FAST_KV_ROTATION}
for v in ${AB_VALUES:-0 1}; do
  stamp "$var=$v"
  mkdir -p "$OUT/ab_$v"
  env "$var=$v" timeout $(cap 170) python bench/profile_step.py /tmp/art1b --batch 64 \
    --input-len 1024 --compile --out "$OUT/ab_$v" > "$OUT/ab_$v/log" 2>&1
  grep -E "^load|^\| [a-z]|GPU kernel time" "$OUT/ab_$v/log" | head -8
done
[ -n "${SERVE:-}" ] && serve_stage /tmp/art1b 128
stamp done
