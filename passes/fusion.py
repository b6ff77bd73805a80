"""Shared machinery of the quantization-fusion passes (a pattern and a replacement each).

Patterns are traced without decompositions, so they read like the canonical graph
(`aten._to_copy`, `aten.silu`); replacements inline `quant_a8_ref` as ATen, which
TorchInductor fuses with the producer into one kernel. Each pattern is registered per
activation dtype, and in two variants: with and without the per-token sum output (W8A8
and group W4A8 never read it, so dead-code elimination has removed it).
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
trace_plain = functools.partial(fwd_only, get_decomp_fn=dict)
# torch >= 2.12 passes its own decomposition table to trace_fn unless told otherwise.
# A pattern with no dtype-specific op (SwiGLU) is the same for every dtype: skip repeats.
_PARAMS = inspect.signature(register_replacement).parameters
_OPTIONS = {k: v for k, v in (("get_decomp_fn", dict), ("skip_duplicates", True)) if k in _PARAMS}


def build_pass(search, replace, example_inputs, scalar_workaround=None) -> PatternMatcherPass:
    """search/replace return (x_q, s_x, sum); registered for every dtype and for both output
    arities."""
    pm_pass = PatternMatcherPass()
    for dtype in DTYPES:
        for arity in (3, 2):
            register_replacement(_first(search, arity), _first(replace, arity),
                                 example_inputs(dtype), trace_plain, pm_pass,
                                 scalar_workaround=scalar_workaround or {}, **_OPTIONS)
    return pm_pass


def _first(fn, n: int):
    """fn with its outputs cut to the first n; keeps fn's signature (the matcher reads the
    argument names)."""
    @functools.wraps(fn)
    def cut(*args):
        return fn(*args)[:n]
    return cut
