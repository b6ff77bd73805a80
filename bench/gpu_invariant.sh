#!/usr/bin/env bash
# One device call for batch invariance (issue 13 item 7): build, the 1B-shaped w4a8 / KV4
# artifact, the attention kernels' GPU tests (test_batch_invariant_plans among them), then
# qbench offline on the same artifact and prompts with and without --batch-invariant (its
# cost), and (DENSE=1) once more with the dense key / query rotation alone
# (QCOMPILE_FAST_KV_ROTATION=dense: which part of the cost is the rotation).
source "$(dirname "$0")/gpu_common.sh"
kernels_and_artifact
stamp attention-tests
timeout -s INT $(cap 150) python -m pytest -m gpu -q -rfE tests/runtime/test_attention_gpu.py \
  2>&1 | tee "$OUT/pytest_attention.log" | tail -4
for mode in default invariant ${DENSE:+dense}; do
  stamp "qbench $mode"
  mkdir -p "$OUT/$mode"
  extra=(); envs=()
  [ "$mode" = invariant ] && extra=(--batch-invariant)
  [ "$mode" = dense ] && envs=(QCOMPILE_FAST_KV_ROTATION=dense)
  env "${envs[@]}" timeout $(cap 170) qbench /tmp/art1b --input-len 1024 --output-len 128 \
    --num-prompts 64 --max-seqs 64 --out "$OUT/$mode" -q "${extra[@]}" \
    > "$OUT/qbench_$mode.log" 2>&1
  grep -E "^qbench|^\| qcompile" "$OUT/qbench_$mode.log" | tail -2
done
stamp done
