#!/usr/bin/env bash
# On the GPU machine: the SmolLM2 end-to-end GPU test (tests/test_smollm2_gpu.py: the bundled
# model compiled with its CUTLASS kernels for this GPU, served on CUDA, tokens and logits equal
# to the reference path's). The model (98 MB) is larger than what one device call may carry,
# so it comes in parts (`split -b 49300000` of the GGUF, carried by two calls into the folder
# given as $1, with its sha256 in $1/SHA256); the gguf wheel travels in build/wheels.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
parts=${1:-build/smol}
model=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$parts"/part_* > "$model"
echo "$(cat "$parts"/SHA256)  $model" | sha256sum -c - || exit 1
export QCOMPILE_DEFAULT_MODEL=$model
python -m pip install --no-deps -q build/wheels/*.whl > "$OUT/install.log" 2>&1
python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/install.log" 2>&1
python -m pytest -m gpu -q -rs -s --durations=5 tests/test_smollm2_gpu.py 2>&1 |
  tee "$OUT/pytest_smollm2_gpu.log" | grep -v "^DEBUG" | tail -40
