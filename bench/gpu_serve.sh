#!/usr/bin/env bash
# One short device call for issue 16: build, the 1B-shaped w4a8 / KV4 artifact, then
# gpu_common.sh's serve_stage (tests/runtime/test_server.py on CUDA with the fast runtime,
# qserve driven by `qbench --url`, 64 x 1024/128 all at once, the server's step time from
# /metrics). OFFLINE=1 adds the offline qbench of the same artifact and prompts first, for
# the ratio (its load also warms Inductor's cache for qserve's); PROFILE=1 profiles a prefill
# and a decode step of the artifact at the end (bench/profile_step.py --compile).
source "$(dirname "$0")/gpu_common.sh"
kernels_and_artifact
if [ -n "${OFFLINE:-}" ]; then
  stamp qbench
  timeout $(cap 150) qbench /tmp/art1b --input-len 1024 --output-len 128 --num-prompts 64 \
    --max-seqs 64 --out "$OUT" -q 2>&1 | grep -E "^qbench|^\|" | tail -3
fi
serve_stage /tmp/art1b 128
[ -n "${PROFILE:-}" ] && profile_stage /tmp/art1b  # its prefill and decode steps
stamp done
