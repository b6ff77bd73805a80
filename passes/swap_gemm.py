"""Swap floating-point linears for the quantized GEMM op of the compile's scheme.

Matches: `aten.linear(x, W[, b])` where W is a weight (placeholder with a known value).
The LM head (a linear whose result reaches the graph output through casts and views only)
is left in floating point unless asked. Emits: one `qcompile::quant_a8(x)` per distinct
input x, placed right after x's producer (q/k/v sharing a norm share one quantization), and
the GEMM op of the scheme with W quantized by round-to-nearest and packed in the kernel
layout (new weight placeholders `<W>_q`, `<W>_s`, ...). Node walking, not a pattern: the
replacement creates weight placeholders, which a pattern cannot.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx
from tqdm import tqdm

from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W8A8, QuantScheme
from qcompile.compiler.quantize import quantize_weight
from qcompile.cutlass_templates.w4a8_layout import (W4A8_PER_CHANNEL, pack_group_params,
                                                     w4a8_group_layout)
from qcompile.cutlass_templates.w8a8_layout import W8A8_ROW_MAJOR
from qcompile.runtime.ops import GEMM_OPS

from .base import Lowering

aten = torch.ops.aten
_PASSTHROUGH = {aten._to_copy.default, aten.view.default, aten.reshape.default}


def _pad(v: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(v.float(), (0, n - v.shape[0]))


def _pack_w8a8(w, scheme):
    qw = quantize_weight(w, scheme)
    q = W8A8_ROW_MAJOR.pack(qw.q)
    return {"q": q, "s": _pad(qw.scale, q.shape[0])}


def _pack_w4a8(w, scheme):
    qw = quantize_weight(w, scheme)
    q = W4A8_PER_CHANNEL.pack(qw.q)
    np_ = q.shape[0] * 32
    return {"q": q, "s": _pad(qw.scale, np_), "zs": _pad(qw.zero * qw.scale, np_)}


def _pack_w4a8_group(w, scheme):
    qw = quantize_weight(w, scheme)
    q = w4a8_group_layout(scheme.group_size).pack(qw.q)
    s2, negzs = pack_group_params(qw.s2, qw.z2)
    return {"q": q, "s1": _pad(qw.s1, q.shape[0] * 32), "s2": s2, "negzs": negzs}


@dataclass(frozen=True)
class GemmFormat:
    """How a scheme's GEMM op is called: (x_q, s_x, [sum x_q], *weights, bias, n, *extra,
    out_dtype)."""
    pack: Callable[[torch.Tensor, QuantScheme], dict]
    uses_sum: bool
    extra: Callable[[QuantScheme], tuple] = lambda s: ()


GEMM_FORMATS = {
    W8A8: GemmFormat(_pack_w8a8, uses_sum=False),
    W4A8: GemmFormat(_pack_w4a8, uses_sum=True),
    W4A8_G128: GemmFormat(_pack_w4a8_group, uses_sum=False, extra=lambda s: (s.group_size,)),
    W4A8_G64: GemmFormat(_pack_w4a8_group, uses_sum=False, extra=lambda s: (s.group_size,)),
}


def _feeds_output(node: fx.Node) -> bool:
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        if user.op == "output":
            return True
        if user.target in _PASSTHROUGH:
            frontier.extend(user.users)
    return False


def _linears(lowering: Lowering, include_head: bool):
    for node in list(lowering.gm.graph.nodes):
        if node.target != aten.linear.default:
            continue
        w = lowering.weight_of(node.args[1])
        if w is None or w.dim() != 2 or (not include_head and _feeds_output(node)):
            continue
        yield node, w


def _quantize_input(lowering: Lowering, x: fx.Node, memo: dict) -> tuple:
    if x not in memo:
        with lowering.gm.graph.inserting_after(x):
            q = lowering.call(torch.ops.qcompile.quant_a8.default, (x,))
        with lowering.gm.graph.inserting_after(q):
            memo[x] = tuple(lowering.call(operator.getitem, (q, i)) for i in range(3))
    return memo[x]


def swap_gemm(lowering: Lowering, scheme: QuantScheme, include_head: bool = False) -> int:
    fmt, op = GEMM_FORMATS[scheme], GEMM_OPS[scheme]
    memo, count = {}, 0
    todo = list(_linears(lowering, include_head))
    for node, w in tqdm(todo, desc=f"quantize + pack ({scheme.name})", unit="linear",
                        leave=False, disable=None):  # disable=None: only on a terminal
        x, wnode = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        xq, sx, xsum = _quantize_input(lowering, x, memo)
        packed = fmt.pack(w.detach(), scheme)
        wnodes = [lowering.add_weight(f"{wnode.name}_{k}", v) for k, v in packed.items()]
        out = node.meta["val"]
        args = (xq, sx, *((xsum,) if fmt.uses_sum else ()), *wnodes, bias, w.shape[0],
                *fmt.extra(scheme), out.dtype)
        with lowering.gm.graph.inserting_before(node):
            gemm = lowering.call(op, args)
        node.replace_all_uses_with(gemm)
        lowering.gm.graph.erase_node(node)
        count += 1
    return count
