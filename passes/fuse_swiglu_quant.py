"""Fuse per-token INT8 quantization into SwiGLU (the down projection's input).

Matches: `quant_a8(silu(gate) * up)` where the product has no other user (gate/up may be
two linears, as in HF graphs, or two halves of one fused gate_up linear).
Emits: `silu(gate) * up` followed by `quant_a8_ref` as ATen ops, one Inductor kernel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qcompile.runtime.ops.quant import quant_a8_ref

from .base import Lowering
from .fusion import build_pass


def _search(gate, up):
    return torch.ops.qcompile.quant_a8.default(F.silu(gate) * up)


def _replace(gate, up):
    return quant_a8_ref(F.silu(gate) * up)


@functools.cache
def _pass():
    return build_pass(_search, _replace,
                      lambda dt: [torch.empty(4, 8, dtype=dt), torch.empty(4, 8, dtype=dt)])


def fuse_swiglu_quant(lowering: Lowering) -> int:
    return _pass().apply(lowering.gm.graph)
