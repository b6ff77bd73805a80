"""Row-major weight-only W4A16 layout (the AWQ/GPTQ-style accuracy baseline).

There is no qcompile kernel for W4A16: `qcompile::gemm_w4a16` runs its PyTorch reference on
every device (dequantize to the activation dtype, then a float GEMM). The layout is therefore
the simplest one that is still 4 bits a weight: no permutation for any MMA fragment. A real
kernel (Marlin, tinygemm, AWQ's GEMV) would read another named format.

Buffers (N = out channels, K = in channels, g = group size, Np = N rounded up to 32,
Kp = K rounded up to g, G = Kp / g):

=======  ============  =======  ======================================================
buffer   shape         dtype    order
=======  ============  =======  ======================================================
weights  [Np, Kp/2]    uint8    row-major, K contiguous; byte [n, j] holds k = 2j in the
                                low nibble and k = 2j + 1 in the high nibble
scales   [Np, G]       float16  row-major, scale s of (n, group)
zeros    [Np, G]       uint8    row-major, integer zero point z in [0, 15]
=======  ============  =======  ======================================================

w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]. Scales are float16 as in AWQ/GPTQ
checkpoints (half the bytes of float32; rounding the scale costs ~2^-12 relative, far below
the 4-bit step of ~1/15 of the range), zeros integers so that 0.0 is exact.

Padding is q = 0; padded channels get s = 0 and z = 0 (w = 0). Padded K entries of a real
channel dequantize to -z * s, which is harmless because the activations are zero-padded
along K (as for the W4A8 layouts). N is padded to 32 like every other GEMM format, K to the
group size so that every group is whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class W4A16Layout:
    """Named row-major W4 format with float16 group scales and uint8 group zeros."""

    name: str
    group_size: int
    n_multiple: int = 32

    def __post_init__(self):
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number (two codes a byte), "
                             f"got {self.group_size}")

    @property
    def k_multiple(self) -> int:
        return self.group_size

    def padded_shape(self, n: int, k: int) -> tuple[int, int]:
        return _ceil_to(n, self.n_multiple), _ceil_to(k, self.group_size)

    def pack(self, q: Tensor) -> Tensor:
        """q [N, K] uint8 codes in [0, 15] -> [Np, Kp/2] uint8, zeros in the padding."""
        if q.dtype != torch.uint8 or q.dim() != 2:
            raise ValueError(f"q must be 2-D torch.uint8, got {q.dtype} {tuple(q.shape)}")
        if q.numel() and int(q.max()) > 15:
            raise ValueError("q holds values above 15: not 4-bit codes")
        full = q.new_zeros(self.padded_shape(*q.shape))  # [Np, Kp] uint8
        full[: q.shape[0], : q.shape[1]] = q
        return full[:, 0::2] | (full[:, 1::2] << 4)

    def unpack(self, packed: Tensor, n: int, k: int) -> Tensor:
        """[Np, Kp/2] uint8 -> [n, k] uint8 codes (the padding dropped)."""
        np_, kp = self.padded_shape(n, k)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (np_, kp // 2):
            raise ValueError(f"packed must be uint8 {(np_, kp // 2)}, got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        return unpack_codes(packed)[:n, :k].contiguous()

    def pack_params(self, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        """scale, zero [N, ceil(K/g)] -> float16 and uint8 [Np, G], zeros in padded rows."""
        if scale.shape != zero.shape or scale.dim() != 2:
            raise ValueError(f"scale and zero must be equal 2-D shapes, got "
                             f"{tuple(scale.shape)} and {tuple(zero.shape)}")
        np_ = _ceil_to(scale.shape[0], self.n_multiple)
        s = scale.new_zeros((np_, scale.shape[1]), dtype=torch.float16)
        z = zero.new_zeros((np_, zero.shape[1]), dtype=torch.uint8)
        s[: scale.shape[0]] = scale.half()
        z[: zero.shape[0]] = zero.to(torch.uint8)
        return s, z


def unpack_codes(packed: Tensor) -> Tensor:
    """[Np, Kp/2] uint8 -> every code [Np, Kp] uint8, padding included."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_packed(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The float32 weight [Np, Kp] the buffers stand for: (q - z) * s. Exact in float32 (an
    integer in [-15, 15] times a float16 needs at most 15 significant bits)."""
    q = unpack_codes(packed).float()
    z = zero.float().repeat_interleave(group_size, dim=1)
    s = scale.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def w4a16_layout(group_size: int) -> W4A16Layout:
    return W4A16Layout(name=f"w4a16_g{group_size}_rm", group_size=group_size)
