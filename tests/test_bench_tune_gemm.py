"""bench/tune_gemm.py's candidate tiles, and the call operands it takes from bench/gemm.py
(the sweep itself needs a GPU)."""
from __future__ import annotations

import pytest
import torch

from qcompile.compiler.schemes import SPECS
from qcompile.cutlass_templates import configs as C


@pytest.fixture(scope="module")
def tune(bench_module):
    with bench_module("tune_gemm") as mod:
        yield mod


@pytest.mark.parametrize("kind", ["w4a4x", "w4a4x_s4"])
def test_w4ax_candidates_fit_the_per_block_rules(tune, kind):
    """W4Ax sweeps its own tiles: BK = one 128-channel block, no split-K, <= 64 accumulators
    a thread; decode only 16-row tiles; the selected tiles among them."""
    for m in (1, 16, 64, 1024):
        cands = tune.candidates(kind, 4096, m)
        assert cands and all(cfg.fits(k, 4096) for k, cfg in cands)
        assert all(cfg.split_k == 1 and cfg.bk == 128 for _, cfg in cands)
        assert C.select_config(kind, m, 4096, 4096) in {cfg for _, cfg in cands}
        if m == 1:
            assert {cfg.bm for _, cfg in cands} == {16}
    labels = [cfg.label(k) for k, cfg in tune.candidates(kind, 4096, 1024)]
    assert len(set(labels)) == len(labels)  # each tile timed once


def test_operands_are_the_references_arguments(tune):
    """W4Ax calls take the block scales and row sums, the s4 kind packed codes with K and n8
    for the launch; W4A8 its per-token sum; each matches the row's reference."""
    x = torch.randn(3, 512)
    w = [t for t in SPECS["w4a4"].pack_weight(torch.randn(40, 512)).values()]
    for kind in ("w4a4x", "w4a4x_s4"):
        xq, sx, rest, tail, kw = tune.bg.operands(tune.KINDS[kind], kind, x, 40, 0.25)
        packed = kind == "w4a4x_s4"
        assert xq.shape == (3, 320 if packed else 512) and sx.shape == (3, 4)
        assert tail == (40, 1, 128, int(packed))
        assert kw == {"k": 512, "extra": (1,) if packed else ()}
        y = SPECS["w4a4"].reference(xq, sx, *rest, *w, None, *tail, torch.float16)
        assert y.shape == (3, 40)
    xq, sx, rest, tail, kw = tune.bg.operands(tune.KINDS["w4a8"], "w4a8", x, 40, 0.25)
    assert (xq.shape, len(rest), tail, kw) == ((3, 512), 1, (40,), {})
