"""`qcompile::gemm_w4a16`, the weight-only W4 g128 baseline: quantization, the reference op
against a plain dequantize-then-matmul, fake shapes and opcheck. There is no kernel."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.compiler.config import W4A16_G128
from qcompile.compiler.quantize import W4FloatGroupWeights, dequantize, quantize_weight
from qcompile.passes.swap_gemm import GEMM_FORMATS
from qcompile.compiler.schemes import GEMM_OPS, GEMM_REFERENCES

OP = GEMM_OPS[W4A16_G128]


def _weights(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    w[0, : k // 3] *= 8  # one outlier segment, so groups differ in range
    w[2] = 0.0  # a dead channel: no NaN, dequantizes to 0
    return w


def _call(x, packed, bias, n, out_dtype):
    return OP(x, *packed.values(), bias, n, W4A16_G128.group_size, out_dtype)


def test_quantize_format():
    """Codes 0..15, float16 scales and integer zeros per group of 128; the codes are RTN
    against the stored (float16) scale, so dequantizing reproduces the nearest grid value."""
    w = _weights(40, 200)
    qw = quantize_weight(w, W4A16_G128)
    assert isinstance(qw, W4FloatGroupWeights)
    assert qw.q.shape == (40, 200) and qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scale.shape == qw.zero.shape == (40, 2)  # K = 200: a partial last group
    assert qw.scale.dtype == torch.float16 and qw.zero.dtype == torch.uint8
    deq = dequantize(qw)
    assert torch.equal(deq[2], torch.zeros(200))
    g = torch.arange(200) // 128
    s = qw.scale.float()[:, g]
    assert ((deq - w).abs() <= s / 2 + 1e-6).all()  # within half a step (zero-including range)
    rows = torch.arange(40) != 0
    sqnr = 10 * math.log10(w[rows].pow(2).sum() / (w[rows] - deq[rows]).pow(2).sum())
    assert sqnr > 19.0, sqnr  # uniform 4-bit over a group's range: ~20 dB on Gaussian rows


@pytest.mark.parametrize("m,k,n", [(1, 576, 192), (3, 576, 33), (17, 200, 64), (5, 64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_dequant_then_matmul(m, k, n, dtype):
    """y = x @ dequant(W)^T (+ b), the weight rounded to x's dtype, float32 accumulation."""
    w = _weights(n, k, seed=m + k + n)
    packed = GEMM_FORMATS[W4A16_G128].pack(w, W4A16_G128)
    assert set(packed) == {"q", "s", "z"}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = (0.5 * torch.randn(n, generator=gen)).to(dtype)
    wd = dequantize(quantize_weight(w, W4A16_G128)).to(dtype).double()
    for b in (None, bias):
        y = _call(x, packed, b, n, dtype)
        assert y.shape == (m, n) and y.dtype == dtype
        ref = x.double() @ wd.t() + (0 if b is None else b.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert err < tol, err
    assert torch.equal(GEMM_REFERENCES[W4A16_G128](x, *packed.values(), None, n, 128, dtype),
                       _call(x, packed, None, n, dtype))


def test_3d_input_matches_flat():
    k, n = 576, 96
    packed = GEMM_FORMATS[W4A16_G128].pack(_weights(n, k), W4A16_G128)
    x = torch.randn(2, 5, k, dtype=torch.float16)
    y3 = _call(x, packed, None, n, torch.float16)
    assert y3.shape == (2, 5, n)
    assert torch.equal(y3.reshape(10, n), _call(x.reshape(10, k), packed, None, n, torch.float16))


def test_fake_shapes_and_opcheck():
    k, n = 64, 33  # N = 33 exercises N padding
    packed = GEMM_FORMATS[W4A16_G128].pack(torch.randn(n, k), W4A16_G128)
    args = (torch.randn(2, 3, k), *packed.values(), None, n, 128, torch.float16)
    torch.library.opcheck(OP, args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = OP(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert y.shape == (2, 3, n) and y.dtype == torch.float16
