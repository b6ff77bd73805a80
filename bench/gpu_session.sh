#!/usr/bin/env bash
# One device call that measures the attention work end to end (no network): install and build
# (gpu_kernels.sh), the GPU suite, bench/attention.py, Nsight Compute sections of the decode
# kernels (int4 and fp16, 8B heads, batch 64, context 4096), then the engine decode step
# (gpu_step.sh) and qbench. Everything lands in $OUT/session.tgz.
#   ATTN_ARGS (default --quick), PYTEST_ARGS (default the attention tests), SKIP_NCU=1, SKIP_STEP=1, SKIP_QBENCH=1, QBENCH_OUT (32),
#   BENCH="" (no attention bench), LATE_PYTEST (GPU tests run last, in the time left),
#   FP16=1 (also compile and qbench the fp16 / KV16 artifact), QBENCH_PEER (hf-eager, empty for none; hf adds
#   HF's static cache + torch.compile), QBENCH_ARGS (e.g. --no-compile, --no-overlap),
#   COMPILE=1 (gpu_step.sh also profiles the step with Inductor), NCU_RUNS ("fmt entry batch
#   context new;..." kernels for Nsight Compute), QBENCH2_ARGS (a second w4a8 qbench with
#   these arguments, e.g. --no-overlap: its load is the warm-cache one), SERVE=1 (qserve on the
#   w4a8 artifact driven by `qbench --url`, the same prompts: requests/s, TTFT / TPOT; first
#   tests/runtime/test_server.py on CUDA; needs the wheels of build/wheels/serve: `pip download
#   --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d
#   build/wheels/serve fastapi uvicorn openai httpx`; QSERVE_ARGS, e.g. --aot: a warm AOT load
#   after QBENCH2_ARGS=--aot), ART2_ARGS (gpu_step.sh compiles a second w4a8 artifact with these
#   qcompile arguments, e.g. "--lm-head w8a8", and qbench runs it too)
source "$(dirname "$0")/gpu_common.sh"
stamp kernels
QBENCH_PEER=${QBENCH_PEER-hf-eager}  # QBENCH_PEER= : no peer
ONLY=${ONLY-attention} PYTEST_ARGS=${PYTEST_ARGS-tests/runtime/test_attention_gpu.py} BENCH=${BENCH-attention} ATTN_ARGS=${ATTN_ARGS---quick} \
  PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-$(cap 200)} timeout $(cap 240) bash bench/gpu_kernels.sh
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
if [ -z "${SKIP_STEP:-}" ]; then
  stamp step
  timeout $(cap 240) bash bench/gpu_step.sh
  if [ -d /tmp/art1b ] && [ -z "${SKIP_QBENCH:-}" ]; then
    stamp qbench
    TORCH_LOGS=recompiles timeout $(cap 200) qbench /tmp/art1b --input-len 1024 \
      --output-len ${QBENCH_OUT:-32} --num-prompts 64 --max-seqs 64 ${QBENCH_PEER:+--peer $QBENCH_PEER} \
      ${QBENCH_ARGS:-} --out "$OUT" -q > "$OUT/qbench.log" 2>&1
    grep -E "^qbench|Recompiling|triggered by|^\|" "$OUT/qbench.log" | tail -24
    if [ -n "${QBENCH2_ARGS:-}" ]; then
      stamp qbench2
      mkdir -p "$OUT/qbench2"
      timeout $(cap 150) qbench /tmp/art1b --input-len 1024 --output-len ${QBENCH_OUT:-32} \
        --num-prompts 64 --max-seqs 64 $QBENCH2_ARGS --out "$OUT/qbench2" -q 2>&1 | tail -6
    fi
    [ -n "${SERVE:-}" ] && serve_stage /tmp/art1b ${QBENCH_OUT:-32} ${QSERVE_ARGS:-}
    if [ -d /tmp/art1b_2 ]; then  # ART2_ARGS's variant (gpu_step.sh), same prompts
      stamp qbench-art2
      mkdir -p "$OUT/art2"
      timeout $(cap 120) qbench /tmp/art1b_2 --input-len 1024 --output-len ${QBENCH_OUT:-32} \
        --num-prompts 64 --max-seqs 64 ${QBENCH_ARGS:-} --out "$OUT/art2" -q 2>&1 | tail -6
    fi
    if [ -d /tmp/art1b_fp16 ]; then
      stamp qbench-fp16
      timeout $(cap 120) qbench /tmp/art1b_fp16 --input-len 1024 --output-len ${QBENCH_OUT:-32} \
        --num-prompts 64 --max-seqs 64 ${QBENCH_ARGS:-} --out "$OUT" -q 2>&1 | tail -6
    fi
  fi
fi
if [ -z "${SKIP_NCU:-}" ] && command -v ncu > /dev/null; then
  stamp ncu
  # NCU_RUNS: "fmt entry batch context new" items, ';'-separated
  IFS=';' read -ra runs <<< "${NCU_RUNS:-int4 kt 64 4096 1;int4 decode 64 4096 1;fp16 kt 64 4096 1}"
  for run in "${runs[@]}"; do
    set -- $run
    tag="$1_$2_b$3_c$4_n$5"
    kre="qc_attn.*_$2\$"; [ "$2" = decode ] && kre="qc_attn_[a-z0-9]+_d[0-9]+_s[0-9]+\$"
    timeout $(cap 60) ncu --cache-control all --clock-control none -k regex:"$kre" -c 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section LaunchStats --section ComputeWorkloadAnalysis \
      --section InstructionStats \
      python bench/profile_attention.py --fmt $1 --entry $2 --batch $3 --context $4 --new $5 \
      --iters 1 > "$OUT/ncu_attn_$tag.txt" 2>&1
    echo "-- ncu $tag"
    grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occ|Stall|L2 Hit|Issue Slots|Warp Cycles Per Issued|Executed Ipc|Block Limit" "$OUT/ncu_attn_$tag.txt" | head -30
  done
fi
if [ -n "${LATE_PYTEST:-}" ]; then  # e.g. the engine's CUDA-graph tests, with what time is left
  stamp late-pytest
  timeout $(cap 600) python -m pytest -m gpu -q -rs -x $LATE_PYTEST 2>&1 | tee "$OUT/pytest_late.log" | tail -15
fi
stamp done
# the device returns at most 8 files: everything in one archive
tar czf /tmp/session.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/session.tgz "$OUT/"
