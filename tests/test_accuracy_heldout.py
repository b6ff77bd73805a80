"""Held-out accuracy guard (issue 14): each quantized recipe of the default model, compiled as
`qcompile` compiles it by default (QoQ calibrated on pydoc; SmoothQuant for W8A8), scored on
text its calibration never read, against the float model on the same text.

`slow` (about 11 minutes on 2 cores: four QoQ / SmoothQuant compiles). Windows: 8 x 512 tokens
per source, a quick stand-in for bench/accuracy.py's 24. Bounds are the ratios measured
(bench/results/accuracy-heldout-2026-12-07.md) plus a few points, so that a change which makes a
recipe fit its calibration text better and other text worse fails here even when pydoc, the
standing metric, improves. They are not issue 14's targets, except the per-channel recipe
with `--int8-linears 0.2`, which is held to the issue's +16%."""
import pytest

from qcompile.compiler.compile import compile_checkpoint
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import perplexity
from qcompile.runtime.texts import SourceMissing, read_source

HELD_OUT = ("cpython-prose", "package-readmes")
SEQS, SEQ_LEN = 8, 512
# perplexity / FP16 KV16's on the same source, worst of HELD_OUT. Measured here (8 windows,
# float16, 2026-12-07): per-channel +15.8% / +20.9%, g64 +12.6% / +16.6%, W8A8 SmoothQuant KV16
# +1.7% / +1.4% (cpython-prose / package-readmes).
BOUND = {("w4a8", "int4"): 1.32, ("w4a8-g64", "int4"): 1.24, ("w8a8", "fp16"): 1.05,
         # issue 14's per-channel bound, +16%, with a fifth of the weights at W8A8
         # (compiler/sensitivity.py; bench/accuracy.py measured +12.3% / +14.7% on 24 windows,
         # this test +9.5% / +12.7% on its 8)
         ("w4a8", "int4", 0.2): 1.16}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts():
    try:
        return {name: read_source(name) for name in HELD_OUT}
    except SourceMissing as e:
        pytest.skip(f"held-out text missing on this machine: {e}")


def _score(ckpt, tmp_path_factory, texts, **cfg) -> dict[str, float]:
    cfg = CompileConfig(kernels="skip", **cfg)  # default quantizer: the precision's recipe
    out = tmp_path_factory.mktemp("heldout") / f"{cfg.precision}-{cfg.kv}-{cfg.int8_linears}"
    engine = Engine.load(compile_checkpoint(ckpt, cfg, out, progress=False))
    return {name: perplexity(engine, SEQS, SEQ_LEN, progress=False, text=text,
                             name=name).perplexity for name, text in texts.items()}


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint, tmp_path_factory, texts):
    return _score(smollm2_checkpoint, tmp_path_factory, texts, precision="fp16", kv="fp16")


@pytest.mark.parametrize("key", list(BOUND), ids=lambda k: "-".join(map(str, k)))
def test_recipe_holds_on_held_out_text(smollm2_checkpoint, tmp_path_factory, texts,
                                       reference, key):
    precision, kv, *share = key
    got = _score(smollm2_checkpoint, tmp_path_factory, texts, precision=precision, kv=kv,
                 int8_linears=share[0] if share else 0.0)
    ratios = {name: got[name] / reference[name] for name in HELD_OUT}
    print(f"{precision} kv {kv} {share}: " + ", ".join(f"{n} {got[n]:.2f} ({100 * (r - 1):+.1f}%)"
                                                for n, r in ratios.items()))
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= BOUND[key], \
        f"{worst}: {100 * (ratios[worst] - 1):+.1f}% over FP16 KV16 (bound " \
        f"{100 * (BOUND[key] - 1):+.0f}%)"
