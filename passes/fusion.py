"""Shared machinery of the quantization-fusion passes (a pattern and a replacement each).

Patterns are traced without decompositions, so they read like the canonical graph
(`aten._to_copy`, `aten.silu`); replacements inline the activation quantizer's reference
(`quant_a8_ref`, ...) as ATen, which TorchInductor fuses with the producer into one kernel.
Each pattern is registered per activation quantizer of the scheme rows (`ACT_QUANTS` in
compiler/schemes.py), per activation dtype, and per output arity: a quantizer with a per-token
sum output (A8) in two variants, with and without it (W8A8 and group W4A8 never read it, so
dead-code elimination has removed it). A quantizer's patterns are traced only when a graph
holds its op.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import fx
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

from qcompile.compiler.schemes import ACT_QUANTS, ActQuant

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
trace_plain = functools.partial(fwd_only, get_decomp_fn=dict)
# torch >= 2.12 passes its own decomposition table to trace_fn unless told otherwise.
# A pattern with no dtype-specific op (SwiGLU) is the same for every dtype: skip repeats.
_PARAMS = inspect.signature(register_replacement).parameters
_OPTIONS = {k: v for k, v in (("get_decomp_fn", dict), ("skip_duplicates", True)) if k in _PARAMS}


def build_pass(search, replace, example_inputs, scalar_workaround=None,
               arities=(3, 2)) -> PatternMatcherPass:
    """search/replace return the quantizer's outputs (x_q, s_x[, sum]); registered for every
    dtype and for each output arity in `arities`."""
    pm_pass = PatternMatcherPass()
    for dtype in DTYPES:
        for arity in arities:
            register_replacement(_first(search, arity), _first(replace, arity),
                                 example_inputs(dtype), trace_plain, pm_pass,
                                 scalar_workaround=scalar_workaround or {}, **_OPTIONS)
    return pm_pass


def arities(act: ActQuant) -> tuple[int, ...]:
    """Output counts a pattern of `act` may have left after dead-code elimination: all of
    them, down to codes and scales."""
    return tuple(range(act.outputs, 1, -1))


def apply_per_quantizer(graph: fx.Graph, make_pass) -> int:
    """Apply make_pass(act) (cached by the caller) for every activation quantizer whose op
    the graph calls; the number of matches. Quantizers with per-linear arguments (FMPQ's n8)
    are left as ops: a pattern traces its arguments' values in, and Inductor fuses their
    reference all the same (runtime/compiled.py's inline_act_quants)."""
    present = {n.target for n in graph.nodes if n.op == "call_function"}
    return sum(make_pass(act).apply(graph) for act in ACT_QUANTS
               if act.op in present and not act.takes_args)


def _first(fn, n: int):
    """fn with its outputs cut to the first n; keeps fn's signature (the matcher reads the
    argument names)."""
    @functools.wraps(fn)
    def cut(*args):
        return fn(*args)[:n]
    return cut
