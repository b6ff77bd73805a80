"""QServe-style compute-aware layout of 4-bit weights for sm80 INT8 tensor cores.

The GEMM runs ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`` with the
weight as operand B (K x N, ``.col``).  PTX ISA, section "Matrix Fragments for
mma.m16n8k32" (docs.nvidia.com/cuda/parallel-thread-execution/
#warp-level-matrix-fragment-mma-16832), multiplicand B, ``.s8``: each lane holds
two .b32 registers with elements b0..b7 (low to high byte), where
``groupID = laneid >> 2``, ``threadID_in_group = laneid % 4`` and
``row(k) = threadID_in_group*4 + (i & 3)`` for b0..b3 (reg0),
``threadID_in_group*4 + (i & 3) + 16`` for b4..b7 (reg1), ``col(n) = groupID``.

Buffers (N = out channels, K = in channels, Np = ceil(N/32)*32,
Kp = K rounded up to ``k_multiple``, G = Kp / group_size):

=============  ====================  =======  ===================================
buffer         shape                 dtype    order
=============  ====================  =======  ===================================
weights        [Np/32, Kp/32, 512]   uint8    32x32 (N x K) tiles, K tiles of one
                                              N tile contiguous; inside a tile
                                              lane L = 4c+f owns bytes 16L..16L+15
s2 (group)     [G, Np/32, 32]        uint8    [g, t, 4c+j] = s2 of n = 32t+c+8j
negzs (group)  [G, Np/32, 32]        uint8    same order, (-(z2*s2)) mod 256
=============  ====================  =======  ===================================

Why this order (lane L = 4c + f, c = groupID, f = threadID_in_group):

* One 32x32 tile feeds four n8 MMA tiles (n8-tile j = rows 8j..8j+7) for one
  k32 step.  Lane L needs, per n8-tile j, column n = 8j + c and
  k = 4f..4f+3 (reg0) and 16+4f..16+4f+3 (reg1): 4 x 8 = 32 nibbles = 16 bytes,
  so one 128-bit load (``ld.global.v4`` / ``cp.async`` 16 B) per lane and no
  shared-memory shuffle or ldmatrix is needed.
* Two nibbles of one byte share k and sit 16 rows apart (low = row c + 8a,
  high = row c + 8a + 16).  The 16 bytes are four little-endian words
  ``w = 2a + r`` (a = row pair, r = B register) with byte i <-> k = 16r + 4f + i.
  Hence ``word & 0x0F0F0F0F`` is the s8 B register r of n8-tile a and
  ``(word >> 4) & 0x0F0F0F0F`` that of n8-tile a + 2: unpacking is 2 LOP3s.
* The four bytes of a word have one n and one group, so the dequant
  ``w8 = q*s2 + negzs`` (subtraction after multiplication) is one 32-bit IMAD
  and one XOR for all four: with every ``(q - z2)*s2`` in [-128, 127]
  (:func:`check_group_codes`), ``q*s2 + 0x80808080 - z2*s2*0x01010101`` holds
  each ``w8 + 128`` in its own byte without carries (w4a8_sm80.cu,
  ``zero_word``).  s2/negzs are interleaved so that lane 4c+f reads one 32-bit
  word whose byte j serves n8-tile j (rows c+8j).

Padding is q = 0.  Padded channels get s2 = 0 and negzs = 0 (w8 = 0); padded
K entries of a real channel dequantize to -z2*s2, which is harmless because
the activations are zero-padded along K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TILE = 32  # N and K extent of one 512-byte tile: four n8 x one k32 MMA step


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_k_multiple(k_multiple: int) -> None:
    if k_multiple <= 0 or k_multiple % TILE:
        raise ValueError(f"k_multiple must be a positive multiple of 32, got {k_multiple}")


def _check_uint8(name: str, t: Tensor, max_value: int) -> None:
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must be torch.uint8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.numel() and int(t.max()) > max_value:
        raise ValueError(f"{name} values must be <= {max_value}, got max {int(t.max())}")


def _pad2d(t: Tensor, rows: int, cols: int, value: int = 0) -> Tensor:
    out = t.new_full((rows, cols), value)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def pack_w4(q: Tensor, k_multiple: int = 32) -> Tensor:
    """Pack 4-bit weights q [N, K] uint8 (0..15) into [ceil(N/32), Kp/32, 512] uint8."""
    _check_k_multiple(k_multiple)
    _check_uint8("q", q, 15)
    n, k = q.shape
    np_, kp = _ceil_to(n, TILE), _ceil_to(k, k_multiple)
    qp = _pad2d(q, np_, kp)  # [Np, Kp] uint8, zeros in the padding
    # n_tile = 16h + 8a + c (h: nibble, a: row pair), k_tile = 16r + 4f + i
    # (r: B register, f: threadID_in_group, i: byte in register).
    t = qp.view(np_ // TILE, 2, 2, 8, kp // TILE, 2, 4, 4)  # [Nt, h, a, c, Kt, r, f, i]
    # byte offset in tile = 16*(4c + f) + 4*(2a + r) + i -> order (c, f, a, r, i).
    t = t.permute(0, 4, 1, 3, 6, 2, 5, 7)  # [Nt, Kt, h, c, f, a, r, i]
    t = t.reshape(np_ // TILE, kp // TILE, 2, 512)  # [Nt, Kt, h, 512]
    return t[:, :, 0] | (t[:, :, 1] << 4)  # [Nt, Kt, 512] uint8


def unpack_w4(packed: Tensor, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_w4`: returns q [n, k] uint8 with the padding dropped."""
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[2] != 512:
        raise ValueError(f"packed must be uint8 [Nt, Kt, 512], got {packed.dtype} {tuple(packed.shape)}")
    nt, kt = packed.shape[:2]
    if nt != _ceil_to(n, TILE) // TILE or kt * TILE < k:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit n={n}, k={k}")
    t = torch.stack((packed & 0x0F, packed >> 4), dim=2)  # [Nt, Kt, h, 512]
    t = t.view(nt, kt, 2, 8, 4, 2, 2, 4)  # [Nt, Kt, h, c, f, a, r, i]
    t = t.permute(0, 2, 5, 3, 1, 6, 4, 7)  # [Nt, h, a, c, Kt, r, f, i]
    return t.reshape(nt * TILE, kt * TILE)[:n, :k].contiguous()


