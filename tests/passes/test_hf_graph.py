"""The quantization passes on transformers' own LlamaForCausalLM graph (not qcompile's canonical
decoder): q/k/v and gate/up are separate linears there, so they must share one input
quantization, which the norm fusion then absorbs.

Tiny random Llama (2 layers, hidden 64), prefill of [1, 12] tokens, no cache, fp32.
"""
from __future__ import annotations

import gc
import weakref
from collections import Counter

import pytest
import torch

from qcompile.compiler.config import W4A8, W8A8
from qcompile.compiler.quantize import dequantize, quantize_weight
from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.fuse_rmsnorm_quant import fuse_rmsnorm_quant
from qcompile.passes.fuse_swiglu_quant import fuse_swiglu_quant
from qcompile.passes.swap_gemm import swap_gemm
from qcompile.compiler.schemes import GEMM_OPS
from qcompile.runtime.ops import quant_a8_ref

aten = torch.ops.aten
QUANT_A8 = torch.ops.qcompile.quant_a8.default
LAYERS = 2
HEAD = "p_m_lm_head_weight"
PROJ = {"q": "self_attn_q_proj", "k": "self_attn_k_proj", "v": "self_attn_v_proj",
        "o": "self_attn_o_proj", "gate": "mlp_gate_proj", "up": "mlp_up_proj",
        "down": "mlp_down_proj"}
SCHEMES = {"w8a8": W8A8, "w4a8": W4A8}
# Against the fake-quant graph (same math: per-token A8 inputs, dequantized weights, other
# float order; an activation code may flip by one step). Measured 3-4e-7; bound 1e-4.
FAKE_QUANT_RTOL = 1e-4
# Against the float graph, relative L2 of the logits, 7 GEMMs per layer x 2 layers, plain
# round-to-nearest (no QoQ). A8 and W8 each add ~0.5% per GEMM (step / sqrt(12) against the
# row's spread); measured 2.5% for W8A8, bound 5%. Per-channel W4 adds ~9% per weight
# (K = 64/96, 16 levels over the row's range); measured 23-31% (two prompts), bound 45%.
FLOAT_RTOL = {"w8a8": 0.05, "w4a8": 0.45}


@pytest.fixture(scope="module")
def hf(hf_graph):
    """(a fresh-copy factory for the canonicalized HF graph, input ids, eager HF logits)."""
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    fresh, eager = hf_graph(ids)
    return fresh, ids, eager


def _weight(layer: int, proj: str) -> str:
    return f"p_m_model_layers_{layer}_{PROJ[proj]}_weight"


def _fake_quant_reference(low: Lowering, scheme) -> Lowering:
    """Every linear but the head on fake-quantized inputs (per-token A8) and dequantized
    weights, in float."""
    def fake_a8(x):
        xq, s, _ = quant_a8_ref(x)
        return (xq.float() * s).to(x.dtype)

    for node in [n for n in low.gm.graph.nodes if n.target == aten.linear.default]:
        name = node.args[1].name
        if name == HEAD:
            continue
        with low.gm.graph.inserting_before(node):
            node.args = (low.gm.graph.call_function(fake_a8, (node.args[0],)), *node.args[1:])
        low.weights[name] = dequantize(quantize_weight(low.weights[name], scheme))
    low.gm.recompile()
    return low


def _gemm_inputs(low: Lowering, op) -> dict[str, torch.fx.Node]:
    """original weight name -> the x_q node its GEMM reads (packed codes are `<W>_q`)."""
    out = {}
    for gemm in [n for n in low.gm.graph.nodes if n.target == op]:
        (codes,) = [a.name for a in gemm.args if isinstance(a, torch.fx.Node)
                    and a.name.endswith("_q") and a.name in low.weights]
        out[codes[:-2]] = gemm.args[0]
    return out


