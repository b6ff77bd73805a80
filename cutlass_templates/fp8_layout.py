"""Row-major e4m3 weight layout of the FP8 baseline, read by `torch._scaled_mm` (cuBLASLt).

=========  ==========  =============  =============================================
buffer     shape       dtype          order
=========  ==========  =============  =============================================
weights    [Np, Kp]    float8_e4m3fn  row-major, K contiguous; +0.0 (byte 0x00) in
                                      the padding
=========  ==========  =============  =============================================

Np = N rounded up to 16, Kp = K rounded up to 16. The per-channel scales ([Np] float32) are
the op's next buffer, padded with zeros like every GEMM format's.

Why this order: on Hopper cuBLASLt runs FP8 GEMMs only in the "TN" form, A row-major and B
column-major (`torch._scaled_mm` checks `transa == 't' && transb == 'n'` there), and
`_scaled_mm(a [M, K], b [K, N])` wants b column-major: the transposed view of a row-major
[N, K] weight is exactly that, so the runtime passes `w.t()` with no copy. `_scaled_mm` also
needs both dimensions of b and the K of a divisible by 16 (16-byte rows of 1-byte codes),
hence the padding (real models' K and N are multiples of 16 already; zero codes add nothing
to the dot products).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class FP8Layout:
    """Named row-major e4m3 weight format, padded to (n_multiple, k_multiple)."""

    name: str
    n_multiple: int = 16
    k_multiple: int = 16

    def padded_shape(self, n: int, k: int) -> tuple[int, int]:
        return _ceil_to(n, self.n_multiple), _ceil_to(k, self.k_multiple)

    def pack(self, w_q: Tensor) -> Tensor:
        """w_q [N, K] float8_e4m3fn -> [Np, Kp] float8_e4m3fn, zeros in the padding."""
        if w_q.dtype != FP8 or w_q.dim() != 2:
            raise ValueError(f"w_q must be a 2-D {FP8} tensor, got {w_q.dtype} "
                             f"{tuple(w_q.shape)}")
        out = torch.zeros(self.padded_shape(*w_q.shape), dtype=torch.uint8, device=w_q.device)
        out[: w_q.shape[0], : w_q.shape[1]] = w_q.view(torch.uint8)  # bytes: no float rounding
        return out.view(FP8)

    def unpack(self, packed: Tensor, n: int, k: int) -> Tensor:
        """[Np, Kp] float8_e4m3fn -> [n, k] with the padding dropped."""
        if packed.dtype != FP8 or tuple(packed.shape) != self.padded_shape(n, k):
            raise ValueError(f"packed must be {FP8} {self.padded_shape(n, k)}, got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        return packed[:n, :k].contiguous()

    @staticmethod
    def packed_k(packed: Tensor) -> int:
        """Kp of a packed [Np, Kp] weight."""
        return packed.shape[1]


FP8_ROW_MAJOR = FP8Layout(name="fp8_rm")