def _interleave_cols(t: Tensor) -> Tensor:
    """[Np, G] -> [G, Np/32, 32] with element [g, tt, 4c + j] = t[32tt + c + 8j, g]."""
    np_, g = t.shape
    x = t.t().reshape(g, np_ // TILE, 4, 8)  # [G, Nt, j, c]
    return x.transpose(2, 3).reshape(g, np_ // TILE, TILE).contiguous()


def _deinterleave_cols(p: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_interleave_cols`, dropping padded channels: -> [n, G]."""
    g, nt, _ = p.shape
    x = p.view(g, nt, 8, 4).transpose(2, 3)  # [G, Nt, j, c]
    return x.reshape(g, nt * TILE).t()[:n].contiguous()


def pack_group_params(s2: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """Pack level-2 group scale s2 [N, G] (1..16) and zero z2 [N, G] (0..15).

    Returns (s2_packed, negzs_packed), both uint8 [G, Np/32, 32]; the kernel
    computes ``w8 = q*s2 + negzs`` per byte mod 256, i.e. ``(q - z2) * s2``.
    """
    _check_uint8("s2", s2, 16)
    _check_uint8("z2", z2, 15)
    if s2.shape != z2.shape:
        raise ValueError(f"s2 {tuple(s2.shape)} and z2 {tuple(z2.shape)} shapes differ")
    if s2.numel() and int(s2.min()) < 1:
        raise ValueError("s2 values must be >= 1")
    negzs = ((-(z2.to(torch.int32) * s2.to(torch.int32))) & 0xFF).to(torch.uint8)
    np_ = _ceil_to(s2.shape[0], TILE)
    # Padded channels: s2 = 0, negzs = 0 -> w8 = 0 (weights there are 0 anyway).
    return _interleave_cols(_pad2d(s2, np_, s2.shape[1])), _interleave_cols(_pad2d(negzs, np_, s2.shape[1]))


def check_group_codes(q: Tensor, s2: Tensor, z2: Tensor, group_size: int) -> None:
    """Every dequantized level-1 weight ``(q - z2) * s2`` must fit int8 ([-128, 127]): the
    kernels compute it exactly for four weights per 32-bit operation, which relies on it
    (progressive quantization guarantees |.| <= 119 + s2/2 <= 127; arbitrary codes need not).
    q [N, K] codes, s2 / z2 [N, ceil(K / group_size)]."""
    k = q.shape[1]
    s2f = s2.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :k]
    w8 = (q.to(torch.int32) - z2.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :k]) * s2f
    if w8.numel() and (int(w8.min()) < -128 or int(w8.max()) > 127):
        bad = ((w8 < -128) | (w8 > 127)).nonzero()[0].tolist()
        raise ValueError(
            f"group codes dequantize outside int8: (q - z2) * s2 = {int(w8[bad[0], bad[1]])} at "
            f"[n={bad[0]}, k={bad[1]}]; level-2 codes must keep (q - z2) * s2 in [-128, 127] "
            "(quantize with compiler.quantize.quantize_w4_group, whose protective range "
            "guarantees it)")


def unpack_group_params(s2_packed: Tensor, negzs_packed: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_group_params`: returns (s2 [n, G], z2 [n, G]) uint8."""
    s2 = _deinterleave_cols(s2_packed, n).to(torch.int32)
    if s2.numel() and int(s2.min()) < 1:
        raise ValueError("s2_packed holds s2 = 0 for a real channel")
    # z2*s2 <= 15*16 = 240 < 256, so the mod-256 negation is exactly invertible.
    zs = (-_deinterleave_cols(negzs_packed, n).to(torch.int32)) & 0xFF
    return s2.to(torch.uint8), torch.div(zs, s2, rounding_mode="floor").to(torch.uint8)


@dataclass(frozen=True)
class W4Layout:
    """Named 4-bit weight format: tile order above, K padded to ``k_multiple``."""

    name: str
    k_multiple: int = TILE

    def __post_init__(self) -> None:
        _check_k_multiple(self.k_multiple)

    def padded_shape(self, n: int, k: int) -> tuple[int, int]:
        return _ceil_to(n, TILE), _ceil_to(k, self.k_multiple)

    def pack(self, q: Tensor) -> Tensor:
        return pack_w4(q, self.k_multiple)

    def unpack(self, packed: Tensor, n: int, k: int) -> Tensor:
        return unpack_w4(packed, n, k)

    @staticmethod
    def packed_k(packed: Tensor) -> int:
        """Kp of a packed [Np/32, Kp/32, 512] weight."""
        return packed.shape[1] * TILE


W4A8_PER_CHANNEL = W4Layout(name="w4a8_pc_sm80", k_multiple=TILE)


def w4a8_group_layout(group_size: int) -> W4Layout:
    """Group-quantized format: K padded to whole groups so a tile never straddles two."""
    return W4Layout(name=f"w4a8_g{group_size}_sm80", k_multiple=group_size)
