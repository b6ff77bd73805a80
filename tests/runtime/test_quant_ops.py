"""runtime/ops/quant.py and runtime/ops/gemm.py: A8 activation quantization and the quantized
GEMM reference ops, checked against DESIGN.md "Numerics" recomputed here independently.

* `quant_a8`: per-token symmetric INT8 (`s_x = max|x_row| / 127`, codes round-to-nearest in
  [-127, 127], per-token int32 sum of the codes), for [T, K] and [B, S, K] inputs, fp32/fp16/bf16;
  an all-zero row gives zero codes and no NaN; the fake (meta) implementation has the real
  shapes and dtypes.
* GEMM ops: the op reads the *packed* weight buffers (`GEMM_FORMATS[scheme].pack`, exactly what
  swap_gemm stores in the artifact), the reference here reads the *unpacked* integer codes of
  `quantize_weight` and evaluates DESIGN's formula in float64:
    W8A8                 y = s_x s_w (x_q . w_q)
    W4A8 per channel     y = s_x s_w acc - z s_w s_x sum(x_q)  ==  s_x (x_q . ((q - z) s_w))
    W4A8 group g128/g64  y = s_x s1 (x_q . ((q - z2) s2))      (group of column k: k // g)
  so layout, K/N padding and epilogue are all covered. Tolerance (see `_tol`): the op computes
  its epilogue in float32 and then rounds to the output dtype, so the allowed error is a few
  float32 roundings of the magnitudes of the epilogue's terms plus one rounding (one eps) of the
  output dtype.
* Quantization error itself, loosely: the output against x @ W^T in float64, as an SQNR
  (signal-to-quantization-noise ratio, 10 log10(sum y_ref^2 / sum (y - y_ref)^2), in dB).
* `int_matmul`: exact int32 at K = 14336 with worst-case values (|sum| = 14336 * 127^2).
* COMET's FMPQ (issue 15): `quant_a4x` (8-bit leading blocks, 4-bit others, per token and
  block of 128) and `gemm_w4a4x`'s block-scaled integer sums, against float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W8A8
from qcompile.compiler.quantize import quantize_weight
from qcompile.passes.swap_gemm import GEMM_FORMATS
from qcompile.compiler.schemes import GEMM_OPS
from qcompile.runtime.ops import int_matmul, quant_a8_ref

QUANT_A8 = torch.ops.qcompile.quant_a8.default
SCHEMES = {"w8a8": W8A8, "w4a8": W4A8, "w4a8-g128": W4A8_G128, "w4a8-g64": W4A8_G64}
U32 = 2.0 ** -24  # float32 unit roundoff


# ---------------------------------------------------------------------------------------------
# quant_a8
# ---------------------------------------------------------------------------------------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 576), (2, 5, 64), (1, 1536)])
def test_quant_a8_semantics(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-2, 2, shape[-1])).to(dtype)  # wide row ranges
    xq, sx, xsum = QUANT_A8(x)
    lead = shape[:-1]
    assert xq.shape == shape and xq.dtype == torch.int8
    assert sx.shape == (*lead, 1) and sx.dtype == torch.float32
    assert xsum.shape == (*lead, 1) and xsum.dtype == torch.int32

    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    torch.testing.assert_close(sx, absmax / 127, rtol=2 * U32, atol=0)
    assert int(xq.min()) >= -127 and int(xq.max()) <= 127
    # The largest element of each row maps to +-127 (codes use the whole range).
    assert torch.equal(xq.abs().amax(dim=-1), torch.full(lead, 127, dtype=torch.int8))
    # Round to nearest: |x/s - x_q| <= 1/2 (plus float32 division rounding).
    r = (xf.double() / sx.double() - xq.double()).abs()
    assert float(r.max()) <= 0.5 + 1e-4
    # Dequantized error per element <= s_x / 2.
    assert bool(((sx * xq.float() - xf).abs() <= sx * (0.5 + 1e-4)).all())
    assert torch.equal(xsum, xq.to(torch.int64).sum(dim=-1, keepdim=True).to(torch.int32))


def test_quant_a8_3d_equals_2d_rows():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 576, dtype=torch.float16)
    a = QUANT_A8(x)
    b = QUANT_A8(x.reshape(10, 576))
    for u, v in zip(a, b):
        assert torch.equal(u.reshape(v.shape), v)


def test_quant_a8_zero_row_has_no_nan():
    x = torch.randn(4, 64)
    x[1] = 0
    x[3] = -0.0
    xq, sx, xsum = QUANT_A8(x)
    assert torch.isfinite(sx).all()
    for r in (1, 3):
        assert torch.equal(xq[r], torch.zeros(64, dtype=torch.int8))
        assert int(xsum[r]) == 0
    assert float(sx[1]) > 0  # any positive scale, so s_x * x_q stays 0, never 0 * inf
    assert torch.equal((sx * xq.float())[1], torch.zeros(64))


def test_quant_a8_matches_ref_and_is_deterministic():
    x = torch.randn(3, 128)
    for u, v in zip(QUANT_A8(x), quant_a8_ref(x)):
        assert torch.equal(u, v)


def test_quant_a8_fake_shapes():
    with FakeTensorMode():
        for shape in [(5, 576), (2, 3, 64)]:
            x = torch.empty(shape, dtype=torch.float16)
            xq, sx, xsum = QUANT_A8(x)
            assert (xq.shape, xq.dtype) == (shape, torch.int8)
            assert (sx.shape, sx.dtype) == (shape[:-1] + (1,), torch.float32)
            assert (xsum.shape, xsum.dtype) == (shape[:-1] + (1,), torch.int32)


def test_quant_a8_opcheck():
    torch.library.opcheck(QUANT_A8, (torch.randn(2, 3, 64),))


# ---------------------------------------------------------------------------------------------
# GEMM ops vs DESIGN formulas on the unpacked codes
# ---------------------------------------------------------------------------------------------

def _call(scheme, x_parts, packed: dict, bias, n: int, out_dtype):
    xq, sx, xsum = x_parts
    fmt = GEMM_FORMATS[scheme]
    args = (xq, sx, *((xsum,) if fmt.uses_sum else ()), *packed.values(), bias, n,
            *fmt.extra(scheme), out_dtype)
    return GEMM_OPS[scheme](*args)


def _design(scheme, w: torch.Tensor, xq, sx):
    """(y, mag) in float64 from quantize_weight's unpacked codes: y per DESIGN.md, mag the
    magnitude of the terms the op's float32 epilogue combines (bounds its rounding error)."""
    qw = quantize_weight(w, scheme)
    x = xq.reshape(-1, xq.shape[-1]).double()
    s_x = sx.reshape(-1, 1).double()
    if scheme is W8A8:
        y = s_x * qw.scale.double()[None] * (x @ qw.q.double().t())
        return y, y.abs()
    if scheme.group_size is None:
        q, z, s_w = qw.q.double(), qw.zero.double(), qw.scale.double()
        acc = x @ q.t()
        xs = x.sum(dim=1, keepdim=True)
        epilogue = s_x * s_w[None] * acc - (z * s_w)[None] * (s_x * xs)
        y = s_x * (x @ ((q - z[:, None]) * s_w[:, None]).t())
        mag = (s_x * s_w[None] * acc).abs() + ((z * s_w)[None] * (s_x * xs)).abs()
        # DESIGN's epilogue form and the dequantized-weight form are the same number.
        assert float((epilogue - y).abs().max()) <= 1e-12 * float(mag.max())
        return y, mag
    g = torch.arange(w.shape[1]) // scheme.group_size
    w8 = (qw.q.double() - qw.z2.double()[:, g]) * qw.s2.double()[:, g]
    assert float(w8.abs().max()) <= 127  # protective range: fits the int8 tensor-core input
    y = s_x * qw.s1.double()[None] * (x @ w8.t())
    return y, y.abs()


