#!/usr/bin/env bash
# On the GPU machine (no network): install (the CUTLASS headers come from the carried wheel in
# build/wheels), build the GEMM and attention kernels for this GPU with its 16 cores, run the
# GPU suite and the benchmarks; logs, tables and plots go to $OUT.
#   BENCH="gemm attention" (default both; "" for none; "tune": bench/tune_gemm.py's sweep),
#   BENCH_ARGS / ATTN_ARGS / TUNE_ARGS / PYTEST_ARGS,
#   ONLY=gemm|attention builds one family, PYTEST_TIMEOUT (s, default 900: pytest is interrupted
#   with SIGINT so it still prints which tests failed; SKIP_PYTEST=1 skips it), SASS=GLOB dumps the SASS of the built binaries whose
#   file names match GLOB (e.g. '*attn_int4*') to $OUT/sass_*.txt (no cuobjdump off the device)
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
target=sm${major}0
export QCOMPILE_KERNEL_DIR=build/kernels_$target
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__)"; } > "$OUT/gpu.txt" 2>&1
python -m pip install --no-deps -q build/wheels/nvidia_cutlass-*.whl > "$OUT/install.log" 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/install.log" 2>&1
python bench/build_kernels.py --target "$target" --out "$QCOMPILE_KERNEL_DIR" --jobs 16 ${ONLY:+--only $ONLY} \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
tail -1 "$OUT/build.log"
if [ -n "${SASS:-}" ] && command -v cuobjdump > /dev/null; then
  for f in "$QCOMPILE_KERNEL_DIR"/$SASS; do
    [ -f "$f" ] && cuobjdump -sass "$f" > "$OUT/sass_$(basename "$f").txt" 2>&1
  done
  ls "$OUT"/sass_* 2> /dev/null | head -3
fi
# pytest is the direct child of `timeout` (a timeout around this script would leave it running on
# the GPU beside the next stage's measurements), and SIGINT makes it print its summary when cut
[ -z "${SKIP_PYTEST:-}" ] && timeout -s INT -k 20 "${PYTEST_TIMEOUT:-900}" python -m pytest -m gpu -q -rfEs \
  --durations=5 ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
for b in ${BENCH-gemm attention}; do
  case $b in
    gemm) python bench/gemm.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    attention) python bench/attention.py --out "$OUT" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log" | tail -40 ;;
    tune) python bench/tune_gemm.py --out "$OUT/tune" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | tail -40 ;;
  esac
done
