"""Fuse per-token INT8 quantization into the RMSNorm that produces its input.

Matches: `quant_a8(w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype))` with x32 = x.to(float32)
(the HF / canonical RMSNorm), where the norm output has no other user.
Emits: the same RMSNorm followed by `quant_a8_ref` as ATen ops (absmax, scale, round, clamp,
int8 cast, per-token sum), which TorchInductor emits as one kernel.
"""
from __future__ import annotations

import functools

import torch

from qcompile.runtime.ops.quant import quant_a8_ref

from .base import Lowering
from .fusion import build_pass


def _rms(x, w, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _search(x, w, eps):
    return torch.ops.qcompile.quant_a8.default(_rms(x, w, eps))


def _replace(x, w, eps):
    return quant_a8_ref(_rms(x, w, eps))


@functools.cache
def _pass():
    return build_pass(_search, _replace,
                      lambda dt: [torch.empty(4, 8, dtype=dt), torch.empty(8, dtype=dt)],
                      scalar_workaround={"eps": 1e-5})


def fuse_rmsnorm_quant(lowering: Lowering) -> int:
    return _pass().apply(lowering.gm.graph)
