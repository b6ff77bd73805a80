"""QoQ channel reordering (float outputs unchanged, perms sorted by salience) and weight
clipping (searched ratio, range, error no worse than no clipping, every scheme)."""
import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.calibrate import CalibStats
from qcompile.compiler.capture import KVSpec
from qcompile.compiler.clip import (DEFAULT_RATIOS, _clip_many, _fake_quant_clipped, _ratios,
                                    clip_weight, clip_weights, fake_quant_weight, row_errors,
                                    search_clip_ratio)
from qcompile.compiler.config import W4A8, W4A8_G64, W4A8_G128, W4A16_G128, W8A8
from qcompile.compiler.quantize import dequantize, quantize_weight
from qcompile.compiler.reorder import permute_stats, reorder_channels
from qcompile.models.decoder import Decoder
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.ops.quant import quant_a8_ref

SCHEMES = [W4A8, W4A8_G128, W4A8_G64, W8A8, W4A16_G128]
LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


def _in_features(cfg, lin):
    return {"wqkv": cfg.hidden_size, "wo": cfg.q_size, "w_gate_up": cfg.hidden_size,
            "w_down": cfg.intermediate_size}[lin]


def _stats(cfg, rows=64, seed=0):
    """Synthetic calibration statistics: heavy-tailed rows with a few salient channels."""
    g = torch.Generator().manual_seed(seed)
    st = CalibStats()
    for i in range(cfg.num_layers):
        for lin in LINEARS:
            k = _in_features(cfg, lin)
            scale = torch.rand(k, generator=g).pow(4).mul(8).add(0.2)  # a few salient channels
            x = torch.randn(rows, k, generator=g) * scale
            st.samples[f"layers.{i}.{lin}"] = x
            st.absmax[f"layers.{i}.{lin}"] = x.abs().amax(0)
    return st


def _logits(cfg, weights):
    dec = Decoder(cfg, weights)
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    i32 = torch.int32
    with torch.no_grad():
        logits, _ = dec(ids, torch.arange(24), KVSpec.of(cfg, "fp16", 16, torch.float32).empty(4),
                        torch.tensor([[0, 1]], dtype=i32), torch.tensor([0], dtype=i32),
                        torch.tensor([0, 24], dtype=i32), torch.arange(24))
    return logits


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpt(request, make_tiny_checkpoint):
    return load_checkpoint(make_tiny_checkpoint(request.param))


# ---------------------------------------------------------------------------------- reorder

