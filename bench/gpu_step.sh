#!/usr/bin/env bash
# On the GPU machine: a synthetic Llama-3.2-1B-shaped checkpoint compiled to w4a8 / KV int4
# for this GPU (RTN: the step profile does not depend on the recipe), served on CUDA, one
# batch-64 decode step profiled with our attention kernels and with the reference attention
# (COMPILE=1: also with Inductor on the glue; SKIP_PROFILE=1: only the artifacts).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
python -m pip install --no-deps -q build/wheels/nvidia_cutlass-*.whl > "$OUT/install.log" 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/install.log" 2>&1
# REUSE_ART=1 keeps an artifact that an earlier call on this (warm) machine compiled from the
# same commit and working tree (~80 s saved); anything else compiles afresh
stamp_file=/tmp/art1b.tree  # beside it: the loader refuses files its manifest does not list
head=$(git rev-parse HEAD 2> /dev/null) || head=""  # no git here: never reuse
tree=$head-$(git diff HEAD 2> /dev/null | sha256sum | cut -c1-16)
if [ -n "${REUSE_ART:-}" ] && [ -n "$head" ] && [ -f /tmp/art1b/manifest.json ] && \
    [ "$(cat "$stamp_file" 2> /dev/null)" = "$tree" ]; then
  echo "reusing /tmp/art1b ($tree)"
else
  python bench/make_checkpoint.py llama-3.2-1b /tmp/llama1b || exit 1
  /usr/bin/time -v qcompile /tmp/llama1b --target "sm${major}0" --precision w4a8 --kv int4 \
    --quantizer rtn --kv-key-centering none --max-seq-len 2048 -o /tmp/art1b -q \
    > "$OUT/compile.log" 2>&1 || { tail -20 "$OUT/compile.log"; exit 1; }
  grep -E "Elapsed|Maximum resident" "$OUT/compile.log"
  echo "$tree" > "$stamp_file"
fi
if [ -n "${FP16:-}" ]; then  # the fp16 / KV16 artifact of the same checkpoint, for qbench's ratio
  qcompile /tmp/llama1b --target "sm${major}0" --precision fp16 --kv fp16 --max-seq-len 2048 \
    -o /tmp/art1b_fp16 -q > "$OUT/compile_fp16.log" 2>&1 || tail -5 "$OUT/compile_fp16.log"
fi
if [ -n "${ART2_ARGS:-}" ]; then  # a variant of the w4a8 artifact, e.g. --lm-head w8a8
  qcompile /tmp/llama1b --target "sm${major}0" --precision w4a8 --kv int4 --quantizer rtn \
    --kv-key-centering none --max-seq-len 2048 $ART2_ARGS -o /tmp/art1b_2 -q \
    > "$OUT/compile_2.log" 2>&1 || tail -5 "$OUT/compile_2.log"
fi
[ -n "${SKIP_PROFILE:-}" ] && exit 0  # only the artifacts (for qbench)
python bench/profile_step.py /tmp/art1b --batch ${BATCH:-64} --input-len ${INPUT_LEN:-1024} \
  --out "$OUT" 2>&1 | tee "$OUT/profile_step.log" | grep -v Warning | tail -30
if [ -n "${COMPILE:-}" ]; then  # the same step with Inductor on the glue (issue 13 item 4)
  mkdir -p "$OUT/compiled"
  python bench/profile_step.py /tmp/art1b --batch ${BATCH:-64} --input-len ${INPUT_LEN:-1024} \
    --compile --out "$OUT/compiled" 2>&1 | tee "$OUT/profile_step_compiled.log" \
    | grep -v Warning | tail -30
fi
