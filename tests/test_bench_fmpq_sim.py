"""bench/fmpq_sim.py's quantizer and plans (the simulation itself needs QoQ on SmolLM2: minutes)."""
from __future__ import annotations

import pytest
import torch

from qcompile.runtime.ops.quant import quant_a4x_ref


@pytest.fixture(scope="module")
def sim(bench_module):
    with bench_module("fmpq_sim") as mod:
        yield mod


def test_blocks_are_quant_a4x_dequantized(sim):
    """The simulation quantizes exactly as the op the W4A4 GEMM will take."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=g)
    xq, s, _ = quant_a4x_ref(x, 1, 64)
    want = (xq.float().reshape(5, 2, 64) * s[..., None]).reshape(5, 128)
    assert torch.equal(sim.quant_blocks(x, 1, 64), want)


def test_plans(sim):
    amax = torch.arange(1.0, 577.0)  # channel 575 largest
    p = sim.plans("fmpq-25%", {"layers.0.wo": amax, "layers.0.w_down": amax[:512]}, 64,
                  kinds=("wo",))
    plan = p["layers.0.wo"]
    assert plan.n8 == 2  # round(0.25 * 9) = 2 int8 blocks of 9
    assert plan.order[0] == 575 and torch.equal(plan.order[plan.inverse], torch.arange(576))
    assert p["layers.0.w_down"] == "a8"  # not among `kinds`
    assert sim.plans("a4", {"layers.0.wo": amax}, 64)["layers.0.wo"].n8 == 0
    x = torch.randn(3, 576)
    assert torch.allclose(plan(x), x, atol=0.6 * x.abs().max().item() / 7)  # moved back
