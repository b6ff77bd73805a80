"""Held-out accuracy guard (issue 14): each quantized recipe of the default model, compiled as
`qcompile` compiles it by default (QoQ calibrated on pydoc; SmoothQuant for W8A8), scored on
text its calibration never read, against the float model on the same text.

`slow` (about 9 minutes on 2 cores: three QoQ / SmoothQuant compiles). Windows: 8 x 512 tokens
per source, a quick stand-in for bench/accuracy.py's 24. Bounds are the ratios measured
(bench/results/accuracy-heldout-2026-12-07.md) plus a few points, so that a change which makes a
recipe fit its calibration text better and other text worse fails here even when pydoc, the
standing metric, improves; the per-channel default is held to issue 14's +16% (see BOUND)."""
import pytest

from qcompile.compiler.compile import compile_checkpoint
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import perplexity
from qcompile.runtime.texts import SourceMissing, read_source

HELD_OUT = ("cpython-prose", "package-readmes")
SEQS, SEQ_LEN = 8, 512
# perplexity / FP16 KV16's on the same source, worst of HELD_OUT, per (precision, KV, the share
# of linears kept at W8A8: None is the recipe's default, config.INT8_LINEARS_DEFAULT). Measured
# here (8 windows, float16, 2026-12-07; cpython-prose / package-readmes): per-channel default
# +9.5% / +12.7%, held to issue 14's +16%; g64 default +10.7% / +12.3%, held to +14% (the
# issue's +12% is bench/accuracy.py's 24 windows in float32, where it scores +8.7% / +11.5%;
# these 8 windows in float16 read it 0.8 points higher); W8A8 SmoothQuant +1.7% / +1.4%; the
# all-4-bit per-channel recipe, no longer a default, +15.8% / +20.9%.
BOUND = {("w4a8", "int4", None): 1.16,
         ("w4a8-g64", "int4", None): 1.14,
         ("w8a8", "fp16", None): 1.05}
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
    precision, kv, share = key
    got = _score(smollm2_checkpoint, tmp_path_factory, texts, precision=precision, kv=kv,
                 int8_linears=share)
    ratios = {name: got[name] / reference[name] for name in HELD_OUT}
    print(f"{precision} kv {kv} {share}: " + ", ".join(f"{n} {got[n]:.2f} ({100 * (r - 1):+.1f}%)"
                                                for n, r in ratios.items()))
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= BOUND[key], \
        f"{worst}: {100 * (ratios[worst] - 1):+.1f}% over FP16 KV16 (bound " \
        f"{100 * (BOUND[key] - 1):+.0f}%)"
