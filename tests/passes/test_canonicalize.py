"""passes/canonicalize.py: export's device asserts dropped, casts as `_to_copy(x, dtype=)`,
no-op casts removed; numerics bit-identical (the pass moves no arithmetic)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from qcompile.compiler.capture import KVSpec, example_inputs
from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.canonicalize import canonicalize

aten = torch.ops.aten
ASSERT, TO_DTYPE, TO_COPY = (aten._assert_tensor_metadata.default, aten.to.dtype,
                             aten._to_copy.default)

# Cast sites of the canonical decoder: RoPE (positions.float(), cos.to(dtype), sin.to(dtype))
# = 3, each RMSNorm 2 (x.to(f32), .to(x.dtype)) x (2 per layer x 2 layers + final) = 10, the
# logits' .float() = 1. Export writes each as `_assert_tensor_metadata` + `to.dtype`.
CAST_SITES = 3 + 2 * 5 + 1
# After the pass only real conversions remain: fp32 keeps positions int64 -> f32; fp16 keeps
# all 14 (every site changes dtype there).
CASTS_LEFT = {torch.float32: 1, torch.float16: CAST_SITES}


def _casts_are_canonical(gm) -> None:
    for node in gm.graph.nodes:
        assert node.target not in (ASSERT, TO_DTYPE), node.format_node()
        if node.target == TO_COPY:
            assert set(node.kwargs) == {"dtype"}, node.format_node()
            assert node.kwargs["dtype"] != node.args[0].meta["val"].dtype, node.format_node()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_decoder(tiny_llama, decoder_lowering, dtype):
    low = decoder_lowering(tiny_llama, dtype)
    before = Counter(call_targets(low.gm))
    assert before[ASSERT] == before[TO_DTYPE] == CAST_SITES

    inputs = example_inputs(KVSpec.of(tiny_llama.config, "fp16", 16, dtype))
    ref = low(*inputs)

    res = run_pass(canonicalize, low)

    assert res.matches == 2 * CAST_SITES
    _casts_are_canonical(low.gm)
    assert Counter(call_targets(low.gm))[TO_COPY] == CASTS_LEFT[dtype]
    out = low(*inputs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


class _Casts(torch.nn.Module):
    """Every kind of cast the pass has a rule for, plus three it must leave alone."""

    def forward(self, x):  # x: float32
        a = x.to(torch.float16)                            # -> _to_copy(x, dtype=f16)
        b = x.to(torch.float32)                            # no-op: dropped
        c = aten._to_copy.default(a, dtype=torch.float16)  # dtype-only, no-op: dropped
        d = aten._to_copy.default(x, dtype=torch.float64)  # already canonical: kept
        e = x.to(torch.float16, copy=True)                 # asks for a copy: kept
        f = x.to(device="cpu", dtype=torch.float64)        # names a device: kept
        return a + 1, b * 2, c, d, e, f


def test_small_graph_rules():
    x = torch.randn(2, 3)
    low = Lowering.from_exported(torch.export.export(_Casts(), (x,)))
    before = Counter(call_targets(low.gm))
    ref = low(x)

    res = run_pass(canonicalize, low)

    # 4 asserts (one per .to call) + a rewritten + b and c dropped.
    assert before[ASSERT] == 4 and res.matches == 4 + 3
    after = Counter(call_targets(low.gm))
    assert after[ASSERT] == 0
    # d and the rewritten a are the two `_to_copy`s; e and f stay as export wrote them.
    assert after[TO_COPY] == 2
    assert after[TO_DTYPE] == 1 and after[aten.to.device] == 1
    copy_cast = next(n for n in low.gm.graph.nodes if n.target == TO_DTYPE)
    assert copy_cast.args[1:] == (torch.float16, False, True)
    out = low(x)
    assert all(o.dtype == r.dtype and torch.equal(o, r) for o, r in zip(out, ref))


def test_canonical_graph_does_not_match(tiny_llama, decoder_lowering):
    """Negative case: a graph already in canonical form (no asserts, only real
    `_to_copy(x, dtype=)` casts) has nothing to rewrite."""
    low = decoder_lowering(tiny_llama, torch.float16)
    run_pass(canonicalize, low)
    code = low.gm.code

    assert run_pass(canonicalize, low).matches == 0
    assert low.gm.code == code
