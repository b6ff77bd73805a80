# Sourced by the device scripts (gpu_session.sh, gpu_8b.sh): strict mode, $OUT, and the
# stage clock: `stamp NAME` prints the seconds since the start, `cap N` is N or the seconds left
# before DEADLINE (default 540), so every stage ends in time for the archive to be written.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }
cap() { local left=$(( ${DEADLINE:-540} - ($(date +%s) - t0) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo $1; }

# `serve_stage ART OUTPUT_LEN [qserve args...]`: issue 16's check with the fast runtime: the
# serving wheels (build/wheels/serve), tests/runtime/test_server.py on CUDA, then qserve on ART
# driven by `qbench --url` (64 x 1024 in, all at once), its /metrics into $OUT; SERVE_MODES
# (default "process thread"): qserve with its engine in its own process (the default) and with
# --engine-thread, one after the other, each with its own JSON (-process / -thread).
serve_stage() {
  local art=$1 outlen=$2; shift 2
  serve_tests
  local mode
  for mode in ${SERVE_MODES:-process thread}; do
    stamp "qserve $mode"
    local extra=()
    [ "$mode" = thread ] && extra=(--engine-thread)
    qserve "$art" --port 8123 --max-seqs 64 "${extra[@]}" "$@" > "$OUT/qserve_$mode.log" 2>&1 &
    local spid=$!
    for _ in $(seq $(cap 150)); do
      python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health', timeout=2)" \
        2> /dev/null && break; sleep 1
    done
    stamp serve-ready
    grep -E "qserve:|error|Error" "$OUT/qserve_$mode.log" | head -5
    mkdir -p "$OUT/$mode"
    timeout $(cap 90) qbench --url http://127.0.0.1:8123/v1 --input-len 1024 \
      --output-len "$outlen" --num-prompts 64 --prompt-ids 32000 --out "$OUT/$mode" -q 2>&1 | tail -2
    python -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8123/metrics').read().decode())" \
      > "$OUT/qserve_metrics_$mode.txt"
    grep step_seconds "$OUT/qserve_metrics_$mode.txt"
    kill $spid; wait $spid 2> /dev/null
  done
}

# `serve_tests`: the serving wheels, then tests/runtime/test_server.py on CUDA (fast runtime).
serve_tests() {
  stamp serve
  python -m pip install -q --no-index --find-links build/wheels/serve fastapi uvicorn openai httpx \
    >> "$OUT/install.log" 2>&1 || tail -3 "$OUT/install.log"
  QCOMPILE_SERVE_DEVICE=cuda timeout -s INT $(cap 200) python -m pytest -q -rfE -s \
    tests/runtime/test_server.py 2>&1 | tee "$OUT/pytest_serve.log" | tail -3
}

# `kernels_and_artifact`: install, build every kernel for this GPU (no tests, no benchmarks),
# export QCOMPILE_KERNEL_DIR, and compile the 1B-shaped w4a8 / KV4 artifact /tmp/art1b
# (gpu_step.sh without its profile).
kernels_and_artifact() {
  stamp kernels
  SKIP_PYTEST=1 ONLY= BENCH= timeout $(cap 90) bash bench/gpu_kernels.sh
  local major
  major=$(python -c "import torch; print(torch.cuda.get_device_capability()[0])")
  export QCOMPILE_KERNEL_DIR=build/kernels_sm${major}0
  stamp artifact
  SKIP_PROFILE=1 timeout $(cap 150) bash bench/gpu_step.sh
}

# `profile_stage ART`: a prefill and a decode step of ART profiled under Inductor
# (bench/profile_step.py --compile, batch 64 x 1024) into $OUT/profile, its summary printed.
profile_stage() {
  stamp profile
  mkdir -p "$OUT/profile"
  timeout $(cap 150) python bench/profile_step.py "$1" --batch 64 --input-len 1024 \
    --compile --out "$OUT/profile" > "$OUT/profile/log" 2>&1
  grep -E "^load|^\| [a-z]|GPU kernel time|prefill step" "$OUT/profile/log" | head -14
}
