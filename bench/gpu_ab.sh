#!/usr/bin/env bash
# One device call: the 1B shape's Inductor decode step profiled twice, with an environment
# switch off and on (AB_ENV, default QCOMPILE_FAST_KV_ROTATION; values AB_VALUES, default
# "0 1"), each a cold compile in its own process: load time, unprofiled step, GPU time by
# kind and the glue kernels, side by side in $OUT/ab_<value>/. Then (SERVE=1) qserve on the
# same artifact driven by `qbench --url`, and tests/runtime/test_server.py on CUDA first.
source "$(dirname "$0")/gpu_common.sh"
stamp kernels
SKIP_PYTEST=1 ONLY= BENCH= timeout $(cap 90) bash bench/gpu_kernels.sh
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
stamp artifact
SKIP_PROFILE=1 timeout $(cap 150) bash bench/gpu_step.sh
var=${AB_ENV:-QCOMPILE_FAST_KV_ROTATION}
for v in ${AB_VALUES:-0 1}; do
  stamp "$var=$v"
  mkdir -p "$OUT/ab_$v"
  env "$var=$v" timeout $(cap 170) python bench/profile_step.py /tmp/art1b --batch 64 \
    --input-len 1024 --compile --out "$OUT/ab_$v" > "$OUT/ab_$v/log" 2>&1
  grep -E "^load|^\| [a-z]|GPU kernel time" "$OUT/ab_$v/log" | head -8
done
if [ -n "${SERVE:-}" ]; then
  stamp serve
  python -m pip install -q --no-index --find-links build/wheels/serve fastapi uvicorn openai httpx \
    >> "$OUT/install.log" 2>&1 || tail -3 "$OUT/install.log"
  QCOMPILE_SERVE_DEVICE=cuda timeout $(cap 90) python -m pytest -q -x tests/runtime/test_server.py \
    2>&1 | tee "$OUT/pytest_serve.log" | tail -3
  qserve /tmp/art1b --port 8123 --max-seqs 64 > "$OUT/qserve.log" 2>&1 &
  spid=$!
  for _ in $(seq $(cap 150)); do
    python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health', timeout=2)" 2> /dev/null && break; sleep 1
  done
  stamp serve-ready
  timeout $(cap 60) qbench --url http://127.0.0.1:8123/v1 --input-len 1024 --output-len 128 \
    --num-prompts 64 --prompt-ids 32000 --out "$OUT" -q 2>&1 | tail -4
  python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8123/metrics').read().decode())" \
    | grep step_seconds
  kill $spid; wait $spid 2> /dev/null
fi
stamp done
