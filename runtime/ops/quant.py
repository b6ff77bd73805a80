"""Per-token activation quantization: INT8 (A8), with the per-token sum of the codes that the
per-channel W4A8 epilogue needs for its zero-point correction, FP8 e4m3 (the FP8 baseline's
activations), and COMET's mixed 4/8-bit blocks (A4x, issue 15: the W4A4 GEMM's input).

The references are plain ATen: the fusion passes inline them after RMSNorm and SiLU*Mul so
that TorchInductor emits producer + quantization as one kernel. Elsewhere they stay the opaque
ops `qcompile::quant_a8` / `qcompile::quant_fp8`.
"""
from __future__ import annotations

import torch


# _nonzero: `s + (s == 0)` sets a zero scale to 1 and leaves the others bitwise unchanged.
# Not `torch.where(s > 0, s, 1.0)`: torch.export records that 1.0 as a CPU scalar tensor, and
# on CUDA each call then copies it from the host, a synchronisation that breaks CUDA-graph
# capture (found by tests/runtime/test_cuda_graphs_gpu.py on an H100).


def quant_a8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (x_q [..., K] int8, s_x [..., 1] float32, sum_k x_q [..., 1] int32)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    s = s + (s == 0)  # an all-zero row quantizes to zeros; see _nonzero
    xq = torch.clamp(torch.round(xf / s), -127, 127).to(torch.int8)
    return xq, s, xq.sum(dim=-1, keepdim=True, dtype=torch.int32)


@torch.library.custom_op("qcompile::quant_a8", mutates_args=())
def quant_a8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quant_a8_ref(x)


