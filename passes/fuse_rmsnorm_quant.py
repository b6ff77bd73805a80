"""Fuse per-token activation quantization into the RMSNorm that produces its input.

Matches: `quant(w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype))` with x32 = x.to(float32)
(the HF / canonical RMSNorm), where the norm output has no other user, and `quant` is the
opaque op of an activation quantizer of the scheme rows (`qcompile::quant_a8`, ...).
Emits: the same RMSNorm followed by the quantizer's reference as ATen ops (absmax, scale,
round, clamp, cast, per-token sum), which TorchInductor emits as one kernel.
"""
from __future__ import annotations

import functools

import torch

from qcompile.compiler.schemes import ActQuant

from .base import Lowering
from .fusion import apply_per_quantizer, arities, build_pass


def _rms(x, w, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@functools.cache
def _pass(act: ActQuant):
    def search(x, w, eps):
        return act.op(_rms(x, w, eps))

    def replace(x, w, eps):
        return act.reference(_rms(x, w, eps))

    return build_pass(search, replace,
                      lambda dt: [torch.empty(4, 8, dtype=dt), torch.empty(8, dtype=dt)],
                      scalar_workaround={"eps": 1e-5}, arities=arities(act))


def fuse_rmsnorm_quant(lowering: Lowering) -> int:
    return apply_per_quantizer(lowering.gm.graph, _pass)
