"""Round-to-nearest weight quantization: ranges, error bounds, and the progressive group
format's guarantee that (q - z2) * s2 fits in int8."""
import pytest
import torch

from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W4A16_G128, W8A8
from qcompile.compiler.quantize import (PROTECTIVE_RANGE, dequantize, quantize_w4_group,
                                        quantize_weight)


@pytest.fixture
def w():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 576, generator=g)
    w[3, 5] = 40.0  # an outlier channel
    w[7] = 0.0      # a dead channel must not produce NaN
    return w


def _sqnr_db(ref, got):
    return 10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()).item()


@pytest.mark.parametrize("scheme,min_db", [(W8A8, 38), (W4A8, 15), (W4A8_G128, 17), (W4A8_G64, 18),
                                            (W4A16_G128, 19)])
def test_dequantized_weights_are_close(w, scheme, min_db):
    qw = quantize_weight(w, scheme)
    deq = dequantize(qw)
    assert torch.isfinite(deq).all()
    assert deq.shape == w.shape
    assert torch.equal(deq[7], torch.zeros(576))
    rows = torch.arange(96) != 3  # the outlier row is dominated by its outlier
    assert _sqnr_db(w[rows], deq[rows]) > min_db


def test_code_ranges(w):
    assert quantize_weight(w, W8A8).q.abs().max() <= 127
    q4 = quantize_weight(w, W4A8)
    assert q4.q.max() <= 15 and q4.q.dtype == torch.uint8
    assert torch.equal(q4.zero, q4.zero.round())  # integer zero point


@pytest.mark.parametrize("group", [64, 128])
def test_progressive_group_fits_int8(w, group):
    """Subtraction after multiplication must never overflow int8: |(q - z2) * s2| <= 127."""
    qw = quantize_w4_group(w, group)
    assert qw.s2.min() >= 1 and qw.s2.max() <= 16 and qw.z2.max() <= 15
    s2 = qw.s2.int().repeat_interleave(group, 1)[:, :576]
    z2 = qw.z2.int().repeat_interleave(group, 1)[:, :576]
    w8 = (qw.q.int() - z2) * s2
    assert w8.abs().max() <= 127
    assert (qw.q.int() * s2).max() <= 255  # four weights per 32-bit multiply, no carry
    # level 1 keeps the protective range
    assert (w.abs().amax(1) / qw.s1).max() <= PROTECTIVE_RANGE + 1e-3
