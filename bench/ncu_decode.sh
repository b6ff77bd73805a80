#!/usr/bin/env bash
# On the GPU machine: Nsight Compute durations and DRAM traffic of the decode GEMMs (ours, and
# cuBLAS fp16 beside them), one kernel launch at a time with cold caches: how much of a decode
# GEMM's graph time is the kernels themselves. Writes $OUT/ncu_decode.csv.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python -m pip install --no-deps -q build/wheels/nvidia_cutlass-*.whl > /dev/null 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . > /dev/null 2>&1
export QCOMPILE_KERNEL_DIR=build/kernels_sm90
[ -f "$QCOMPILE_KERNEL_DIR/kernels.json" ] ||
  python bench/build_kernels.py --target sm90 --out "$QCOMPILE_KERNEL_DIR" --jobs 16 > /dev/null 2>&1
METRICS=${METRICS:-gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size}
# SECTIONS="SpeedOfLight MemoryWorkloadAnalysis SchedulerStats WarpStateStats": whole ncu
# sections instead of METRICS (e.g. MS=4096 for the prefill GEMMs' shared-memory, L2 and issue
# throughput); KINDS (default w4a8): our kernel kinds to profile, each beside cuBLAS fp16
sel=(--metrics "$METRICS")
if [ -n "${SECTIONS:-}" ]; then sel=(); for s in $SECTIONS; do sel+=(--section "$s"); done; fi
run() { ncu --clock-control none --cache-control all "${sel[@]}" --csv "$@" 2>/dev/null |
        grep -v '^==' ; }
for m in ${MS:-1 16}; do
  for nk in "4096 4096" "6144 4096" "28672 4096" "4096 14336"; do
    set -- $nk
    for kind in ${KINDS:-w4a8}; do
      run -k regex:qc_ -c 4 python bench/profile_gemm.py --kind "$kind" --n "$1" --k "$2" --m "$m" \
        --iters 3 | sed "s/^/$kind m=$m n=$1 k=$2,/"
    done
    run -k regex:'gemm|gemv|xmma|cutlass' -c 3 python -c "import torch; a=torch.randn($m,$2,dtype=torch.half,device='cuda'); \
b=torch.randn($1,$2,dtype=torch.half,device='cuda'); [a@b.t() for _ in range(3)]; \
torch.cuda.synchronize()" | sed "s/^/fp16 m=$m n=$1 k=$2,/"
  done
done > "$OUT/ncu_decode.csv"
wc -l "$OUT/ncu_decode.csv"