def _tol(mag: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A few float32 roundings of the epilogue's terms, then one rounding to `dtype` (eps covers
    half an ulp with margin), plus the smallest subnormal step of `dtype`."""
    fi = torch.finfo(dtype)
    return 8 * U32 * mag + fi.eps * ref.abs() + fi.tiny * fi.eps


_SHAPES = [(1, 576, 192), (3, 576, 33), (17, 576, 576),
           (17, 1536, 192), (1, 1536, 33), (3, 1536, 576),
           (3, 64, 192), (17, 64, 33), (1, 64, 576)]


def _cases():
    for name, scheme in SCHEMES.items():
        for m, k, n in _SHAPES:
            yield pytest.param(scheme, m, k, n, id=f"{name}-M{m}-K{k}-N{n}")


@pytest.mark.parametrize("scheme,m,k,n", list(_cases()))
def test_gemm_matches_design_formula(scheme, m, k, n):
    gen = torch.Generator().manual_seed(m * 100003 + k * 31 + n)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    w[0, : k // 3] *= 8  # one outlier row segment, so groups differ in range
    packed = GEMM_FORMATS[scheme].pack(w, scheme)
    xq, sx, xsum = quant_a8_ref(x)
    y_ref, mag = _design(scheme, w, xq, sx)
    for out_dtype in (torch.float32, torch.float16):
        for with_bias in (False, True):
            bias = (0.5 * torch.randn(n, generator=gen)).to(out_dtype) if with_bias else None
            y = _call(scheme, (xq, sx, xsum), packed, bias, n, out_dtype)
            assert y.shape == (m, n) and y.dtype == out_dtype
            ref = y_ref + (bias.double()[None] if with_bias else 0)
            m_all = mag + (bias.double().abs()[None] if with_bias else 0)
            err = (y.double() - ref).abs()
            tol = _tol(m_all, ref, out_dtype)
            bad = err > tol
            assert not bool(bad.any()), (
                f"{out_dtype} bias={with_bias}: {int(bad.sum())} outputs off, worst "
                f"{float((err - tol).max()):.3g} over tolerance")


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_gemm_3d_input_matches_flat(scheme):
    torch.manual_seed(2)
    k, n = 576, 192
    w = torch.randn(n, k) / math.sqrt(k)
    packed = GEMM_FORMATS[scheme].pack(w, scheme)
    x = torch.randn(2, 5, k, dtype=torch.float16)
    y3 = _call(scheme, quant_a8_ref(x), packed, None, n, torch.float16)
    y2 = _call(scheme, quant_a8_ref(x.reshape(10, k)), packed, None, n, torch.float16)
    assert y3.shape == (2, 5, n)
    assert torch.equal(y3.reshape(10, n), y2)


def _sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(float((ref ** 2).sum()) / float(((y - ref) ** 2).sum()))


# SQNR of the GEMM output against x @ W^T (float64) for Gaussian x, W with K = 1536.
# Round-to-nearest theory: a uniform quantizer with step s has noise s^2/12. W4 per channel:
# s = range/15 ~ 6.5 sigma/15 -> ~18 dB; groups of 64/128 narrow the range -> ~20 dB; W8A8:
# ~40 dB. Measured on this data: 38.7, 17.5, 19.7 (g128), 20.3 (g64) dB; bounds ~3 dB below.
MIN_SQNR_DB = {"w8a8": 35.0, "w4a8": 15.0, "w4a8-g128": 17.0, "w4a8-g64": 17.0}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gemm_close_to_float_matmul(name):
    scheme = SCHEMES[name]
    gen = torch.Generator().manual_seed(3)
    m, k, n = 17, 1536, 192
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    y = _call(scheme, quant_a8_ref(x), GEMM_FORMATS[scheme].pack(w, scheme), None, n,
              torch.float32)
    sqnr = _sqnr_db(y.double(), x.double() @ w.double().t())
    assert sqnr > MIN_SQNR_DB[name], f"SQNR {sqnr:.1f} dB"


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gemm_fake_shapes_and_opcheck(name):
    scheme = SCHEMES[name]
    k, n = 64, 33  # N = 33 exercises N padding
    w = torch.randn(n, k)
    packed = GEMM_FORMATS[scheme].pack(w, scheme)
    x = torch.randn(2, 3, k)
    parts = quant_a8_ref(x)
    fmt = GEMM_FORMATS[scheme]
    args = (parts[0], parts[1], *((parts[2],) if fmt.uses_sum else ()), *packed.values(), None,
            n, *fmt.extra(scheme), torch.float16)
    torch.library.opcheck(GEMM_OPS[scheme], args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                          for a in args)
        y = GEMM_OPS[scheme](*fake_args)
    assert y.shape == (2, 3, n) and y.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# int_matmul
# ---------------------------------------------------------------------------------------------

def test_int_matmul_exact_worst_case_k14336():
    k = 14336  # Llama-3-8B / Mistral MLP width; |sum| = 14336 * 127^2 = 231,225,344 < 2^31
    p = torch.full((k,), 127, dtype=torch.int8)
    alt = p.clone()
    alt[1::2] = -127
    a = torch.stack([p, -p, alt, -alt])                       # [4, K]
    b = torch.stack([p, -p, alt, torch.flip(alt, [0]), -p])  # [5, K]
    out = int_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (4, 5)
    exact = a.double() @ b.double().t()
    assert torch.equal(out.double(), exact)
    assert int(out[0, 0]) == k * 127 * 127 and int(out[0, 1]) == -k * 127 * 127


def test_int_matmul_random_full_range():
    gen = torch.Generator().manual_seed(4)
    for m, k, n in [(1, 14336, 3), (17, 576, 33), (3, 64, 64)]:
        a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        out = int_matmul(a, b)
        assert torch.equal(out.to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).t())


# ---------------------------------------------------------------------------------------------
# COMET's FMPQ (issue 15): mixed 4/8-bit activation blocks and the W4Ax GEMM reference
# ---------------------------------------------------------------------------------------------

def test_quant_a4x_blocks_take_their_bits():
    """Per token and block of 128: the first n8 blocks symmetric 8-bit, the rest 4-bit, each
    block's largest magnitude mapped to its top code; zero blocks give zero codes, no NaN; t is
    the dequantized row sum sum_b s_x[b] sum_k x_q."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 512, generator=g, dtype=torch.float16)
    x[0, 0, 384:] = 0
    xq, sx, t = torch.ops.qcompile.quant_a4x(x, 1, 128)
    assert (xq.dtype, tuple(sx.shape), sx.dtype) == (torch.int8, (2, 3, 4), torch.float32)
    assert (tuple(t.shape), t.dtype) == ((2, 3, 1), torch.float32)
    xf = x.float().reshape(2, 3, 4, 128)
    levels = torch.tensor([127.0, 7.0, 7.0, 7.0])
    s = xf.abs().amax(-1) / levels
    s = torch.where(s == 0, torch.ones_like(s), s)
    assert torch.equal(sx, s)
    want = torch.clamp(torch.round(xf / s[..., None]), -levels[:, None], levels[:, None])
    assert torch.equal(xq.reshape(2, 3, 4, 128).float(), want)
    assert xq.reshape(2, 3, 4, 128)[..., 1:, :].abs().max() == 7
    assert (xq[0, 0, 384:] == 0).all() and torch.isfinite(sx).all()
    want_t = (want.double().sum(-1) * s.double()).sum(-1, keepdim=True)
    assert torch.allclose(t.double(), want_t, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the block"):
        torch.ops.qcompile.quant_a4x(torch.zeros(2, 100), 0, 128)


def test_quant_a4x_fake_and_opcheck():
    with FakeTensorMode():
        xq, sx, t = torch.ops.qcompile.quant_a4x(torch.empty(5, 256, dtype=torch.float16), 2, 128)
        assert (xq.shape, xq.dtype, sx.shape, t.shape) == ((5, 256), torch.int8, (5, 2), (5, 1))
        xp = torch.ops.qcompile.quant_a4x(torch.empty(5, 512), 1, 128, 1000, 1)[0]
        assert xp.shape == (5, 320)  # (K + 128 n8) / 2 bytes: 4-bit blocks two codes a byte
    torch.library.opcheck(torch.ops.qcompile.quant_a4x.default, (torch.randn(3, 256), 1, 128))
    torch.library.opcheck(torch.ops.qcompile.quant_a4x.default,
                          (torch.randn(3, 512), 1, 128, 900, 1))


@pytest.mark.parametrize("n8", [0, 1, 4])
@pytest.mark.parametrize("packed", [0, 1])
def test_gemm_w4a4x_is_the_block_scaled_integer_sum(n8, packed):
    """y = s_w sum_b s_x[b] (x_q[b] . q[b]) - z s_w t on per-channel W4A8's packed weights,
    against the dequantized product in float64 (the integer partials are exact; the float32
    block accumulation and the correction are the only roundings). packed: the sm80 form of
    x_q (4-bit blocks two codes a byte), the same numbers bitwise."""
    g = torch.Generator().manual_seed(n8)
    m, k, n = 7, 512, 40
    x = torch.randn(m, k, generator=g)
    xq, sx, t = torch.ops.qcompile.quant_a4x(x, n8, 128)
    qw = quantize_weight(torch.randn(n, k, generator=g), W4A8)
    packed_w = GEMM_FORMATS[W4A8].pack(None, W4A8, qw)
    bias = torch.randn(n, generator=g)
    tail = (packed_w["q"], packed_w["s"], packed_w["zs"], bias, n, n8, 128)
    xp = torch.ops.qcompile.quant_a4x(x, n8, 128, 1000, packed)[0]
    assert xp.shape == (m, (k + 128 * n8) // 2 if packed else k)
    y = torch.ops.qcompile.gemm_w4a4x(xp, sx, t, *tail, packed, torch.float32)
    assert torch.equal(y, torch.ops.qcompile.gemm_w4a4x(xq, sx, t, *tail, 0, torch.float32))
    args = (xp, sx, t, *tail, packed, torch.float32)
    xd = (xq.double().reshape(m, 4, 128) * sx.double()[..., None]).reshape(m, k)
    wd = (qw.q.double() - qw.zero.double()[:, None]) * qw.scale.double()[:, None]
    want = xd @ wd.t() + bias.double()
    assert y.shape == (m, n)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.qcompile.gemm_w4a4x.default, args)


def _round_f32(q) -> float:
    """The float32 nearest the rational q (ties to even), exactly."""
    from fractions import Fraction
    x = torch.tensor(float(q), dtype=torch.float32)
    near = [torch.nextafter(x, torch.tensor(-math.inf)), x, torch.nextafter(x, torch.tensor(math.inf))]
    return float(min(near, key=lambda c: (abs(Fraction(float(c)) - q),
                                          int(c.view(torch.int32)) & 1)))


@pytest.mark.parametrize("dense", [False, True], ids=["cpu-gather", "dense"])
def test_fma32_rounds_once(dense):
    """gemm_w4a4x's block scaling, y = fma(s_x, p, y) (the kernels' __fmaf_rn): exactly the
    float32 nearest to a * b + c, against rational arithmetic, on random operands of the
    kernels' ranges and on sums just past a float32 midpoint, where rounding the float64 sum
    to float32 would round twice and land on the wrong side; both ways of correcting those
    (the CPU's gather, and the dense one other devices run, capturable in a CUDA graph)."""
    from fractions import Fraction
    from qcompile.runtime.ops.gemm import fma32
    g = torch.Generator().manual_seed(0)
    n = 3000
    a = (torch.rand(n, generator=g) * 2 - 1) * torch.exp2(
        torch.randint(-10, 4, (n,), generator=g).float())
    b = torch.randint(-250000, 250000, (n,), generator=g).float()
    c = (torch.rand(n, generator=g) * 2 - 1) * torch.exp2(
        torch.randint(-10, 20, (n,), generator=g).float())
    got = fma32(a, b, c, dense=dense)
    want = [_round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
            for x, y, z in zip(a, b, c)]
    assert got.tolist() == want
    assert (got != a * b + c).any()  # two roundings differ somewhere: the check can fail
    # a * b = 2^-24 (1 + 7 2^-41): 1 + a b is 7 2^-65 past the midpoint 1 + 2^-24 (up), and
    # (1 + 2^-22) - a b as far short of the midpoint 1 + 3 2^-24 (down); float64 loses the
    # 2^-65 and ties to even the wrong way in both
    a1 = torch.tensor([10495479 * 2.0 ** -65, -10495479 * 2.0 ** -65])
    b1 = torch.tensor([209521.0, 209521.0])
    c1 = torch.tensor([1.0, 1.0 + 2.0 ** -22])
    assert fma32(a1, b1, c1, dense=dense).tolist() == [1.0 + 2.0 ** -23, 1.0 + 2.0 ** -23]
    assert (a1.double() * b1.double() + c1.double()).float().tolist() == [1.0, 1.0 + 2.0 ** -22]
