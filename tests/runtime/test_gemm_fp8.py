"""The FP8 baseline's ops on CPU: `quant_fp8` (per-token e4m3), `quantize_fp8` (per-channel e4m3
weights), the fp8_rm layout, and `gemm_fp8` against float64 oracles.

* quant_fp8 / quantize_fp8: s = max|row| / 448, codes = e4m3(v / s) rounded to nearest even,
  so |v - s q| <= 2^-4 |v| (3 significand bits) for normal codes and <= 2^-10 s in the
  subnormal range (half of e4m3's smallest step 2^-9); the row's largest value maps to 448.
* gemm_fp8: (1) against DESIGN's formula on the unpacked codes in float64, y = s_x s_w (x_q .
  w_q), within float32 accumulation (gamma_K sum |terms|) plus one rounding of the output
  dtype; (2) against x @ w^T in float64, within the e4m3 bound of the product of two rounded
  operands (|x^ w^ - x w| <= e_x |w^| + |x| e_w, e the bounds above), plus (1)'s.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.compiler.quantize import quantize_fp8
from qcompile.compiler.schemes import FP8, spec_of
from qcompile.cutlass_templates.fp8_layout import FP8_ROW_MAJOR
from qcompile.runtime.ops.gemm_fp8 import gemm_fp8_ref

QUANT_FP8 = torch.ops.qcompile.quant_fp8.default
GEMM_FP8 = torch.ops.qcompile.gemm_fp8.default
F8 = torch.float8_e4m3fn
U32 = 2.0 ** -24


def _rounding_bound(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """|v - s q| allowed for e4m3 codes of v / s (float64)."""
    return 2.0 ** -4 * v.abs() + 2.0 ** -10 * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 576), (2, 5, 64), (1, 1536)])
def test_quant_fp8_semantics(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[-1])).to(dtype)  # wide row ranges
    xq, sx = QUANT_FP8(x)
    assert (xq.shape, xq.dtype) == (shape, F8) and (sx.shape, sx.dtype) == (shape[:-1] + (1,),
                                                                           torch.float32)
    xf = x.double()
    # max|x| times float32(1/448), as CUDA divides by a scalar: within an ulp of max|x| / 448
    amax = x.float().abs().amax(-1, keepdim=True)
    assert torch.equal(sx, amax * (1.0 / 448))
    exact = xf.abs().amax(-1, keepdim=True) / 448
    assert ((sx.double() - exact).abs() <= exact * 2.0**-23).all()
    err = (xq.double() * sx.double() - xf).abs()
    assert (err <= _rounding_bound(xf, sx.double()) * (1 + 1e-6)).all()
    assert torch.equal(xq.float().abs().amax(-1), torch.full(shape[:-1], 448.0))
    # round to nearest: no other code is closer
    assert torch.equal(xq, (x.float() / sx).to(F8))


def test_quant_fp8_zero_row_and_fake():
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    xq, sx = QUANT_FP8(x)
    assert xq[0].float().abs().sum() == 0 and sx[0].item() == 1.0 and xq.float().isfinite().all()
    with FakeTensorMode():
        fq, fs = QUANT_FP8(torch.empty(2, 3, 64, dtype=torch.float16))
        assert (fq.shape, fq.dtype, fs.shape, fs.dtype) == ((2, 3, 64), F8, (2, 3, 1),
                                                            torch.float32)
    torch.library.opcheck(QUANT_FP8, (torch.randn(2, 3, 64),))


def test_quantize_fp8_weights():
    torch.manual_seed(1)
    w = torch.randn(48, 200) * torch.logspace(-2, 1, 48)[:, None]
    w[5] = 0
    qw = quantize_fp8(w)
    assert qw.q.dtype == F8 and qw.scale.shape == (48,) and qw.scale[5] == 1
    err = (qw.dequantize().double() - w.double()).abs()
    assert (err <= _rounding_bound(w.double(), qw.scale.double()[:, None]) * (1 + 1e-6)).all()
    assert torch.equal(qw.q.float().abs().amax(1)[w.abs().amax(1) > 0], torch.full((47,), 448.))


@pytest.mark.parametrize("n,k", [(40, 576), (50, 40), (16, 16)])
def test_layout_round_trip(n, k):
    q = quantize_fp8(torch.randn(n, k)).q
    packed = FP8_ROW_MAJOR.pack(q)
    assert packed.dtype == F8 and packed.shape == FP8_ROW_MAJOR.padded_shape(n, k)
    assert packed.shape[0] % 16 == 0 and packed.shape[1] % 16 == 0
    assert torch.equal(FP8_ROW_MAJOR.unpack(packed, n, k).view(torch.uint8), q.view(torch.uint8))
    assert packed.view(torch.uint8)[n:].count_nonzero() == 0
    assert packed.view(torch.uint8)[:, k:].count_nonzero() == 0
    assert FP8_ROW_MAJOR.packed_k(packed) == packed.shape[1]
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        FP8_ROW_MAJOR.pack(torch.zeros(4, 4, dtype=torch.int8))


def _case(m, n, k, lead=(), seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(*lead, m, k, generator=g) * torch.logspace(-1, 1, k)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,lead,bias", [(1, 40, 576, (), False), (3, 50, 40, (), True),
                                              (17, 96, 1536, (), False), (4, 64, 64, (2,), True),
                                              (129, 576, 576, (), True)])
def test_gemm_fp8_against_float64(m, n, k, lead, bias, out_dtype):
    x, w, b = _case(m, n, k, lead, seed=m + n, bias=bias)
    spec = spec_of(FP8)
    qw = quantize_fp8(w)
    packed = spec.pack_weight(w)
    xq, sx = QUANT_FP8(x)
    b_arg = None if b is None else b.to(out_dtype)
    y = GEMM_FP8(xq, sx, *packed.values(), b_arg, n, out_dtype)
    assert y.shape == (*lead, m, n) and y.dtype == out_dtype
    assert torch.equal(y, gemm_fp8_ref(xq, sx, *packed.values(), b_arg, n, out_dtype))

    # (1) DESIGN's formula on the unpacked codes, float64
    xc, wc = xq.double(), qw.q.double()
    s = sx.double() * qw.scale.double()
    bias64 = 0 if b_arg is None else b_arg.double()
    want = (xc @ wc.T) * s + bias64
    mag = (xc.abs() @ wc.abs().T) * s
    eps_out = torch.finfo(out_dtype).eps
    tol = k * U32 * mag * 1.01 + 4 * U32 * (mag + abs(bias64)) + eps_out * want.abs() \
        + torch.finfo(out_dtype).tiny
    assert ((y.double() - want).abs() <= tol).all()

    # (2) the float product, within the e4m3 rounding of both operands
    exact = x.double() @ w.double().T + bias64
    ex = _rounding_bound(x.double(), sx.double())
    ew = _rounding_bound(w.double(), qw.scale.double()[:, None])
    e4m3 = ex @ (wc.abs() * qw.scale.double()[:, None]).T + x.double().abs() @ ew.T
    assert ((y.double() - exact).abs() <= e4m3 + tol).all()


def test_gemm_fp8_fake_and_opcheck():
    x, w, _ = _case(5, 40, 64)
    packed = spec_of(FP8).pack_weight(w)
    args = (*QUANT_FP8(x), *packed.values(), None, 40, torch.float16)
    # opcheck's schema test multiplies the inputs, which float8 does not support on CPU
    torch.library.opcheck(GEMM_FP8, args, test_utils=("test_faketensor",
                                                      "test_aot_dispatch_dynamic"))
    with FakeTensorMode() as mode:
        y = GEMM_FP8(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
        assert (y.shape, y.dtype) == ((5, 40), torch.float16)
