"""Per-token activation quantization: INT8 (A8), with the per-token sum of the codes that the
per-channel W4A8 epilogue needs for its zero-point correction, and FP8 e4m3 (the FP8
baseline's activations).

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
