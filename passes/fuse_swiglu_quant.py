"""Fuse per-token activation quantization into SwiGLU (the down projection's input).

Matches: `quant(silu(gate) * up)` where the product has no other user (gate/up may be
two linears, as in HF graphs, or two halves of one fused gate_up linear), and `quant` is the
opaque op of an activation quantizer of the scheme rows (`qcompile::quant_a8`, ...).
Emits: `silu(gate) * up` followed by the quantizer's reference as ATen ops, one Inductor
kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qcompile.compiler.schemes import ActQuant

from .base import Lowering
from .fusion import apply_per_quantizer, arities, build_pass


@functools.cache
def _pass(act: ActQuant):
    def search(gate, up):
        return act.op(F.silu(gate) * up)

    def replace(gate, up):
        return act.reference(F.silu(gate) * up)

    return build_pass(search, replace,
                      lambda dt: [torch.empty(4, 8, dtype=dt), torch.empty(4, 8, dtype=dt)],
                      arities=arities(act))


def fuse_swiglu_quant(lowering: Lowering) -> int:
    return apply_per_quantizer(lowering.gm.graph, _pass)
