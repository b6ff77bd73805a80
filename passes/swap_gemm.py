"""Swap floating-point linears for the quantized GEMM op of the compile's scheme.

Matches: `aten.linear(x, W[, b])` where W is a weight (placeholder with a known value).
The LM head (a linear whose result reaches the graph output through casts and views only)
is left in floating point unless asked. Emits: for schemes with quantized activations, one
activation quantization of the scheme (`qcompile::quant_a8(x)`, ...) per distinct input x,
placed right after x's producer (q/k/v sharing a norm share one quantization; weight-only
schemes read x itself), and the GEMM op of the scheme with W quantized by round-to-nearest and
packed in the kernel layout (new weight placeholders `<W>_q`, `<W>_s`, ...), as the scheme's
row in compiler/schemes.py says. A scheme with per-linear arguments (w4a4's FMPQ: how many
8-bit activation blocks) takes each linear's from `linear_args` (canonical name -> {arg:
value}, the `fmpq` step's table) or the row's default, and passes them to its activation
quantizer and its GEMM. `quantized` gives integer weights
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
from torch import fx
from tqdm import tqdm

from qcompile.compiler.calibrate import canonical_name
from qcompile.compiler.schemes import QUANTIZED, QuantScheme, SchemeSpec, spec_of

from .base import Lowering

aten = torch.ops.aten
_PASSTHROUGH = {aten._to_copy.default, aten.view.default, aten.reshape.default}


@dataclass(frozen=True)
class GemmFormat:
    """How a scheme's GEMM op is called: (x_q, s_x, [sum x_q], *weights, bias, n, *extra,
    out_dtype), or (x, *weights, ...) for weight-only schemes (act_bits 16). A view of the
    scheme's row (compiler/schemes.py)."""
    pack: Callable[..., dict]  # (w, scheme, qw=None) -> {buffer: tensor}
    uses_sum: bool
    extra: Callable[[QuantScheme], tuple]


def _format(spec: SchemeSpec) -> GemmFormat:
    return GemmFormat(lambda w, scheme, qw=None: spec.pack_weight(w, qw), spec.uses_sum,
                      lambda scheme: spec.extra)


GEMM_FORMATS = {s.scheme: _format(s) for s in QUANTIZED}


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


def _quantize_input(lowering: Lowering, x: fx.Node, spec: SchemeSpec, memo: dict,
                    args: tuple = ()) -> tuple:
    key = (x, spec.act.op, args)
    if key not in memo:
        with lowering.gm.graph.inserting_after(x):
            q = lowering.call(spec.act.op, (x, *args))
        with lowering.gm.graph.inserting_after(q):
            memo[key] = tuple(lowering.call(operator.getitem, (q, i))
                              for i in range(spec.act.outputs))
    return memo[key]


def _activation_args(lowering: Lowering, x: fx.Node, spec: SchemeSpec, memo: dict,
                     args: tuple = ()) -> tuple:
    """The GEMM's activation operands: x itself for weight-only schemes, else
    (x_q, s_x[, sum x_q]) of x's one activation quantization (with the linear's arguments:
    linears that read one x with the same arguments share it)."""
    if spec.act is None:
        return (x,)
    xq, sx, *xsum = _quantize_input(lowering, x, spec, memo, args)
    return (xq, sx, *(xsum if spec.uses_sum else ()))


def _linear_args(spec: SchemeSpec, name: str, table: dict) -> tuple:
    """The linear's per-linear argument values, in the row's order (its table entry, else the
    row's defaults)."""
    given = table.get(name, {})
    unknown = set(given) - {arg for arg, _ in spec.linear_args}
    if unknown:
        raise ValueError(f"swap_gemm: {name}: {spec.precision} takes no per-linear arguments "
                         f"{sorted(unknown)}")
    return tuple(int(given.get(arg, default)) for arg, default in spec.linear_args)


