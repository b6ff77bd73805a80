"""QoQ rotation (compiler/rotate.py): folded norms and rotations leave the decoder's logits
unchanged; the Hadamard matrices are orthogonal; rotation removes an outlier channel."""
import math

import pytest
import torch

from qcompile.compiler.capture import KVSpec
from qcompile.compiler.rotate import (fold_norms, hadamard, hadamard_construction,
                                      random_orthogonal, rotate, rotate_heads, rotate_residual,
                                      rotation_matrix)
from qcompile.models.decoder import Decoder
from qcompile.models.loaders import load_checkpoint

CASES = {"llama-tied": ("llama", dict(tie=True)), "llama": ("llama", dict(tie=False)),
         "qwen2-bias": ("qwen2", {})}


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request, make_tiny_checkpoint):
    model_type, opts = CASES[request.param]
    return load_checkpoint(make_tiny_checkpoint(model_type, **opts))


def logits(cfg, weights, decoder=None) -> torch.Tensor:
    """Decoder logits of every token of a flat batch of 2 sequences (7 and 5 tokens), empty
    paged cache (`decoder`: one already built from the weights)."""
    lens = [7, 5]
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(3))
    i32 = torch.int32
    cache = KVSpec.of(cfg, "fp16", 16, torch.float32).empty(2)
    with torch.no_grad():
        out, _ = (decoder or Decoder(cfg, weights))(
            ids, torch.cat([torch.arange(n) for n in lens]), cache,
            torch.tensor([[0], [1]], dtype=i32), torch.zeros(2, dtype=i32),
            torch.tensor([0, lens[0], sum(lens)], dtype=i32), torch.arange(sum(lens)))
    return out


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def snapshot(w):
    return {k: v.clone() for k, v in w.items()}


def assert_same(w, ref):
    assert w.keys() == ref.keys()
    for k in ref:
        assert torch.equal(w[k], ref[k]), f"input tensor {k} was modified"


def norm_names(cfg):
    return ["norm"] + [f"layers.{i}.{n}" for i in range(cfg.num_layers)
                       for n in ("attn_norm", "mlp_norm")]


# ----------------------------------------------------------------------------- fold / rotate

