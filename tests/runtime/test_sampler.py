"""runtime/sampler.py: SamplingParams validation and batched next-token selection.

* Invalid max_new_tokens / temperature / top_p / top_k / seed raise ValueError naming it.
* temperature 0 is greedy (argmax); a tiny top_p or top_k 1 leaves only the top token whatever
  the temperature; top_p and top_k never pick outside their set.
* Draws are a pure function of (seed, position, token): reproducible, different across seeds
  and positions, independent of the other rows of the batch, and they follow the
  distribution (a token of probability ~0.9 wins most of 200 draws; temperature sharpens).
"""
from __future__ import annotations

import math

import pytest
import torch

from qcompile.runtime.sampler import (SamplingParams, _argmax_chunked, argmax_rows, sample,
                                      sample_rows, uniform)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**63), "seed"),
])
def test_invalid_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_valid_params():
    p = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0)
    assert p.max_new_tokens == 1
    SamplingParams(temperature=2.5, top_p=1e-6, seed=0, top_k=5)


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_greedy_is_argmax():
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.0)
    for _ in range(20):
        logits = torch.randn(50)
        assert sample(logits, params) == int(logits.argmax())
    half = torch.randn(50).half()
    assert sample(half, params) == int(half.argmax())


def test_tiny_top_p_is_argmax():
    logits = _logits([0.2, 0.15, 0.25, 0.2, 0.2])  # flat-ish: sampling would vary a lot
    for params in (SamplingParams(temperature=1.5, top_p=1e-6),
                   SamplingParams(temperature=1.5, top_k=1)):
        assert {sample(logits, params, 1, i) for i in range(100)} == {2}


def test_top_p_stays_in_nucleus():
    # sorted: 0.5 (id 3), 0.3 (id 0), 0.15 (id 1), 0.05 (id 2); top_p 0.7 keeps ids 3 and 0.
    logits = _logits([0.3, 0.15, 0.05, 0.5])
    params = SamplingParams(temperature=1.0, top_p=0.7)
    draws = [sample(logits, params, 2, i) for i in range(300)]
    assert set(draws) == {0, 3}
    # renormalized: 0.5/0.8 = 0.625 for id 3; 300 draws -> sd ~ 8.4
    assert 150 < draws.count(3) < 225
    top2 = [sample(logits, SamplingParams(temperature=1.0, top_k=2), 3, i) for i in range(300)]
    assert set(top2) == {0, 3}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0)
    s1 = [sample(logits, params, 7, i) for i in range(50)]
    assert s1 == [sample(logits, params, 7, i) for i in range(50)]
    assert len(set(s1)) > 5  # it really samples (100 near-uniform-ish tokens)
    assert [sample(logits, params, 8, i) for i in range(50)] != s1
    assert [sample(logits, params, 2**40 + 7, i) for i in range(50)] != s1  # high bits count


def test_rows_do_not_depend_on_each_other():
    """A row's draw is the same alone, in a batch, in another order, beside greedy rows."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 300, generator=gen)
    temp = torch.tensor([1.0, 0.0, 0.7, 1.3, 1.0, 0.0])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 1.0])
    top_k = torch.tensor([0, 0, 0, 0, 20, 0])
    seed = torch.tensor([1, 2, 3, 4, 5, 6])
    pos = torch.tensor([0, 5, 9, 2, 2, 0])
    batch = sample_rows(logits, temp, top_p, top_k, seed, pos)
    assert batch[1] == logits[1].argmax() and batch[5] == logits[5].argmax()
    for i in range(6):
        one = sample_rows(logits[i:i + 1], temp[i:i + 1], top_p[i:i + 1], top_k[i:i + 1],
                          seed[i:i + 1], pos[i:i + 1])
        assert one[0] == batch[i]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(sample_rows(logits[perm], temp[perm], top_p[perm], top_k[perm],
                                   seed[perm], pos[perm]), batch[perm])


def test_uniform_is_uniform():
    tok = torch.arange(20000)[None]
    u = uniform(torch.tensor([[11]]), torch.tensor([[3]]), tok)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200  # ~4.7 sd of Binomial(20000, 0.1)
    other = uniform(torch.tensor([[11]]), torch.tensor([[4]]), tok)
    assert abs(torch.corrcoef(torch.stack([u[0], other[0]]))[0, 1].item()) < 0.03


def test_temperature_sampling_follows_distribution():
    probs = [0.9, 0.04, 0.03, 0.02, 0.01]
    logits = _logits(probs)
    draws = [sample(logits, SamplingParams(temperature=1.0), 4, i) for i in range(200)]
    # Binomial(200, 0.9): mean 180, sd ~4.2; 160 is ~4.7 sd below.
    assert draws.count(0) >= 160
    assert draws.count(0) < 200  # the other 10% do show up (P(all 200) = 0.9^200 ~ 7e-10)
    assert set(draws) <= set(range(5))


def test_temperature_scales_logits():
    logits = _logits([0.6, 0.4])
    # T = 0.25: p0 = 0.6^4 / (0.6^4 + 0.4^4) = 0.835; T = 4: p0 = 0.6^.25/(...) = 0.525.
    cold = [sample(logits, SamplingParams(temperature=0.25), 5, i) for i in range(400)]
    hot = [sample(logits, SamplingParams(temperature=4.0), 6, i) for i in range(400)]
    p_cold, p_hot = cold.count(0) / 400, hot.count(0) / 400
    sd = math.sqrt(0.25 / 400)
    assert abs(p_cold - 0.835) < 4 * sd and abs(p_hot - 0.525) < 4 * sd


def _hard_rows(v: int) -> torch.Tensor:
    """Rows that stress the first-maximum rule: ties inside a chunk and across chunks, -inf,
    NaN, a maximum in the last position."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, v, generator=g)
    x[0, [5, 3 * v // 4, v - 1]] = 9.0           # the same max in three chunks: the first wins
    x[1] = 1.0                                     # all tied: index 0
    x[2, :] = float("-inf")
    x[2, v - 1] = 0.0                              # only the last is finite
    x[3, [10, 11]] = 5.0                           # a tie inside one chunk
    x[4, v // 2] = float("nan")                    # NaN counts as the largest (torch.argmax)
    x[5] = float("-inf")                           # nothing finite: index 0
    return x


@pytest.mark.parametrize("v", [49152, 128256, 32000])
def test_chunked_argmax_is_argmax(v):
    """The two-pass argmax of the CUDA path gives torch.argmax's indices (run here on the
    CPU; the GPU test runs it on CUDA)."""
    x = _hard_rows(v)
    c = math.gcd(v, 256)
    assert torch.equal(_argmax_chunked(x, c), x.argmax(dim=-1))
    assert torch.equal(_argmax_chunked(x.half(), c), x.half().argmax(dim=-1))
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.gpu
def test_chunked_argmax_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _hard_rows(128256).cuda()
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