def _given(name: str, w: torch.Tensor, spec: SchemeSpec, quantized: dict):
    """The integer weights given for the linear `name` or None, checked against its weight W
    and the scheme."""
    scheme = spec.scheme
    qw = quantized.get(name)
    if qw is not None and (tuple(qw.q.shape) != tuple(w.shape) or type(qw) is not spec.weights
                           or getattr(qw, "group_size", None) != scheme.group_size):
        raise ValueError(f"swap_gemm: the integer weights given for {name} "
                         f"({type(qw).__name__} {tuple(qw.q.shape)}) do not fit its weight "
                         f"{tuple(w.shape)} in {scheme.name}")
    return qw


def swap_gemm(lowering: Lowering, scheme: QuantScheme, include_head: bool = False,
              quantized: dict | None = None, linear_args: dict | None = None,
              head_scheme: QuantScheme | None = None,
              linear_schemes: dict[str, QuantScheme] | None = None) -> int:
    """head_scheme: the LM head in this scheme instead (implies include_head), e.g. W8A8 for a
    W4A8 model: the head is the largest single weight of a decode step (10% of a 1B step on an
    H100 in fp16) and an int8 head keeps its argmax nearly always. linear_schemes: decoder
    linears (canonical names) in another scheme than `scheme`, e.g. W8A8 for those QoQ's
    `--int8-linears` kept at 8 bits (compiler/sensitivity.py)."""
    base, head_spec = spec_of(scheme), spec_of(head_scheme) if head_scheme else None
    linear_schemes = linear_schemes or {}
    memo, count, quantized, used = {}, 0, quantized or {}, set()
    linear_args, named = linear_args or {}, set()
    todo = list(_linears(lowering, include_head or head_spec is not None))
    for i in tqdm(range(len(todo)), desc=f"quantize + pack ({scheme.name})", unit="linear",
                  leave=False, disable=None):  # disable=None: only on a terminal
        (node, w), todo[i] = todo[i], None  # hold no float weight past its own packing
        x, wnode = node.args[0], node.args[1]
        name = canonical_name(lowering.origin.get(wnode.name, wnode.name))
        spec = head_spec if head_spec is not None and _feeds_output(node) else \
            spec_of(linear_schemes[name]) if name in linear_schemes else base
        bias = node.args[2] if len(node.args) > 2 else None
        qw = _given(name, w, spec, quantized)
        largs = _linear_args(spec, name, linear_args)
        named.add(name)
        xargs = _activation_args(lowering, x, spec, memo, largs)
        packed = spec.pack_weight(w.detach(), qw)
        if qw is not None:
            used.add(name)
        wnodes = [lowering.add_weight(f"{wnode.name}_{k}", v) for k, v in packed.items()]
        out = node.meta["val"]
        args = (*xargs, *wnodes, bias, w.shape[0], *spec.gemm_args(largs), *spec.extra,
                out.dtype)
        with lowering.gm.graph.inserting_before(node):
            gemm = lowering.call(spec.op, args)
        node.replace_all_uses_with(gemm)
        lowering.gm.graph.erase_node(node)
        # the float weight's last reader is gone: free it now, not when the pipeline ends, so
        # the compile's peak memory is the checkpoint plus one linear (issue 13: 8B in <= 2x)
        if not wnode.users and wnode.name in lowering.weights:
            del lowering.weights[wnode.name]
            lowering.gm.graph.erase_node(wnode)
        del w, packed
        count += 1
    if set(quantized) - used:
        raise ValueError(f"swap_gemm: integer weights given for linears it did not swap: "
                         f"{sorted(set(quantized) - used)}")
    if set(linear_schemes) - named:
        raise ValueError(f"swap_gemm: schemes given for linears it did not swap: "
                         f"{sorted(set(linear_schemes) - named)}")
    if set(linear_args) - named:
        raise ValueError(f"swap_gemm: per-linear arguments given for linears it did not swap: "
                         f"{sorted(set(linear_args) - named)}")
    return count
