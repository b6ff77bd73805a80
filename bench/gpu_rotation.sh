#!/usr/bin/env bash
# One device call for the key rotation inside the int4 attention kernels (runtime/compiled.py
# fold_kv_rotation): build every kernel, the attention GPU tests, the 1B-shaped w4a8 / KV4
# artifact, then qbench (64 x 1024 / 128) with the rotation in the kernels (the default where
# they have it) and with the program's mm (QCOMPILE_FAST_KV_ROTATION=0), one process each;
# PROFILE=1 then profiles a prefill and a decode step (bench/profile_step.py --compile);
# MBT="8192 16384" adds qbench runs (rotation in the kernels) with those --max-batch-tokens.
source "$(dirname "$0")/gpu_common.sh"
stamp kernels
ONLY= BENCH= PYTEST_ARGS=${PYTEST_ARGS:-tests/runtime/test_attention_gpu.py} \
  PYTEST_TIMEOUT=$(cap 150) timeout $(cap 300) bash bench/gpu_kernels.sh
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
stamp artifact
SKIP_PROFILE=1 timeout $(cap 200) bash bench/gpu_step.sh
for mode in ${MODES:-kernel 0}; do
  stamp "qbench rotation=$mode"
  mkdir -p "$OUT/qbench-$mode"
  QCOMPILE_FAST_KV_ROTATION=$mode timeout $(cap 150) qbench /tmp/art1b --input-len 1024 \
    --output-len 128 --num-prompts 64 --max-seqs 64 --out "$OUT/qbench-$mode" \
    > "$OUT/qbench-$mode/log" 2>&1
  grep -E "^qbench|^\||^load|prefill" "$OUT/qbench-$mode/log" | tail -6
done
for mbt in ${MBT:-}; do
  stamp "qbench max-batch-tokens=$mbt"
  mkdir -p "$OUT/qbench-mbt$mbt"
  QCOMPILE_FAST_KV_ROTATION=kernel timeout $(cap 120) qbench /tmp/art1b --input-len 1024 \
    --output-len 128 --num-prompts 64 --max-seqs 64 --max-batch-tokens "$mbt" \
    --out "$OUT/qbench-mbt$mbt" > "$OUT/qbench-mbt$mbt/log" 2>&1
  grep -E "^qbench|^\|" "$OUT/qbench-mbt$mbt/log" | tail -3
done
[ -n "${PROFILE:-}" ] && profile_stage /tmp/art1b  # its prefill and decode steps
stamp done
