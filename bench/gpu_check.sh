#!/usr/bin/env bash
# On the GPU machine (no network): install without deps, run the GPU suite, keep the logs.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/gpu.txt"
python -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
python -m pytest -m gpu -q -rs --durations=10 "$@" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
