"""Quantized GEMM ops: y[..., n] = dequant(x_q . w_q) in the activation dtype.
The weight-only W4A16 op takes x itself: y = x . dequant(w_q).

Weights arrive packed in their kernel layout (`cutlass_templates/`); the references unpack
them, so a CPU run checks the artifact's bytes, layout included. K is zero-padded to the
layout's multiple (SmolLM2: K = 576 -> 640 for g128), N is padded to 32 and sliced off.
Which op and reference a scheme uses is its row in compiler/schemes.py.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from qcompile.cutlass_templates.w4a8_layout import unpack_group_params, unpack_w4
from qcompile.cutlass_templates.w4a16_layout import dequantize_packed
from qcompile.runtime.ops.quant import unpack_a4x


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8 -> int32: a [M, K], b [N, K] -> [M, N]."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t())
    # float64 holds every partial sum exactly (|sum| <= K * 127^2 << 2^53); no TF32 risk.
    return (a.double() @ b.double().t()).to(torch.int32)


_DECODED: dict[int, tuple] = {}  # id(packed) -> (weakref, version, decoded)


def _decoded(w: torch.Tensor, decode, *params) -> torch.Tensor:
    """decode(w, *params), memoized per packed weight tensor (dropped with it, invalidated
    when it is written in place): the CPU reference path would otherwise unpack every weight
    on every decode step. The result is identical to decoding each time."""
    hit = _DECODED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    value = decode(w, *params)
    _DECODED[id(w)] = (weakref.ref(w), w._version, value)
    weakref.finalize(w, _DECODED.pop, id(w), None)
    return value


def _w4_codes(w: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_w4(w, n, w.shape[1] * 32).to(torch.int8)


def _w8_from_groups(w, s2, negzs, n: int, group_size: int) -> torch.Tensor:
    """Per byte, as the kernel does it: w8 = (q * s2 + negzs) mod 256 read as int8."""
    q = unpack_w4(w, n, w.shape[1] * 32).to(torch.int32)
    s2u, z2u = unpack_group_params(s2, negzs, n)
    nz = (-(z2u.to(torch.int32) * s2u.to(torch.int32))) & 0xFF
    s2f = s2u.to(torch.int32).repeat_interleave(group_size, dim=1)
    return ((q * s2f + nz.repeat_interleave(group_size, dim=1)) & 0xFF).to(torch.uint8).view(
        torch.int8)


def _flat(xq: torch.Tensor, kp: int) -> torch.Tensor:
    xq = xq.reshape(-1, xq.shape[-1])
    return F.pad(xq, (0, kp - xq.shape[-1])) if kp > xq.shape[-1] else xq


def _finish(y: torch.Tensor, bias, lead, n: int, dtype: torch.dtype) -> torch.Tensor:
    y = y[:, :n]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype).reshape(*lead, n)


def gemm_w8a8_ref(xq, sx, w, sw, bias, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """w [Np, Kp] int8 row-major, sw [Np] f32: y = s_x s_w (x_q . w_q)."""
    acc = int_matmul(_flat(xq, w.shape[1]), w)
    y = acc.float() * sx.reshape(-1, 1) * sw[None, :]
    return _finish(y, bias, xq.shape[:-1], n, out_dtype)


def gemm_w4a8_ref(xq, sx, xsum, w, s, zs, bias, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-channel W4A8. w [Np/32, Kp/32, 512] uint8 (w4a8_pc_sm80), s = s_w [Np] f32,
    zs = z * s_w [Np] f32. Main loop on the unsigned codes 0..15; epilogue
    y = s_x s_w acc - (z s_w)(s_x sum_k x_q)."""
    kp = w.shape[1] * 32
    acc = int_matmul(_flat(xq, kp), _decoded(w, _w4_codes, n)).float()
    sxf = sx.reshape(-1, 1)
    y = sxf * s[None, :n] * acc - zs[None, :n] * (sxf * xsum.reshape(-1, 1).float())
    return _finish(y, bias, xq.shape[:-1], n, out_dtype)


