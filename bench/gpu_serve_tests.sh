#!/usr/bin/env bash
# The shortest device call for the server: install (no kernels prebuilt: the tests' fixture
# compiles its tiny artifact with the kernels it needs), then tests/runtime/test_server.py on
# CUDA (gpu_common.sh's serve_tests; batch-invariant engines unless QCOMPILE_SERVE_INVARIANT=0).
source "$(dirname "$0")/gpu_common.sh"
stamp install
python -m pip install --no-deps -q build/wheels/nvidia_cutlass-*.whl > "$OUT/install.log" 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/install.log" 2>&1
serve_tests
stamp done
