"""Round-to-nearest weight quantization, exactly as DESIGN.md's Numerics.

Each function takes a float weight [N, K] and returns codes and scales in the logical
(unpacked) order; packing into a kernel layout is the layout module's job. Which quantizer and
container a scheme uses is its row in compiler/schemes.py.
QoQ (rotation, smoothing, clipping) changes the weights before these run; the rounding
contract stays the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .schemes import QuantScheme

PROTECTIVE_RANGE = 119  # level-1 INT8 range of progressive group quantization
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448, the largest finite e4m3 value


@dataclass
class W8Weights:
    q: torch.Tensor      # [N, K] int8 in [-127, 127]
    scale: torch.Tensor  # [N] float32

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


@dataclass
class W4Weights:
    q: torch.Tensor      # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N] float32, s_w
    zero: torch.Tensor   # [N] float32, integer-valued zero point z

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() - self.zero[:, None]) * self.scale[:, None]


@dataclass
class W4GroupWeights:
    q: torch.Tensor      # [N, K] uint8 in [0, 15]
    s1: torch.Tensor     # [N] float32, level-1 per-channel scale (w ~ s1 * w8)
    s2: torch.Tensor     # [N, K/g] uint8 in [1, 16], level-2 integer scale
    z2: torch.Tensor     # [N, K/g] uint8 in [0, 15], level-2 integer zero
    group_size: int

    def dequantize(self) -> torch.Tensor:
        s2, z2 = (_per_column(t, self) for t in (self.s2, self.z2))
        return (self.q.float() - z2) * s2 * self.s1[:, None]


@dataclass
class W4FloatGroupWeights:
    """W4A16 (weight-only): w ~ (q - z) * s per group of g input channels."""
    q: torch.Tensor      # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N, K/g] float16 (the stored scale; codes are rounded against it)
    zero: torch.Tensor   # [N, K/g] uint8 in [0, 15], integer zero point
    group_size: int

    def dequantize(self) -> torch.Tensor:
        s, z = (_per_column(t, self) for t in (self.scale, self.zero))
        return (self.q.float() - z) * s


@dataclass
class FP8Weights:
    """FP8 baseline: w ~ q * s, e4m3 codes with one float32 scale per output channel."""
    q: torch.Tensor      # [N, K] float8_e4m3fn in [-448, 448]
    scale: torch.Tensor  # [N] float32, max|w_row| / 448

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def _per_column(t: torch.Tensor, qw) -> torch.Tensor:
    """[N, K/g] per-group values -> [N, K] float32 (column k takes group k // g)."""
    return t.float().repeat_interleave(qw.group_size, dim=1)[:, :qw.q.shape[1]]


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize_w8(w: torch.Tensor) -> W8Weights:
    w = w.float()
    s = _safe(w.abs().amax(dim=1) / 127)
    q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
    return W8Weights(q, s)


def quantize_w4_per_channel(w: torch.Tensor) -> W4Weights:
    w = w.float()
    lo = w.amin(dim=1).clamp(max=0)  # keep 0 representable
    hi = w.amax(dim=1).clamp(min=0)
    s = _safe((hi - lo) / 15)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15).to(torch.uint8)
    return W4Weights(q, s, z)


def quantize_w4_group(w: torch.Tensor, group_size: int) -> W4GroupWeights:
    """Progressive: symmetric INT8 per channel in [-119, 119], then UINT4 per group with an
    integer scale and zero, so `(q - z2) * s2` always fits in int8 (|.| <= 119 + s2/2)."""
    w = w.float()
    n, k = w.shape
    if k % group_size:
        w = torch.nn.functional.pad(w, (0, group_size - k % group_size))
    s1 = _safe(w.abs().amax(dim=1) / PROTECTIVE_RANGE)
    w8 = torch.clamp(torch.round(w / s1[:, None]), -PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    g = w8.view(n, -1, group_size)
    lo = g.amin(dim=2).clamp(max=0)
    hi = g.amax(dim=2).clamp(min=0)
    s2 = torch.clamp(torch.round((hi - lo) / 15), min=1)  # <= 16 since hi - lo <= 238
    z2 = torch.clamp(torch.round(-lo / s2), 0, 15)
    q = torch.clamp(torch.round(g / s2[..., None]) + z2[..., None], 0, 15)
    q = q.view(n, -1)[:, :k].to(torch.uint8)
    return W4GroupWeights(q, s1, s2.to(torch.uint8), z2.to(torch.uint8), group_size)


def fp16_scale(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """W4A16 group scale (hi - lo) / 15 rounded to float16, as stored, returned as float32
    (clipping's search reuses it, so its fake quantization is bitwise the quantizer's)."""
    s = ((hi - lo) / 15).clamp(max=torch.finfo(torch.float16).max).half().float()
    return _safe(s)


def quantize_w4_group_fp(w: torch.Tensor, group_size: int) -> W4FloatGroupWeights:
    """Weight-only W4 (AWQ/GPTQ checkpoint format): asymmetric UINT4 per group of g input
    channels with a float16 scale and an integer zero, over the zero-including range as
    `quantize_w4_per_channel`. No INT8 constraint (activations stay float), so no level 1."""
    w = w.float()
    n, k = w.shape
    if k % group_size:
        w = torch.nn.functional.pad(w, (0, group_size - k % group_size))
    g = w.view(n, -1, group_size)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    s = fp16_scale(lo, hi)
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(g / s[..., None]) + z[..., None], 0, 15)
    q = q.view(n, -1)[:, :k].to(torch.uint8)
    return W4FloatGroupWeights(q, s.half(), z.to(torch.uint8), group_size)


def quantize_fp8(w: torch.Tensor) -> FP8Weights:
    """e4m3 per output channel: s = max|w_row| / 448, q = e4m3(w / s) (round to nearest even,
    clamped so that no value rounds past the largest finite code)."""
    w = w.float()
    s = _safe(w.abs().amax(dim=1) / E4M3_MAX)
    q = torch.clamp(w / s[:, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Weights(q, s)


def dequantize(qw) -> torch.Tensor:
    """Float weight [N, K] the quantized weights stand for (for tests and fake quant)."""
    return qw.dequantize()


def quantize_weight(w: torch.Tensor, scheme: QuantScheme):
    """The scheme's round-to-nearest quantizer (its row in compiler/schemes.py)."""
    from .schemes import spec_of
    return spec_of(scheme).quantize(w)