def test_reorder_keeps_logits(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    st = _stats(cfg)
    new, perms = reorder_channels(cfg, w, st)
    assert set(perms) == {f"layers.{i}.{n}" for i in range(cfg.num_layers)
                          for n in ("w_down", "wo")}
    for i in range(cfg.num_layers):  # something really moved
        assert not torch.equal(new[f"layers.{i}.w_down"], w[f"layers.{i}.w_down"])
        assert not torch.equal(new[f"layers.{i}.wo"], w[f"layers.{i}.wo"])
    if cfg.qkv_bias:
        assert not torch.equal(new["layers.0.bqkv"], w["layers.0.bqkv"])
    ref, got = _logits(cfg, w), _logits(cfg, new)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"reordering changed the logits: relative error {rel:.2e}"
    assert (got - ref).abs().max() < 1e-4
    # only the MLP is reordered when the head reordering is off
    new2, perms2 = reorder_channels(cfg, w, st, heads=False)
    assert set(perms2) == {f"layers.{i}.w_down" for i in range(cfg.num_layers)}
    assert new2["layers.0.wo"] is w["layers.0.wo"]
    assert ((_logits(cfg, new2) - ref).norm() / ref.norm()) < 1e-5


def test_perms_sorted_by_salience(ckpt):
    cfg = ckpt.config
    st = _stats(cfg, seed=3)
    _, perms = reorder_channels(cfg, ckpt.weights, st)
    d, grp = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    for i in range(cfg.num_layers):
        p = perms[f"layers.{i}.w_down"]
        assert torch.equal(p.sort().values, torch.arange(cfg.intermediate_size))
        a = st.absmax[f"layers.{i}.w_down"][p]
        assert (a[:-1] >= a[1:]).all()
        p = perms[f"layers.{i}.wo"]
        assert torch.equal(p.sort().values, torch.arange(cfg.q_size))
        ph = p.view(cfg.num_heads, d) - torch.arange(cfg.num_heads)[:, None] * d
        assert torch.equal(ph.sort(dim=1).values, torch.arange(d).expand(cfg.num_heads, d))
        sal = st.absmax[f"layers.{i}.wo"].view(cfg.num_kv_heads, grp, d).amax(1)
        for h in range(cfg.num_heads):
            assert torch.equal(ph[h], ph[h // grp * grp])  # tied across the kv group
            s = sal[h // grp][ph[h]]
            assert (s[:-1] >= s[1:]).all()


def test_reorder_only_where_it_lowers_the_quantized_error(ckpt):
    """Layer 0: two massive activation channels whose w_down weights have opposite signs sit in
    different groups; clustering them doubles their group's range (hurts: kept in order).
    Layer 1: one weight-outlier column per group spoils both groups' steps; clustering the
    salient activation channels away from them helps (reordered)."""
    cfg, g = ckpt.config, torch.Generator().manual_seed(5)
    w, st = dict(ckpt.weights), _stats(cfg)
    n, k = cfg.hidden_size, cfg.intermediate_size  # g64: groups [0, 64), [64, 96)
    x_scale = {0: torch.ones(k), 1: torch.ones(k)}
    w_down = {i: torch.randn(n, k, generator=g) * 0.02 for i in (0, 1)}
    x_scale[0][[10, 70]] = 100.0
    w_down[0][:, 10], w_down[0][:, 70] = 0.05, -0.05
    x_scale[1][[30, 80]] = 50.0
    x_scale[1][[1, 65]] = 0.1
    w_down[1][:, [1, 65]] = torch.randn(n, 2, generator=g).sign()
    for i in (0, 1):
        name = f"layers.{i}.w_down"
        x = torch.randn(256, k, generator=g) * x_scale[i]
        st.samples[name], st.absmax[name], w[name] = x, x.abs().amax(0), w_down[i]
    _, always = reorder_channels(cfg, w, st, heads=False)
    new, perms = reorder_channels(cfg, w, st, W4A8_G64, heads=False)
    assert set(always) == {"layers.0.w_down", "layers.1.w_down"}
    assert set(perms) == {"layers.1.w_down"}
    assert new["layers.0.w_down"] is w["layers.0.w_down"]
    ref = _logits(cfg, w)
    assert ((_logits(cfg, new) - ref).norm() / ref.norm()) < 1e-5


def test_permute_stats_matches_reordered_activations(ckpt):
    cfg, w = ckpt.config, ckpt.weights
    st = _stats(cfg)
    new, perms = reorder_channels(cfg, w, st)
    x = torch.randn(16, cfg.hidden_size)

    def down_input(weights):
        gate, up = F.linear(x, weights["layers.0.w_gate_up"]).split(cfg.intermediate_size, -1)
        return F.silu(gate) * up

    p = perms["layers.0.w_down"]
    assert torch.allclose(down_input(new), down_input(w)[:, p])
    for name, x in st.samples.items():  # X^T X of the samples
        st.xtx[name] = (x.T @ x).double()
    pst = permute_stats(st, perms)
    assert torch.equal(pst.absmax["layers.0.w_down"], st.absmax["layers.0.w_down"][p])
    x_new = st.samples["layers.0.w_down"][:, p]
    assert torch.allclose(pst.xtx["layers.0.w_down"], (x_new.T @ x_new).double())
    p = perms["layers.0.wo"]
    assert torch.equal(pst.samples["layers.0.wo"], st.samples["layers.0.wo"][:, p])
    assert pst.samples["layers.0.wqkv"] is st.samples["layers.0.wqkv"]


# ------------------------------------------------------------------------------------- clip

def _out_err(w, x, scheme, wc=None):
    """|| X W^T - Q_a(X) Q_w(Wc)^T ||^2 (Wc: the clipped W, default W), computed directly from
    the runtime's quantizers (Q_a the identity for weight-only schemes)."""
    xq, s, _ = quant_a8_ref(x)
    xa = x if scheme.act_bits >= 16 else xq.float() * s
    wq = dequantize(quantize_weight(w if wc is None else wc, scheme))
    return (x @ w.T - xa @ wq.T).pow(2).sum().item()


@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last group
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_fast_fake_quant_is_rtn_of_clipped(scheme, k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, k, generator=g)
    w[1, 7] = 25.0
    w[2] = 0.0
    w[3] = w[3].abs()
    w[4, :64] = 0.0
    rt = _ratios(DEFAULT_RATIOS)
    fast = _fake_quant_clipped(w, rt, scheme)
    for j, r in enumerate(DEFAULT_RATIOS):
        ref = dequantize(quantize_weight(clip_weight(w, r, scheme), scheme))
        assert torch.equal(fast[j], ref), (scheme.name, r)
    assert torch.equal(_clip_many(w, rt, scheme)[0], w)  # r = 1 leaves the weights alone
    assert torch.equal(fake_quant_weight(w, scheme), dequantize(quantize_weight(w, scheme)))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_clip_helps_with_weight_outliers(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    rows = torch.arange(0, 64, 4)
    w[rows, torch.randint(0, 256, (16,), generator=g)] = 0.6  # a few outlier weights
    x = torch.randn(256, 256, generator=g)
    r, errs = search_clip_ratio(w, x, scheme)
    assert r in DEFAULT_RATIOS
    e1, er = _out_err(w, x, scheme), _out_err(w, x, scheme, clip_weight(w, r, scheme))
    assert er <= e1 * (1 + 1e-6)
    # the search's error term that depends on the ratio runs in bfloat16 (row_errors)
    assert errs[DEFAULT_RATIOS.index(r)].item() == pytest.approx(er, rel=1e-3)
    assert errs[0].item() == pytest.approx(e1, rel=1e-3)
    if scheme.weight_bits == 4:
        assert r < 1.0, f"{scheme.name}: clipping should pay off with outliers, errors {errs}"
        assert er < e1
        if scheme.group_size is None:  # per channel, an outlier sets its whole row's step
            best = row_errors(w, x, scheme).argmin(dim=0)
            assert (best[rows] > 0).all(), "every row with an outlier should be clipped"


def _row_ratios(old, got, scheme):
    """The grid ratio each row of `got` was clipped at (asserting there is one)."""
    cands = torch.stack([clip_weight(old, r, scheme) for r in DEFAULT_RATIOS])  # [R, n, K]
    hit = (cands == got[None]).all(dim=2)  # [R, n]
    assert hit.any(dim=0).all(), "a row is not the clip of its weights at a grid ratio"
    return torch.tensor(DEFAULT_RATIOS)[hit.float().argmax(dim=0)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_clip_weights_every_scheme(ckpt, scheme):
    cfg, w = ckpt.config, ckpt.weights
    st = _stats(cfg)
    by_tensor, chosen_t = clip_weights(cfg, w, st, scheme, granularity="tensor")
    by_row, chosen_r = clip_weights(cfg, w, st, scheme)  # default: a ratio per output channel
    blocks = {"wqkv": [("q", 0, cfg.q_size), ("k", cfg.q_size, cfg.q_size + cfg.kv_size),
                       ("v", cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)],
              "w_gate_up": [("gate", 0, cfg.intermediate_size),
                            ("up", cfg.intermediate_size, 2 * cfg.intermediate_size)]}
    expected = set()
    for i in range(cfg.num_layers):
        for lin in LINEARS:
            name = f"layers.{i}.{lin}"
            old, x = w[name], st.samples[name]
            for got in (by_tensor[name], by_row[name]):
                assert got.shape == old.shape and got.dtype == old.dtype
                assert (got >= old.amin(1, keepdim=True)).all()
                assert (got <= old.amax(1, keepdim=True)).all()
                assert (got.abs() <= old.abs()).all()  # values only move toward zero
            for suffix, lo, hi in blocks.get(lin, [("", 0, old.shape[0])]):
                key = f"{name}.{suffix}" if suffix else name
                expected.add(key)
                r = chosen_t[key]
                assert r in DEFAULT_RATIOS
                assert torch.equal(by_tensor[name][lo:hi], clip_weight(old[lo:hi], r, scheme))
                rows = _row_ratios(old[lo:hi], by_row[name][lo:hi], scheme)
                assert chosen_r[key] == pytest.approx(rows.mean().item(), abs=1e-4)
                e_none = _out_err(old[lo:hi], x, scheme)
                e_t = _out_err(old[lo:hi], x, scheme, by_tensor[name][lo:hi])
                e_r = _out_err(old[lo:hi], x, scheme, by_row[name][lo:hi])
                assert e_r <= e_t * (1 + 1e-5) and e_t <= e_none * (1 + 1e-5)
    assert set(chosen_t) == set(chosen_r) == expected
    for name in w:  # norms, embeddings, biases and the head are not touched
        if name.rsplit(".", 1)[-1] not in LINEARS:
            assert by_row[name] is w[name] and by_tensor[name] is w[name]


def test_clip_ratio_validation():
    with pytest.raises(ValueError, match="ratios"):
        search_clip_ratio(torch.randn(4, 8), torch.randn(3, 8), W4A8, ratios=(1.0, 1.2))
    with pytest.raises(ValueError, match="ratios"):
        search_clip_ratio(torch.randn(4, 8), torch.randn(3, 8), W4A8, ratios=())
    with pytest.raises(ValueError, match="granularity"):
        clip_weights(None, {}, CalibStats(), W4A8, granularity="group")