def test_fold_norms_keeps_logits(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    before = snapshot(w)
    ref = logits(cfg, w)
    folded = fold_norms(cfg, w)
    assert_same(w, before)
    for n in norm_names(cfg):
        assert torch.equal(folded[n], torch.ones_like(w[n])), n
    assert "lm_head" in folded  # untied when it was tied
    assert torch.equal(folded["embed"], w["embed"])
    err = rel(logits(cfg, folded), ref)
    assert err < 1e-5, f"fold_norms changed the logits: relative error {err:.2e}"


def test_rotate_keeps_logits(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    before = snapshot(w)
    ref = logits(cfg, w)
    rot = rotate(cfg, w, seed=0)
    assert_same(w, before)
    err = rel(logits(cfg, rot), ref)
    assert err < 1e-4, f"rotate changed the logits: relative error {err:.2e}"
    # the weights really changed, deterministically in the seed
    assert not torch.allclose(rot["layers.0.wqkv"], fold_norms(cfg, w)["layers.0.wqkv"])
    again, other = rotate(cfg, w, seed=0), rotate(cfg, w, seed=1)
    assert all(torch.equal(rot[k], again[k]) for k in rot)
    assert not torch.equal(rot["embed"], other["embed"])


def test_each_rotation_alone_keeps_logits(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    g = torch.Generator().manual_seed(5)
    ref = logits(cfg, w)
    # per-head rotation needs no folding (also: a random orthogonal Rh works)
    heads = rotate_heads(cfg, w, random_orthogonal(cfg.head_dim, g))
    assert rel(logits(cfg, heads), ref) < 1e-5
    v0 = cfg.q_size + cfg.kv_size
    assert torch.equal(heads["layers.0.wqkv"][:v0], w["layers.0.wqkv"][:v0])  # q, k untouched
    # residual rotation alone, on folded norms
    folded = fold_norms(cfg, w)
    res = rotate_residual(cfg, folded, hadamard(cfg.hidden_size, g))
    assert rel(logits(cfg, res), ref) < 1e-4
    if "layers.0.bqkv" in w:
        assert torch.equal(res["layers.0.bqkv"], w["layers.0.bqkv"])


def test_rotate_residual_keeps_a_tied_head_tied(make_tiny_checkpoint):
    """With all-ones norms and no lm_head, the head reads the rotated embed: still exact."""
    ck = load_checkpoint(make_tiny_checkpoint("llama", tie=True))
    cfg = ck.config
    w = {k: torch.ones_like(v) if k in norm_names(cfg) else v for k, v in ck.weights.items()}
    res = rotate_residual(cfg, w, hadamard(cfg.hidden_size, torch.Generator().manual_seed(0)))
    assert "lm_head" not in res
    assert rel(logits(cfg, res), logits(cfg, w)) < 1e-4


def test_rotate_keeps_dtype(make_tiny_checkpoint):
    ck = load_checkpoint(make_tiny_checkpoint("qwen2"))
    w = {k: v.to(torch.bfloat16) for k, v in ck.weights.items()}
    rot = rotate(ck.config, w)
    assert all(t.dtype == torch.bfloat16 for t in rot.values())
    err = rel(logits(ck.config, rot), logits(ck.config, w))
    assert err < 0.05, err  # bf16 rounding of the rotated weights only


def test_rotate_residual_refuses_unfolded_norms(make_tiny_checkpoint):
    ck = load_checkpoint(make_tiny_checkpoint("llama"))
    R = hadamard(ck.config.hidden_size)
    with pytest.raises(ValueError, match="fold_norms"):
        rotate_residual(ck.config, ck.weights, R)
    folded = fold_norms(ck.config, ck.weights)
    folded["layers.1.mlp_norm"] = folded["layers.1.mlp_norm"] * 1.5
    with pytest.raises(ValueError, match="layers.1.mlp_norm"):
        rotate_residual(ck.config, folded, R)


def test_rotations_are_checked(make_tiny_checkpoint):
    ck = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, folded = ck.config, fold_norms(ck.config, ck.weights)
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        rotate_residual(cfg, folded, hadamard(32))
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual(cfg, folded, 2 * hadamard(64))
    with pytest.raises(ValueError, match=r"\[16, 16\]"):
        rotate_heads(cfg, folded, hadamard(64))


def test_rotation_spreads_an_outlier_channel(make_tiny_checkpoint):
    """One residual channel 50x larger than the rest: max|x| / rms(x) per token is ~sqrt(H)
    before rotation and a small constant after (a Hadamard spreads it over every channel)."""
    ck = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, w = ck.config, dict(ck.weights)
    w["embed"] = w["embed"].clone()
    w["embed"][:, 7] *= 50

    def peak_to_rms(x):  # per token (row), averaged
        return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()

    before = peak_to_rms(w["embed"])
    after = peak_to_rms(rotate(cfg, w)["embed"])
    assert before > 0.8 * math.sqrt(cfg.hidden_size)
    print(f"peak/rms before {before:.2f}, after {after:.2f}")
    assert after < before / 2.5, (before, after)


# ----------------------------------------------------------------------------- matrices

HADAMARD_SIZES = [1, 2, 12, 16, 20, 28, 36, 52, 64, 80, 96, 128, 576, 896, 1536, 4096]


@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard_is_orthogonal_with_equal_entries(n):
    h = hadamard(n, torch.Generator().manual_seed(n))
    assert h.shape == (n, n) and h.dtype == torch.float32
    rows = torch.arange(n)
    if n > 1536:  # a full 4096^3 product takes seconds: check 256 random rows against all
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]
    gram = h[rows].double() @ h.double().T
    assert (gram - torch.eye(n, dtype=torch.float64)[rows]).abs().max() < 1e-6
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


def test_hadamard_constructions():
    assert hadamard_construction(576) == "paley2(q=17, order 36) x sylvester(16)"
    assert hadamard_construction(4096) == "sylvester(4096)"
    assert hadamard_construction(896) == "paley1(q=27, order 28) x sylvester(32)"  # GF(3^3)
    assert hadamard_construction(52).startswith("paley2(q=25")                   # GF(5^2)
    for n in (2048, 3584, 5120, 8192, 64, 128, 80):
        assert hadamard_construction(n) is not None, n
    for n in (0, 3, 6, 10, 92, 116):
        assert hadamard_construction(n) is None, n


def test_hadamard_random_signs_are_seeded():
    a = hadamard(64, torch.Generator().manual_seed(0))
    b = hadamard(64, torch.Generator().manual_seed(0))
    c = hadamard(64, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = hadamard(64)
    assert torch.equal(plain[0], torch.full((64,), 1 / 8))
    assert torch.equal(a.abs(), plain.abs())  # only row signs differ


@pytest.mark.parametrize("n", [6, 92])
def test_unsupported_orders(n):
    with pytest.raises(ValueError, match=f"n={n}.*random_orthogonal"):
        hadamard(n)
    with pytest.warns(UserWarning, match="random orthogonal"):
        r = rotation_matrix(n, torch.Generator().manual_seed(0))
    assert (r.double() @ r.double().T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-5


def test_hadamard_cache_is_not_mutated():
    a = hadamard(576, torch.Generator().manual_seed(0))
    a.mul_(3)
    assert torch.allclose(hadamard(576).abs(), torch.full((576, 576), 1 / 24))
