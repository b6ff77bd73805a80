"""FMPQ's compiler side (compiler/fmpq.py): channel orders from calibrated magnitudes, the
global budget of 8-bit blocks, and the permutations folded into the weights, which must leave
the model's logits unchanged."""
import pytest
import torch

from qcompile.compiler.fmpq import (allocate_blocks, block_errors, channel_order,
                                    permutation_matrix, permute_intermediate, permute_residual)
from qcompile.compiler.rotate import fold_norms
from qcompile.models.loaders import load_checkpoint

from test_rotate import assert_same, logits, rel, snapshot  # the same logits oracle


@pytest.fixture(scope="module")
def ckpt(make_tiny_checkpoint):
    return load_checkpoint(make_tiny_checkpoint("llama"))


def test_channel_order_puts_outliers_first():
    mag = torch.tensor([0.5, 9.0, 0.1, 3.0, 3.0])
    assert channel_order(mag).tolist() == [1, 3, 4, 0, 2]  # stable among the ties
    x = torch.randn(4, 5)
    assert torch.equal(x @ permutation_matrix(channel_order(mag)), x[:, channel_order(mag)])


def test_block_errors_and_the_budget():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, :8] *= 40  # outlier channels, sorted first
    e4, e8 = block_errors(x, 64)
    assert e4.shape == (4,) and (e4 > e8).all()
    assert e4[0] > 10 * e4[1:].max()  # the outlier block is the costly one
    quiet = torch.randn(64, 128, generator=g)
    n8 = allocate_blocks({"a": (e4, e8), "b": block_errors(quiet, 64)}, fraction=1 / 6)
    assert n8 == {"a": 1, "b": 0}  # one block of six, where int4 costs most
    assert allocate_blocks({"a": (e4, e8)}, 0.0) == {"a": 0}
    assert allocate_blocks({"a": (e4, e8)}, 1.0) == {"a": 4}
    with pytest.raises(ValueError, match="do not divide"):
        block_errors(x, 96)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        allocate_blocks({"a": (e4, e8)}, 1.5)


def test_permutations_keep_logits(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    before = snapshot(w)
    ref = logits(cfg, w)
    g = torch.Generator().manual_seed(1)
    folded = fold_norms(cfg, w)
    stream = permute_residual(cfg, folded, torch.randperm(cfg.hidden_size, generator=g))
    inter = {i: torch.randperm(cfg.intermediate_size, generator=g)
             for i in range(cfg.num_layers)}
    both = permute_intermediate(cfg, stream, inter)
    assert_same(w, before)
    assert not torch.equal(both["layers.0.w_down"], folded["layers.0.w_down"])
    err = rel(logits(cfg, both), ref)
    assert err < 1e-5, f"the FMPQ permutations changed the logits: relative error {err:.2e}"
    with pytest.raises(ValueError, match="not a permutation"):
        permute_intermediate(cfg, folded, {0: torch.zeros(cfg.intermediate_size,
                                                          dtype=torch.long)})


def test_block_errors_weigh_channels_by_their_columns():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    plain = block_errors(x, 64)
    w = torch.ones(3, 128)
    w[:, 64:] = 10.0  # the second block's channels feed ten times larger columns
    weighted = block_errors(x, 64, w)
    assert torch.allclose(weighted[0], plain[0] * torch.tensor([3.0, 300.0]), rtol=1e-5)


def test_relative_block_errors_divide_by_the_output_energy():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    e4, e8 = block_errors(x, 32, w)
    r4, r8 = block_errors(x, 32, w, relative=True)
    energy = (x @ w.T).pow(2).sum()
    assert torch.allclose(r4 * energy, e4, rtol=1e-5) and torch.allclose(r8 * energy, e8, rtol=1e-5)
    with pytest.raises(ValueError, match="need the linear's weight"):
        block_errors(x, 32, relative=True)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q / k / v biases
def test_head_permutation_keeps_logits(make_tiny_checkpoint, model_type):
    from qcompile.compiler.fmpq import head_order, permute_heads
    ck = load_checkpoint(make_tiny_checkpoint(model_type))
    cfg, w = ck.config, ck.weights
    ref = logits(cfg, w)
    g = torch.Generator().manual_seed(5)
    perms = {}
    for i in range(cfg.num_layers):
        mag = torch.rand(cfg.num_heads * cfg.head_dim, generator=g)
        kv_perm, q_perm = head_order(cfg, mag)
        heads = mag.reshape(cfg.num_heads, cfg.head_dim).amax(1)[q_perm]
        group = cfg.num_heads // cfg.num_kv_heads
        assert (heads.reshape(-1, group).amax(1).diff() <= 0).all()  # loudest groups first
        perms[i] = (kv_perm, q_perm)
    moved = permute_heads(cfg, w, perms)
    assert any(not torch.equal(moved[f"layers.{i}.wo"], w[f"layers.{i}.wo"])
               for i in range(cfg.num_layers))
    err = rel(logits(cfg, moved), ref)
    assert err < 1e-5, f"the head permutation changed the logits: relative error {err:.2e}"
    bad = torch.arange(cfg.num_heads).flip(0)
    if cfg.num_kv_heads > 1:
        with pytest.raises(ValueError, match="keep each q head"):
            permute_heads(cfg, w, {0: (torch.arange(cfg.num_kv_heads), bad)})


def test_block_rotation_stats_are_the_rotated_inputs():
    """rotate_block_stats: the samples and X^T X of x B (B = diag(H, H, ..)) from those of x,
    exactly as a forward over the rotated input would record them."""
    from qcompile.compiler.fmpq import block_rotation, rotate_block_stats, rotate_blocks
    from qcompile.compiler.calibrate import CalibStats
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 96, generator=g) * torch.linspace(0.1, 5, 96)
    stats = CalibStats(absmax={"a": x.abs().amax(0)}, samples={"a": x.clone()},
                       xtx={"a": x.T @ x}, tokens={"a": 40})
    h = block_rotation(32)
    new = rotate_block_stats(stats, {"a": h})
    xr = rotate_blocks(x, h)
    assert torch.allclose(new.samples["a"], xr, atol=1e-5)
    assert torch.allclose(new.xtx["a"], xr.T @ xr, rtol=1e-4, atol=1e-3)
    assert torch.allclose(new.absmax["a"], xr.abs().amax(0), atol=1e-5)
    assert torch.equal(stats.samples["a"], x)  # the input statistics are left as they were
    bdiag = torch.block_diag(h, h, h)
    assert torch.allclose(xr, x @ bdiag, atol=1e-5)


def test_clip_search_saturates_rare_peaks_and_keeps_flat_blocks():
    """choose_clip: rows whose 4-bit blocks hold a rare large value take a clip below 1000
    (the peak saturates, the rest get finer steps); flat rows keep 1000 (no clip); every
    block 8-bit needs none."""
    from qcompile.compiler.fmpq import CLIP_CANDIDATES, choose_clip
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=g)
    peaky = torch.randn(256, 128, generator=g)
    flat = torch.sign(torch.randn(256, 128, generator=g))  # every |x| equal: clipping only hurts
    assert choose_clip(peaky, w, 0, 64) < 1000
    assert choose_clip(peaky, w, 0, 64) in CLIP_CANDIDATES
    assert choose_clip(flat, w, 0, 64) == 1000
    assert choose_clip(peaky, w, 2, 64) == 1000