def _upstream(node, depth: int = 12) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        seen |= {n.target for n in frontier}
    return seen


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_exported_graph_is_the_model(hf):
    fresh, ids, eager = hf
    torch.testing.assert_close(fresh()(ids)[0], eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", list(SCHEMES))
def test_quantization_passes(hf, precision):
    fresh, ids, _ = hf
    scheme, op = SCHEMES[precision], GEMM_OPS[SCHEMES[precision]]
    low = fresh()
    float_logits = low(ids)[0]
    fq_logits = _fake_quant_reference(fresh(), scheme)(ids)[0]

    swaps = run_pass(swap_gemm, low, scheme)
    quants_after_swap = Counter(call_targets(low.gm))[QUANT_A8]
    norms = run_pass(fuse_rmsnorm_quant, low)
    swiglus = run_pass(fuse_swiglu_quant, low)

    # Match counts: 7 linears, 2 norm fusions (input, post-attention), 1 SwiGLU per layer.
    assert (swaps.matches, norms.matches, swiglus.matches) == (7 * LAYERS, 2 * LAYERS, LAYERS)
    # quant_a8 per layer: one for q/k/v, o, gate/up, down = 4 after the swap; only o's is left
    # after the fusions (its input comes from attention, not a norm or SwiGLU).
    ops = Counter(call_targets(low.gm))
    assert quants_after_swap == 4 * LAYERS and ops[QUANT_A8] == LAYERS
    assert ops[op] == 7 * LAYERS
    (head,) = [n for n in low.gm.graph.nodes if n.target == aten.linear.default]
    assert head.args[1].name == HEAD  # the LM head stays float
    xq = _gemm_inputs(low, op)
    for i in range(LAYERS):
        q, k, v, o, gate, up, down = (xq[_weight(i, p)] for p in PROJ)
        # q/k/v read ONE int8 tensor, computed inline after the input norm; same for gate/up
        # after the post-attention norm; down's comes from SiLU*Mul.
        assert q is k is v and gate is up and len({q, o, gate, down}) == 4
        for fused, producer in ((q, aten.rsqrt.default), (gate, aten.rsqrt.default),
                                (down, aten.silu.default)):
            assert fused.target == aten._to_copy.default and fused.kwargs["dtype"] == torch.int8
            assert producer in _upstream(fused)
        assert o.args[0].target == QUANT_A8
    # Numerics.
    logits = low(ids)[0]
    assert _rel(logits, fq_logits) < FAKE_QUANT_RTOL
    assert _rel(logits, float_logits) < FLOAT_RTOL[precision]


def test_head_stays_float_and_norm_before_head_is_not_fused(hf):
    """Negative cases on the HF graph: the final norm feeds the float LM head (no quant_a8), so
    it is not fused. With include_head=True the head is swapped too, but its input is a view of
    the norm's output (`hidden_states[:, slice_indices]`, exported as `aten.alias`), so that
    norm still has no quant_a8 of its own to absorb."""
    fresh, ids, _ = hf
    low = fresh()
    run_pass(swap_gemm, low, W8A8)
    assert run_pass(fuse_rmsnorm_quant, low).matches == 2 * LAYERS
    assert Counter(call_targets(low.gm))[aten.rsqrt.default] == 2 * LAYERS + 1

    low = fresh()
    assert run_pass(swap_gemm, low, W8A8, True).matches == 7 * LAYERS + 1
    assert run_pass(fuse_rmsnorm_quant, low).matches == 2 * LAYERS
    ops = Counter(call_targets(low.gm))
    # o and down per layer (no SwiGLU fusion run here) and the head's.
    assert ops[aten.linear.default] == 0 and ops[QUANT_A8] == 2 * LAYERS + 1
    head_quant = [n for n in low.gm.graph.nodes
                  if n.target == QUANT_A8 and n.args[0].target == aten.alias.default]
    assert len(head_quant) == 1


def test_packed_weights_hold_no_autograd_history(hf):
    fresh, _, _ = hf
    low = fresh()
    # A q_proj weight that only `low` refers to (the fixture's graph shares the others), still
    # a trainable leaf like the nn.Parameter it stands for.
    q = _weight(0, "q")
    low.weights[q] = low.weights[q].detach().clone().requires_grad_(True)
    before = set(low.weights)
    float_q = weakref.ref(low.weights[q])

    run_pass(swap_gemm, low, W8A8)

    added = set(low.weights) - before
    assert added and all(low.weights[k].grad_fn is None for k in added)
    gc.collect()
    assert float_q() is None  # the dropped float weight is freed
