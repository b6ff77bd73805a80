#!/usr/bin/env bash
# The wheel as a user gets it: built from the repo, installed non-editable into a fresh
# environment (torch and its packages borrowed from the environment named by $1, so CI does
# not install torch twice), then `qcompile --help` and a tiny compile -> qrun -> qeval run
# from outside the source tree. Catches what the editable install hides: a package or a data
# file left out of the wheel.
set -euo pipefail
base_env=$(cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
python3 -m venv "$work/env"
site=$("$work/env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
base_site=$("$base_env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$base_site" > "$site/base_env.pth"  # after the env's own packages on sys.path
"$work/env/bin/pip" install --quiet "$work"/dist/*.whl pytest

cd "$work"  # nothing from the source tree on sys.path
export PATH="$work/env/bin:$PATH" QCOMPILE_CACHE="$work/cache"
python -c "
import qcompile.runtime.ops, qcompile.cutlass_templates as t, pathlib, sys
assert sys.prefix == '$work/env' and '$work/env' in qcompile.runtime.ops.__file__
assert (pathlib.Path(t.__file__).parent / 'w4a8_sm80.cu').is_file()"
qcompile --help > /dev/null
qserve --help > /dev/null
python -c "
import sys; sys.path.insert(0, '$repo/tests')
from conftest import build_tiny_tokenizer, save_tiny_checkpoint
save_tiny_checkpoint('$work/tiny', build_tiny_tokenizer())"
qcompile "$work/tiny" --precision w4a8 --kv int4 --dtype float32 --kernels skip -q -o "$work/art"
out=$(qrun "$work/art" -p "import os" --max-new-tokens 8 --raw)
test -n "$out"
qeval "$work/art" --seqs 1 --seq-len 64 --json | python -c "
import json, sys; r = json.load(sys.stdin); assert r['perplexity'] > 1 and r['tokens'] == 63, r"
echo "wheel smoke test: OK ($(basename "$work"/dist/*.whl))"