def gemm_w4a8_group_ref(xq, sx, w, s1, s2, negzs, bias, n: int, group_size: int,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """Progressive group W4A8. w [Np/32, Kp/32, 512] uint8 (w4a8_g{g}_sm80); s2, negzs
    [Kp/g, Np/32, 32] uint8. Main loop on w8 = q * s2 + negzs per byte (subtraction after
    multiplication); epilogue y = s_x s1 acc."""
    w8 = _decoded(w, _w8_from_groups, s2, negzs, n, group_size)
    acc = int_matmul(_flat(xq, w.shape[1] * 32), w8).float()
    y = sx.reshape(-1, 1) * s1[None, :n] * acc
    return _finish(y, bias, xq.shape[:-1], n, out_dtype)


def gemm_w4a16_ref(x, w, s, z, bias, n: int, group_size: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only W4 (no kernel: this runs on every device). w [Np, Kp/2] uint8, s [Np, Kp/g]
    float16, z [Np, Kp/g] uint8 (w4a16_g{g}_rm). The weight (q - z) * s is rounded to the
    activation dtype, as a dequantizing kernel feeding fp16 tensor cores does; the product
    accumulates in float32."""
    wf = _decoded(w, dequantize_packed, s, z, group_size).to(x.dtype)
    y = _flat(x, w.shape[1] * 2).float() @ wf.float().t()
    return _finish(y, bias, x.shape[:-1], n, out_dtype)


# The ops. Their default implementation is the reference, on any device; runtime/gemm_kernels.py
# registers the CUDA kernels for CUDA tensors.
@torch.library.custom_op("qcompile::gemm_w8a8", mutates_args=())
def gemm_w8a8(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_w8a8_ref(xq, sx, w, sw, bias, n, out_dtype)


@torch.library.custom_op("qcompile::gemm_w4a8", mutates_args=())
def gemm_w4a8(xq: torch.Tensor, sx: torch.Tensor, xsum: torch.Tensor, w: torch.Tensor,
              s: torch.Tensor, zs: torch.Tensor, bias: torch.Tensor | None, n: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_w4a8_ref(xq, sx, xsum, w, s, zs, bias, n, out_dtype)


@torch.library.custom_op("qcompile::gemm_w4a8_group", mutates_args=())
def gemm_w4a8_group(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, s1: torch.Tensor,
                    s2: torch.Tensor, negzs: torch.Tensor, bias: torch.Tensor | None, n: int,
                    group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_w4a8_group_ref(xq, sx, w, s1, s2, negzs, bias, n, group_size, out_dtype)


@torch.library.custom_op("qcompile::gemm_w4a16", mutates_args=())
def gemm_w4a16(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
               bias: torch.Tensor | None, n: int, group_size: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_w4a16_ref(x, w, s, z, bias, n, group_size, out_dtype)


def fma32_work(shape, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fma32's scratch buffers for results of `shape`: two float64, one bool."""
    return (torch.empty(shape, dtype=torch.float64, device=device),
            torch.empty(shape, dtype=torch.float64, device=device),
            torch.empty(shape, dtype=torch.bool, device=device))


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None,
          work: tuple[torch.Tensor, ...] | None = None, dense: bool = False) -> torch.Tensor:
    """a * b + c in float32 with one rounding, as CUDA's __fmaf_rn (IEEE fused multiply-add),
    for float32 a, c and b holding integers below 2^24 in magnitude (any dtype; broadcast),
    results in float32's normal range. The product is exact in float64 (24 + 24 bits); the
    float64 sum s rounded to float32 is the fused result except where s is a float32
    midpoint (its 29 bits below float32's last one are 100..0) and not exact: rounding twice
    then ties to even where the exact sum lies past the midpoint on one side. Those elements
    (a few a block: exact sums that are midpoints are not rare) get the neighbour on the side
    of the sum's error (TwoSum, exact). No CPU op of
    torch fuses the two; this is exact on any device.

    out: the float32 result's buffer (c itself is fine); work: `fma32_work`'s buffers, reused
    across calls (gemm_w4a4x_ref's blocks): on the CPU a fresh large tensor costs its page
    faults, ~20x a pass over it. On the CPU the midpoints are gathered (nonzero); elsewhere,
    or with `dense`, every element takes the correction, with no data-dependent shape, so
    the reference stays capturable in a CUDA graph."""
    shape = torch.broadcast_shapes(a.shape, b.shape, c.shape)
    if work is None:
        work = fma32_work(shape, c.device)
    s, p64, tie = work
    p64.copy_(b.expand(shape))
    s.copy_(c.expand(shape))
    s.addcmul_(a.double(), p64)  # c + a b, the product exact: one rounding, to 53 bits
    if dense or s.device.type != "cpu":  # no data-dependent shapes (CUDA graphs): every element
        pd = p64.mul_(a.double())
        bb = s - pd
        err = (pd - (s - bb)) + (c.double() - bb)
        bits = s.view(torch.int64)
        mid = (bits & 0x1FFFFFFF) == 0x10000000
        step = ((err > 0) == (s > 0)).to(torch.int64) * 2 - 1
        s = (bits + step * (mid & (err != 0))).view(torch.float64)
        return s.float() if out is None else out.copy_(s)
    bits = p64.view(torch.int64)  # (p64 is free again)
    torch.bitwise_and(s.view(torch.int64), 0x1FFFFFFF, out=bits)
    torch.eq(bits, 0x10000000, out=tie)
    flat = tie.view(-1).nonzero().squeeze(1)
    if flat.numel():
        idx = torch.unravel_index(flat, shape)
        pt = a.expand(shape)[idx].double() * b.expand(shape)[idx].double()
        ct, st = c.expand(shape)[idx].double(), s[idx]
        bb = st - pt
        err = (pt - (st - bb)) + (ct - bb)  # pt + ct - st, exactly
        # one float64 step towards the exact sum (the bit pattern is sign and magnitude):
        # then the float32 rounding is no longer a tie and goes the exact sum's way
        step = torch.where(err == 0, 0, ((err > 0) == (st > 0)).to(torch.int64) * 2 - 1)
        s[idx] = (st.view(torch.int64) + step).view(torch.float64)
    if out is None:
        return s.float()
    return out.copy_(s)


def gemm_w4a4x_ref(xq, sx, xt, w, s, zs, bias, n: int, n8: int, block: int, packed: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """COMET's W4Ax GEMM, the integer maths its kernels will do (issue 15): x_q [..., K] int8
    codes of mixed 4/8-bit blocks (the first n8 8-bit) with s_x [..., K / block] and the
    dequantized row sum t [..., 1] (`quant_a4x`); the weights are per-channel W4A8's (QServe's
    asymmetric UINT4, w = s (q - z), the same packed buffers: QoQ's rounding serves both).
    Each block's partial sum p_b is exact in int32 (|p_b| <= block * 127 * 15) and scaled by
    its activation scale in the main loop with one rounding, y = fma(s_x[b], p_b, y) for b =
    0, 1, .. (`fma32`; the kernels' FFMA: one instruction an accumulator, where a multiply and
    an add were two); the epilogue is W4A8's with t for s_x sum x_q:
    y = s_w sum_b s_x[b] (x_q[b] . q[b]) - (z s_w) t. n8 picks the kernels' MMA per block (s4
    or s8); here every block is the same int8 product. packed: x_q as `pack_a4x` packs it (sm80
    artifacts, whose kernel runs the 4-bit blocks on s4 MMAs), unpacked here first."""
    if packed:
        xq = unpack_a4x(xq, n8, block)
    lead, k = xq.shape[:-1], xq.shape[-1]
    if k % block or not 0 <= n8 <= k // block:
        raise ValueError(f"gemm_w4a4x: K = {k} must be a multiple of the block ({block}) and "
                         f"n8 = {n8} within its {k // block} blocks")
    x2, s2 = xq.reshape(-1, k), sx.reshape(-1, k // block).float()
    codes = _decoded(w, _w4_codes, n)
    y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=xq.device)
    work = fma32_work(y.shape, y.device)
    for b in range(k // block):
        part = int_matmul(x2[:, b * block:(b + 1) * block].contiguous(),
                          codes[:, b * block:(b + 1) * block].contiguous())
        fma32(s2[:, b:b + 1], part, y, out=y, work=work)
    y = y * s[None, :n] - zs[None, :n] * xt.reshape(-1, 1).float()
    return _finish(y, bias, lead, n, out_dtype)


@torch.library.custom_op("qcompile::gemm_w4a4x", mutates_args=())
def gemm_w4a4x(xq: torch.Tensor, sx: torch.Tensor, xt: torch.Tensor, w: torch.Tensor,
               s: torch.Tensor, zs: torch.Tensor, bias: torch.Tensor | None, n: int, n8: int,
               block: int, packed: int, out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_w4a4x_ref(xq, sx, xt, w, s, zs, bias, n, n8, block, packed, out_dtype)


def _fake_out(xq, n, out_dtype):
    return xq.new_empty(xq.shape[:-1] + (n,), dtype=out_dtype)


gemm_w8a8.register_fake(lambda xq, sx, w, sw, bias, n, out_dtype: _fake_out(xq, n, out_dtype))
gemm_w4a8.register_fake(
    lambda xq, sx, xsum, w, s, zs, bias, n, out_dtype: _fake_out(xq, n, out_dtype))
gemm_w4a8_group.register_fake(
    lambda xq, sx, w, s1, s2, negzs, bias, n, group_size, out_dtype: _fake_out(xq, n, out_dtype))
gemm_w4a16.register_fake(
    lambda x, w, s, z, bias, n, group_size, out_dtype: _fake_out(x, n, out_dtype))
gemm_w4a4x.register_fake(
    lambda xq, sx, xt, w, s, zs, bias, n, n8, block, packed, out_dtype:
    xq.new_empty(sx.shape[:-1] + (n,), dtype=out_dtype))
