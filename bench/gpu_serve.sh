#!/usr/bin/env bash
# One short device call for issue 16: build, tests/runtime/test_server.py on CUDA (the fast
# runtime), then qserve on the 1B-shaped w4a8 / KV4 artifact driven by `qbench --url` (64 x
# 1024/128, all at once) with the server's step time from /metrics. OFFLINE=1 adds the
# offline qbench of the same artifact and prompts first (its load warms Inductor's cache).
source "$(dirname "$0")/gpu_common.sh"
stamp kernels
SKIP_PYTEST=1 ONLY= BENCH= timeout $(cap 90) bash bench/gpu_kernels.sh
major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
python -m pip install -q --no-index --find-links build/wheels/serve fastapi uvicorn openai httpx \
  >> "$OUT/install.log" 2>&1 || tail -3 "$OUT/install.log"
stamp test_server
QCOMPILE_SERVE_DEVICE=cuda timeout -s INT $(cap 80) python -m pytest -q -rfE \
  tests/runtime/test_server.py 2>&1 | tee "$OUT/pytest_serve.log" | tail -3
stamp artifact
SKIP_PROFILE=1 timeout $(cap 150) bash bench/gpu_step.sh
if [ -n "${OFFLINE:-}" ]; then
  stamp qbench
  timeout $(cap 150) qbench /tmp/art1b --input-len 1024 --output-len 128 --num-prompts 64 \
    --max-seqs 64 --out "$OUT" -q 2>&1 | grep -E "^qbench|^\|" | tail -3
fi
stamp qserve
qserve /tmp/art1b --port 8123 --max-seqs 64 > "$OUT/qserve.log" 2>&1 &
spid=$!
for _ in $(seq $(cap 150)); do
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health', timeout=2)" 2> /dev/null && break; sleep 1
done
stamp serve-ready
grep qserve: "$OUT/qserve.log"
timeout $(cap 60) qbench --url http://127.0.0.1:8123/v1 --input-len 1024 --output-len 128 \
  --num-prompts 64 --prompt-ids 32000 --out "$OUT" -q 2>&1 | tail -4
python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8123/metrics').read().decode())" \
  | grep step_seconds
kill $spid; wait $spid 2> /dev/null
stamp done