@quant_a8.register_fake
def _(x):
    col = x.shape[:-1] + (1,)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(col, dtype=torch.float32),
            x.new_empty(col, dtype=torch.int32))


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (x_q [..., K] float8_e4m3fn, s_x [..., 1] float32): s_x =
    max|x_row| * (1 / 448), x_q = e4m3(x / s_x) rounded to nearest even (clamped first, so a row's
    largest value maps to 448 on every device, saturating or not)."""
    xf = x.float()
    # times the reciprocal, not divided: CUDA divides a tensor by a Python scalar as a multiply
    # by its reciprocal, so the CPU does the same for bitwise equal scales on both
    s = xf.abs().amax(dim=-1, keepdim=True) * (1.0 / E4M3_MAX)
    s = s + (s == 0)  # an all-zero row quantizes to zeros; see _nonzero
    xq = torch.clamp(xf / s, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, s


@torch.library.custom_op("qcompile::quant_fp8", mutates_args=())
def quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_fp8_ref(x)


@quant_fp8.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32))


FMPQ_BLOCK = 128  # channels per activation block (COMET's FMPQ)


def a4x_width(k: int, n8: int, block: int = FMPQ_BLOCK) -> int:
    """Bytes per token of packed A4x codes (`pack_a4x`): the n8 8-bit blocks whole, the others
    at two codes a byte."""
    return (k + n8 * block) // 2


def a4x_channels(width: int, n8: int, block: int = FMPQ_BLOCK) -> int:
    """K of packed A4x codes `width` bytes a token wide (a4x_width's inverse)."""
    return 2 * width - n8 * block


def pack_a4x(xq: torch.Tensor, n8: int, block: int = FMPQ_BLOCK) -> torch.Tensor:
    """A4x codes [..., K] int8 -> [..., a4x_width] int8 bytes, the sm80 W4Ax kernel's input:
    the leading n8 (8-bit) blocks as they are, then each 4-bit block at two codes a byte, in
    groups of 32 channels: byte b (0..15) of a group holds channel b in its low nibble and
    channel b + 16 in its high one. That pairing is what lets the weights keep W4A8's layout:
    a lane of an s4 m16n8k64 MMA then finds in its two W4A8 registers of a 32-channel tile
    exactly the 16 channels its activation bytes hold (w4a8_sm80.cu, QC_A4X == 2), so one
    layout serves the sm80 s4 path, the sm80 s8 path and the sm90 kernels. Plain ATen (the
    fusion passes inline it into the quantizer's kernel)."""
    k = xq.shape[-1]
    if k % block or block % 32 or not 0 <= n8 <= k // block:
        raise ValueError(f"pack_a4x: K = {k} must be a multiple of the block ({block}, itself a "
                         f"multiple of 32) and n8 = {n8} within its {k // block} blocks")
    head, tail = xq[..., :n8 * block], xq[..., n8 * block:]
    g = tail.reshape(*tail.shape[:-1], -1, 2, 16).to(torch.int16)
    pairs = (g[..., 0, :] & 0xF) | ((g[..., 1, :] & 0xF) << 4)
    pairs = torch.where(pairs > 127, pairs - 256, pairs).to(torch.int8)
    return torch.cat([head, pairs.reshape(*tail.shape[:-1], -1)], dim=-1)


def unpack_a4x(xp: torch.Tensor, n8: int, block: int = FMPQ_BLOCK) -> torch.Tensor:
    """`pack_a4x`'s inverse: [..., a4x_width] bytes -> the codes [..., K] int8."""
    k = a4x_channels(xp.shape[-1], n8, block)
    if k < n8 * block or k % block:
        raise ValueError(f"unpack_a4x: {xp.shape[-1]} bytes a token are not packed A4x codes "
                         f"with n8 = {n8} blocks of {block}")
    head, tail = xp[..., :n8 * block], xp[..., n8 * block:]
    v = tail.reshape(*tail.shape[:-1], -1, 16).to(torch.int16) & 0xFF
    lo, hi = ((v & 0xF) ^ 8) - 8, ((v >> 4) ^ 8) - 8  # sign-extended nibbles
    codes = torch.stack([lo, hi], dim=-2).to(torch.int8)
    return torch.cat([head, codes.reshape(*tail.shape[:-1], -1)], dim=-1)


def quant_a4x_ref(x: torch.Tensor, n8: int, block: int = FMPQ_BLOCK, clip: int = 1000,
                  packed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COMET's FMPQ activations: x [..., K] float (K a multiple of `block`) -> (x_q [..., K]
    int8, s_x [..., K / block] float32, t [..., 1] float32), symmetric per token and block of
    `block` channels; the first `n8` blocks 8-bit (codes in [-127, 127]), the others 4-bit
    ([-7, 7]). The compiler permutes each linear's input channels so that its outlier channels
    fill the leading blocks (and folds the permutation into the producers), so "which blocks
    are 8-bit" is one count. t = sum_b s_x[b] * sum_{k in b} x_q[k], the dequantized row sum:
    the W4Ax GEMM's zero-point correction (QServe's asymmetric UINT4 weights, w = s (q - z),
    so x . w = s sum_b s_x[b] (x_q[b] . q[b]) - s z t), as A8's per-token code sum is W4A8's.
    clip (per mille, 1000: none): the 4-bit blocks' scale is clip / 1000 of max |x| / 7, so the
    few values above it saturate and the rest get finer steps (the compiler searches it per
    linear on calibration rows: compiler/fmpq.py `choose_clips`); 8-bit blocks never clip.
    packed (1 in sm80 artifacts): x_q as `pack_a4x` packs it, [..., a4x_width] bytes."""
    k = x.shape[-1]
    if k % block or not 0 <= n8 <= k // block:
        raise ValueError(f"quant_a4x: K = {k} must be a multiple of the block ({block}) and "
                         f"n8 = {n8} within its {k // block} blocks")
    if not 0 < clip <= 1000:
        raise ValueError(f"quant_a4x: clip = {clip} per mille must be in (0, 1000]")
    xb = x.float().reshape(*x.shape[:-1], k // block, block)
    levels = torch.arange(k // block, device=x.device) < n8
    qmax = (levels * 120.0 + 7.0)[:, None]  # 127 for the leading n8 blocks, else 7
    amax = xb.abs().amax(dim=-1, keepdim=True)
    if clip != 1000:  # (no multiply at 1000: the same scales as before the option, bitwise)
        amax = amax * torch.where(levels, 1.0, clip / 1000.0)[:, None]
    s = amax / qmax
    s = s + (s == 0)  # an all-zero block quantizes to zeros; see _nonzero
    xq = torch.clamp(torch.round(xb / s), -qmax, qmax).to(torch.int8)
    t = (xq.sum(dim=-1, keepdim=True, dtype=torch.int32).float() * s).sum(dim=-2)
    xq = xq.reshape(x.shape)
    return pack_a4x(xq, n8, block) if packed else xq, s.squeeze(-1), t


@torch.library.custom_op("qcompile::quant_a4x", mutates_args=())
def quant_a4x(x: torch.Tensor, n8: int, block: int, clip: int = 1000, packed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quant_a4x_ref(x, n8, block, clip, packed)


@quant_a4x.register_fake
def _(x, n8, block, clip=1000, packed=0):
    k = x.shape[-1]
    return (x.new_empty(x.shape[:-1] + (a4x_width(k, n8, block) if packed else k,),
                        dtype=torch.int8),
            x.new_empty(x.shape[:-1] + (x.shape[-1] // block,), dtype=torch.float32),
            x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32))
