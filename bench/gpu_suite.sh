#!/usr/bin/env bash
# One device call for the GPU suite alone: install, build every kernel for this GPU, the
# serving tests on CUDA (gpu_common.sh's serve_tests), then `pytest -m gpu` over PYTEST_ARGS
# (default: the whole suite) in the time left before DEADLINE (SIGINT: it still prints which
# tests failed). SKIP_SERVE=1: no serving tests. Logs in $OUT.
source "$(dirname "$0")/gpu_common.sh"
stamp kernels
SKIP_PYTEST=1 ONLY= BENCH= timeout $(cap 120) bash bench/gpu_kernels.sh
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
[ -z "${SKIP_SERVE:-}" ] && serve_tests
stamp pytest
timeout -s INT -k 20 $(cap 900) python -m pytest -m gpu -q -rfEs --durations=5 \
  ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
stamp done
