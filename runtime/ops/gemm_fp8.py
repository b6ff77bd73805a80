"""The FP8 baseline GEMM: y[..., n] = s_x s_w (x_q . w_q) with e4m3 activations (per token) and
weights (per output channel), the format a Hopper user would pick instead of W4A8.

No qcompile kernel: on CUDA devices with FP8 tensor cores (sm89, sm90 and newer) the op is
`torch._scaled_mm` (cuBLASLt) with row-wise scales, scale_a = s_x [M, 1] and scale_b = s_w
[1, Np] (float32), the weight as the column-major [Kp, Np] view of its row-major [Np, Kp]
buffer (cutlass_templates/fp8_layout.py), fp32 accumulation and the output dtype written by
the epilogue. The reference computes the same thing in plain PyTorch: every product of two
e4m3 codes is exact in float32 (4-bit significands), the products are summed in float32, then
scaled, the bias added and the result rounded once to the output dtype; it runs on CPU and is
the GPU tests' oracle.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .gemm import _decoded, _finish

FP8 = torch.float8_e4m3fn


def _codes(x: torch.Tensor, kp: int) -> torch.Tensor:
    """x_q [..., K] e4m3 -> [M, Kp], zero codes in the K padding (as bytes: e4m3 has no pad)."""
    x = x.reshape(-1, x.shape[-1])
    if kp > x.shape[-1]:
        x = torch.nn.functional.pad(x.view(torch.uint8), (0, kp - x.shape[-1])).view(FP8)
    return x


def gemm_fp8_ref(xq, sx, w, sw, bias, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """w [Np, Kp] float8_e4m3fn (fp8_rm), sw [Np] f32: y = s_x s_w (x_q . w_q), the dot
    products in float32 on the codes."""
    wf = _decoded(w, lambda t: t.float())
    acc = _codes(xq, w.shape[1]).float() @ wf.t()
    y = acc * sx.reshape(-1, 1) * sw[None, :]
    return _finish(y, bias, xq.shape[:-1], n, out_dtype)


@torch.library.custom_op("qcompile::gemm_fp8", mutates_args=())
def gemm_fp8(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
             bias: torch.Tensor | None, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    return gemm_fp8_ref(xq, sx, w, sw, bias, n, out_dtype)


gemm_fp8.register_fake(
    lambda xq, sx, w, sw, bias, n, out_dtype: xq.new_empty(xq.shape[:-1] + (n,),
                                                           dtype=out_dtype))


@functools.cache
def _has_fp8_mma(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


# (device, out dtype) -> whether _scaled_mm takes row-wise scales with that output dtype.
# cuBLAS >= 12.9 on sm90 does for fp16, bf16 and fp32; torch's CUTLASS fallback (older CUDA)
# may allow bf16 only, where the GEMM runs with unit scales into float32 and the scales are
# applied after it (same numerics, one more pass over the output).
_ROWWISE: dict[tuple[int, torch.dtype], bool] = {}
_ONES: dict[int, torch.Tensor] = {}


def _scaled_mm(a: torch.Tensor, w: torch.Tensor, sa: torch.Tensor, sw: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, Kp] e4m3, w [Np, Kp] e4m3, sa [M, 1], sw [Np] f32 -> [M, Np] out_dtype."""
    key = (a.device.index, out_dtype)
    if _ROWWISE.get(key, True):
        try:
            y = torch._scaled_mm(a, w.t(), sa, sw.view(1, -1), out_dtype=out_dtype)
            _ROWWISE[key] = True
            return y
        except RuntimeError as e:  # an argument check, before any launch
            if torch.cuda.is_current_stream_capturing() or key in _ROWWISE:
                raise
            warnings.warn(f"torch._scaled_mm takes no row-wise scales with {out_dtype} out "
                          f"here ({str(e).splitlines()[0][:120]}): scaling after the GEMM")
            _ROWWISE[key] = False
    one = _ONES.get(a.device.index)
    if one is None:
        one = _ONES[a.device.index] = torch.ones((), dtype=torch.float32, device=a.device)
    acc = torch._scaled_mm(a, w.t(), one, one, out_dtype=torch.float32)
    return (acc * sa * sw[None, :]).to(out_dtype)


@gemm_fp8.register_kernel("cuda")
def _(xq, sx, w, sw, bias, n, out_dtype):
    if not _has_fp8_mma(xq.device.index if xq.device.index is not None
                        else torch.cuda.current_device()):
        return gemm_fp8_ref(xq, sx, w, sw, bias, n, out_dtype)  # no FP8 tensor cores
    # cuBLASLt wants A row-major and contiguous scales (no-ops for the quantizers' outputs)
    a, sa = _codes(xq, w.shape[1]).contiguous(), sx.reshape(-1, 1).contiguous()
    # with a bias: float32 out, then the bias and one rounding, as the reference does
    y = _scaled_mm(a, w, sa, sw, torch.float32 if bias is not None else out_dtype)
    return _finish(y, bias, xq.shape[:-1], n, out_dtype)
