"""Per-token INT8 activation quantization (A8), with the per-token sum of the codes that the
per-channel W4A8 epilogue needs for its zero-point correction.

`quant_a8_ref` is plain ATen: the fusion passes inline it after RMSNorm and SiLU*Mul so that
TorchInductor emits producer + quantization as one kernel. Elsewhere it stays the opaque op
`qcompile::quant_a8`.
"""
from __future__ import annotations

import torch


def quant_a8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (x_q [..., K] int8, s_x [..., 1] float32, sum_k x_q [..., 1] int32)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, 1.0)  # an all-zero row quantizes to zeros (no device baked in)
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
