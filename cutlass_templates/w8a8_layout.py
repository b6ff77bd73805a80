"""Row-major ("TN") int8 weight layout for sm80 INT8 tensor cores.

=========  ==========  =====  =========================================
buffer     shape       dtype  order
=========  ==========  =====  =========================================
weights    [Np, Kp]    int8   row-major, K contiguous; zeros in padding
=========  ==========  =====  =========================================

Np = N rounded up to 32, Kp = K rounded up to 32.

Why no permutation is needed for int8: ``mma.m16n8k32.row.col.s32.s8.s8.s32``
wants, per lane (groupID = lane >> 2, threadID_in_group = lane % 4), B register
r holding the four bytes k = 16r + 4*threadID_in_group + 0..3 of column
n = groupID (PTX ISA "Matrix Fragments for mma.m16n8k32", multiplicand B .s8).
``ldmatrix.sync.aligned.m8n8.x4.shared.b16`` gives lane L 32 bits of row L >> 2
at byte offset 4*(L % 4) of each 16-byte row it is pointed at (PTX ISA
"ldmatrix": "a group of four threads loads an entire row").  With W stored as
[N, K], K contiguous, one 16-byte ldmatrix row is 16 consecutive k of one n, so
the delivered word is exactly the B register: four k-consecutive int8 of
column n = L >> 2.  The same holds for the activation (operand A, [M, K]
row-major), which is why CUTLASS calls this the TN int8 configuration.
Padding: K to 32 keeps every row 16-byte aligned for ``cp.async`` and is one
k32 MMA step; N to 32 is one 4 x n8 warp tile.  Zero padding adds nothing
to the dot products.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class W8Layout:
    """Named row-major int8 weight format, padded to (n_multiple, k_multiple)."""

    name: str
    n_multiple: int = 32
    k_multiple: int = 32

    def padded_shape(self, n: int, k: int) -> tuple[int, int]:
        return _ceil_to(n, self.n_multiple), _ceil_to(k, self.k_multiple)

    def pack(self, w_q: Tensor) -> Tensor:
        """w_q [N, K] int8 -> [Np, Kp] int8, zeros in the padding."""
        if w_q.dtype != torch.int8:
            raise ValueError(f"w_q must be torch.int8, got {w_q.dtype}")
        if w_q.dim() != 2:
            raise ValueError(f"w_q must be 2-D, got shape {tuple(w_q.shape)}")
        out = w_q.new_zeros(self.padded_shape(*w_q.shape))  # [Np, Kp] int8
        out[: w_q.shape[0], : w_q.shape[1]] = w_q
        return out

    def unpack(self, packed: Tensor, n: int, k: int) -> Tensor:
        """[Np, Kp] int8 -> [n, k] int8 with the padding dropped."""
        if packed.dtype != torch.int8 or tuple(packed.shape) != self.padded_shape(n, k):
            raise ValueError(
                f"packed must be int8 {self.padded_shape(n, k)}, got {packed.dtype} {tuple(packed.shape)}"
            )
        return packed[:n, :k].contiguous()

    @staticmethod
    def packed_k(packed: Tensor) -> int:
        """Kp of a packed [Np, Kp] weight."""
        return packed.shape[1]


W8A8_ROW_MAJOR = W8Layout(name="w8a8_rm", n_multiple=32, k_multiple=32)
