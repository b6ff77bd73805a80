"""Swap floating-point linears for the quantized GEMM op of the compile's scheme.

Matches: `aten.linear(x, W[, b])` where W is a weight (placeholder with a known value).
The LM head (a linear whose result reaches the graph output through casts and views only)
is left in floating point unless asked. Emits: for schemes with quantized activations, one
`qcompile::quant_a8(x)` per distinct input x, placed right after x's producer (q/k/v sharing a
norm share one quantization; weight-only schemes, act_bits 16, read x itself), and
the GEMM op of the scheme with W quantized by round-to-nearest and packed in the kernel
layout (new weight placeholders `<W>_q`, `<W>_s`, ...). `quantized` gives integer weights
chosen earlier (GPTQ), keyed by canonical weight name: those are packed as they are, since
RTN of their dequantized values recomputes the scales and need not give the same codes back.
Node walking, not a pattern: the replacement creates weight placeholders, which a pattern
cannot.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx
from tqdm import tqdm

from qcompile.compiler.calibrate import canonical_name
from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W4A16_G128, W8A8, QuantScheme
from qcompile.compiler.quantize import quantize_weight
from qcompile.cutlass_templates.w4a8_layout import (W4A8_PER_CHANNEL, check_group_codes,
                                                    pack_group_params, w4a8_group_layout)
from qcompile.cutlass_templates.w4a16_layout import w4a16_layout
from qcompile.cutlass_templates.w8a8_layout import W8A8_ROW_MAJOR
from qcompile.runtime.ops import GEMM_OPS

from .base import Lowering

aten = torch.ops.aten
_PASSTHROUGH = {aten._to_copy.default, aten.view.default, aten.reshape.default}


def _pad(v: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(v.float(), (0, n - v.shape[0]))


def _pack_w8a8(w, scheme, qw=None):
    qw = quantize_weight(w, scheme) if qw is None else qw
    q = W8A8_ROW_MAJOR.pack(qw.q)
    return {"q": q, "s": _pad(qw.scale, q.shape[0])}


def _pack_w4a8(w, scheme, qw=None):
    qw = quantize_weight(w, scheme) if qw is None else qw
    q = W4A8_PER_CHANNEL.pack(qw.q)
    np_ = q.shape[0] * 32
    return {"q": q, "s": _pad(qw.scale, np_), "zs": _pad(qw.zero * qw.scale, np_)}


def _pack_w4a8_group(w, scheme, qw=None):
    qw = quantize_weight(w, scheme) if qw is None else qw
    check_group_codes(qw.q, qw.s2, qw.z2, scheme.group_size)
    q = w4a8_group_layout(scheme.group_size).pack(qw.q)
    s2, negzs = pack_group_params(qw.s2, qw.z2)
    return {"q": q, "s1": _pad(qw.s1, q.shape[0] * 32), "s2": s2, "negzs": negzs}


def _pack_w4a16(w, scheme, qw=None):
    qw = quantize_weight(w, scheme) if qw is None else qw
    layout = w4a16_layout(scheme.group_size)
    s, z = layout.pack_params(qw.scale, qw.zero)
    return {"q": layout.pack(qw.q), "s": s, "z": z}


@dataclass(frozen=True)
class GemmFormat:
    """How a scheme's GEMM op is called: (x_q, s_x, [sum x_q], *weights, bias, n, *extra,
    out_dtype), or (x, *weights, ...) for weight-only schemes (act_bits 16)."""
    pack: Callable[[torch.Tensor, QuantScheme], dict]
    uses_sum: bool
    extra: Callable[[QuantScheme], tuple] = lambda s: ()


GEMM_FORMATS = {
    W8A8: GemmFormat(_pack_w8a8, uses_sum=False),
    W4A8: GemmFormat(_pack_w4a8, uses_sum=True),
    W4A8_G128: GemmFormat(_pack_w4a8_group, uses_sum=False, extra=lambda s: (s.group_size,)),
    W4A8_G64: GemmFormat(_pack_w4a8_group, uses_sum=False, extra=lambda s: (s.group_size,)),
    W4A16_G128: GemmFormat(_pack_w4a16, uses_sum=False, extra=lambda s: (s.group_size,)),
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


def _activation_args(lowering: Lowering, x: fx.Node, scheme: QuantScheme, fmt: GemmFormat,
                     memo: dict) -> tuple:
    """The GEMM's activation operands: x itself for weight-only schemes, else
    (x_q, s_x[, sum x_q]) of x's one quant_a8."""
    if scheme.act_bits >= 16:
        return (x,)
    xq, sx, xsum = _quantize_input(lowering, x, memo)
    return (xq, sx, *((xsum,) if fmt.uses_sum else ()))


def _given(lowering: Lowering, wnode: fx.Node, w: torch.Tensor, scheme: QuantScheme,
           quantized: dict):
    """(W's canonical name, the integer weights given for it or None), checked against W
    and the scheme."""
    name = canonical_name(lowering.origin.get(wnode.name, wnode.name))
    qw = quantized.get(name)
    if qw is not None and (tuple(qw.q.shape) != tuple(w.shape)
                           or type(qw) is not type(quantize_weight(w[:1], scheme))
                           or getattr(qw, "group_size", None) != scheme.group_size):
        raise ValueError(f"swap_gemm: the integer weights given for {name} "
                         f"({type(qw).__name__} {tuple(qw.q.shape)}) do not fit its weight "
                         f"{tuple(w.shape)} in {scheme.name}")
    return name, qw


def swap_gemm(lowering: Lowering, scheme: QuantScheme, include_head: bool = False,
              quantized: dict | None = None) -> int:
    fmt, op = GEMM_FORMATS[scheme], GEMM_OPS[scheme]
    memo, count, quantized, used = {}, 0, quantized or {}, set()
    todo = list(_linears(lowering, include_head))
    for node, w in tqdm(todo, desc=f"quantize + pack ({scheme.name})", unit="linear",
                        leave=False, disable=None):  # disable=None: only on a terminal
        x, wnode = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        xargs = _activation_args(lowering, x, scheme, fmt, memo)
        name, qw = _given(lowering, wnode, w, scheme, quantized)
        if qw is None:
            packed = fmt.pack(w.detach(), scheme)
        else:
            packed = fmt.pack(w.detach(), scheme, qw)
            used.add(name)
        wnodes = [lowering.add_weight(f"{wnode.name}_{k}", v) for k, v in packed.items()]
        out = node.meta["val"]
        args = (*xargs, *wnodes, bias, w.shape[0], *fmt.extra(scheme), out.dtype)
        with lowering.gm.graph.inserting_before(node):
            gemm = lowering.call(op, args)
        node.replace_all_uses_with(gemm)
        lowering.gm.graph.erase_node(node)
        count += 1
    if set(quantized) - used:
        raise ValueError(f"swap_gemm: integer weights given for linears it did not swap: "
                         f"{sorted(set(quantized) - used)}")
    return count
