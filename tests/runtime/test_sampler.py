"""runtime/sampler.py: SamplingParams validation and next-token selection.

* Invalid max_new_tokens / temperature / top_p raise ValueError naming the parameter.
* temperature 0 is greedy (argmax); a tiny top_p leaves only the top token whatever the
  temperature; top_p never picks a token outside the nucleus.
* Temperature sampling with a seeded generator is reproducible and follows the distribution
  (a token of probability ~0.9 wins most of 200 draws; a lower temperature sharpens it).
"""
from __future__ import annotations

import math

import pytest
import torch

from qcompile.runtime.sampler import SamplingParams, sample


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
])
def test_invalid_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_valid_params():
    p = SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0)
    assert p.max_new_tokens == 1
    SamplingParams(temperature=2.5, top_p=1e-6, seed=0)


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_greedy_is_argmax():
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.0)
    for _ in range(20):
        logits = torch.randn(50)
        assert sample(logits, params, None) == int(logits.argmax())
    half = torch.randn(50).half()
    assert sample(half, params, None) == int(half.argmax())


def test_tiny_top_p_is_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = _logits([0.2, 0.15, 0.25, 0.2, 0.2])  # flat-ish: sampling would vary a lot
    params = SamplingParams(temperature=1.5, top_p=1e-6)
    assert {sample(logits, params, gen) for _ in range(100)} == {2}


def test_top_p_stays_in_nucleus():
    gen = torch.Generator().manual_seed(2)
    # sorted: 0.5 (id 3), 0.3 (id 0), 0.15 (id 1), 0.05 (id 2); top_p 0.7 keeps ids 3 and 0.
    logits = _logits([0.3, 0.15, 0.05, 0.5])
    params = SamplingParams(temperature=1.0, top_p=0.7)
    draws = [sample(logits, params, gen) for _ in range(300)]
    assert set(draws) == {0, 3}
    # renormalized: 0.5/0.8 = 0.625 for id 3; 300 draws -> sd ~ 8.4
    assert 150 < draws.count(3) < 225


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=7)
    first = sample(logits, params, torch.Generator().manual_seed(7))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1 = [sample(logits, params, g1) for _ in range(50)]
    s2 = [sample(logits, params, g2) for _ in range(50)]
    assert s1 == s2
    assert s1[0] == first
    assert len(set(s1)) > 5  # it really samples (100 near-uniform-ish tokens)
    g3 = torch.Generator().manual_seed(8)
    assert [sample(logits, params, g3) for _ in range(50)] != s1


def test_temperature_sampling_follows_distribution():
    gen = torch.Generator().manual_seed(4)
    probs = [0.9, 0.04, 0.03, 0.02, 0.01]
    logits = _logits(probs)
    draws = [sample(logits, SamplingParams(temperature=1.0), gen) for _ in range(200)]
    # Binomial(200, 0.9): mean 180, sd ~4.2; 160 is ~4.7 sd below.
    assert draws.count(0) >= 160
    assert draws.count(0) < 200  # the other 10% do show up (P(all 200) = 0.9^200 ~ 7e-10)
    assert set(draws) <= set(range(5))


def test_temperature_scales_logits():
    gen = torch.Generator().manual_seed(5)
    logits = _logits([0.6, 0.4])
    # T = 0.25: p0 = 0.6^4 / (0.6^4 + 0.4^4) = 0.835; T = 4: p0 = 0.6^.25/(...) = 0.525.
    cold = [sample(logits, SamplingParams(temperature=0.25), gen) for _ in range(400)]
    hot = [sample(logits, SamplingParams(temperature=4.0), gen) for _ in range(400)]
    p_cold, p_hot = cold.count(0) / 400, hot.count(0) / 400
    sd = math.sqrt(0.25 / 400)
    assert abs(p_cold - 0.835) < 4 * sd and abs(p_hot - 0.525) < 4 * sd
