#!/usr/bin/env bash
# On the GPU machine (no network): issue 13's 8B-shape measurements. A synthetic Llama-3-8B
# checkpoint (random weights, made here on the GPU), each precision compiled with its wall
# time and peak host memory (issue 13 item 8: <= 3 min, <= 2x the checkpoint), then qbench at
# 1024 in / 512 out at batch MAX_SEQS and at batch 1 (time per output token). Everything lands
# in $OUT/session8b.tgz.
#   PRECISIONS (default "w4a8 fp8"; fp16 too when time allows), MAX_SEQS (256), NUM_PROMPTS
#   (MAX_SEQS), OUTPUT_LEN (512) (qcompile builds each artifact's kernels itself),
#   DEADLINE (s, default 540)
source "$(dirname "$0")/gpu_common.sh"
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
stamp install
python -m pip install --no-deps -q build/wheels/nvidia_cutlass-*.whl > "$OUT/install.log" 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
stamp checkpoint
[ -d /tmp/llama8b ] || python bench/make_checkpoint.py llama-3-8b /tmp/llama8b --device cuda \
  > "$OUT/checkpoint.log" 2>&1 || { tail -5 "$OUT/checkpoint.log"; exit 1; }
du -sh /tmp/llama8b | tee -a "$OUT/checkpoint.log"
B=${MAX_SEQS:-256}
for p in ${PRECISIONS:-w4a8 fp8}; do
  case $p in
    w4a8) args="--precision w4a8 --kv int4 --quantizer rtn --kv-key-centering none" ;;
    fp8) args="--precision fp8 --kv fp16" ;;
    fp16) args="--precision fp16 --kv fp16" ;;
    *) echo "unknown precision $p"; continue ;;
  esac
  stamp "compile $p"
  [ -d /tmp/art8b_$p ] || /usr/bin/time -v timeout $(cap 240) qcompile /tmp/llama8b \
    --target "sm${major}0" $args --max-seq-len 2048 -o /tmp/art8b_$p -q \
    > "$OUT/compile_$p.log" 2>&1 || { tail -5 "$OUT/compile_$p.log"; continue; }
  grep -E "Elapsed|Maximum resident" "$OUT/compile_$p.log"
  stamp "qbench $p batch $B"
  timeout $(cap 200) qbench /tmp/art8b_$p --input-len 1024 --output-len ${OUTPUT_LEN:-512} \
    --num-prompts ${NUM_PROMPTS:-$B} --max-seqs $B --out "$OUT" -q > "$OUT/qbench_$p.log" 2>&1
  grep -E "^qbench|^\|" "$OUT/qbench_$p.log" | tail -4
  stamp "qbench $p batch 1"
  mkdir -p "$OUT/b1"
  timeout $(cap 90) qbench /tmp/art8b_$p --input-len 1024 --output-len 128 --num-prompts 2 \
    --max-seqs 1 --out "$OUT/b1" -q > "$OUT/qbench_b1_$p.log" 2>&1
  grep -E "^\|" "$OUT/qbench_b1_$p.log" | tail -1
done
stamp done
tar czf /tmp/session8b.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/session8b.tgz "$OUT/"
