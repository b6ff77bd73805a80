"""QoQ smoothing (compiler/smooth.py): SmoothAttention and o_proj/down_proj input smoothing
and SmoothQuant's q/k/v and gate/up input smoothing keep the float model's logits, tie their
scales where the graph requires it (RoPE pairs, GQA groups, one scale per RMSNorm), shrink the
outliers they target, and the alpha search lowers the quantized error."""
import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.calibrate import CalibStats
from qcompile.compiler.capture import KVSpec
from qcompile.compiler.config import W4A8, W4A8_G128, W4A16_G128, W8A8
from qcompile.compiler.smooth import (ALPHAS, SMOOTHQUANT_ALPHAS, attention_lambdas,
                                      fake_quant_act, quantized_output_error, search_alpha,
                                      smooth_attention, smooth_linear, smooth_norm_inputs)
from qcompile.compiler.quantize import dequantize, quantize_weight
from qcompile.models.decoder import Decoder, rms_norm
from qcompile.models.loaders import load_checkpoint
from qcompile.models.rope import apply_rope, cos_sin, inv_freq

MODELS = ["llama", "qwen2"]
T = 32  # calibration / evaluation tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Everything here is tiny: intra-op threads only add pool overhead, which stalls badly on
    a loaded machine (seconds per search)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=MODELS)
def model(request, make_tiny_checkpoint):
    """(cfg, weights with injected outliers, tokens) of a tiny fp32 checkpoint."""
    ckpt = load_checkpoint(make_tiny_checkpoint(request.param))
    cfg = ckpt.config
    w = {k: v.clone() for k, v in ckpt.weights.items()}
    q, kv, d, inter = cfg.q_size, cfg.kv_size, cfg.head_dim, cfg.intermediate_size
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        # a key outlier: RoPE pair (3, 3 + D/2) of kv head 0
        w[p + "wqkv"][[q + 3, q + 3 + d // 2]] *= 8
        # an o_proj input outlier: channel 2 of kv head 1 (so of its query heads)
        w[p + "wqkv"][q + kv + d + 2] *= 20
        # down_proj input outliers: up channels 5 and 40
        w[p + "w_gate_up"][[inter + 5, inter + 40]] *= 20
    tokens = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(3))
    return cfg, w, tokens


def decoder_logits(cfg, weights, tokens):
    """The canonical Decoder on one prefill of `tokens` with an empty paged cache."""
    n = len(tokens)
    bs = 16
    nb = (n + bs - 1) // bs
    cache = KVSpec.of(cfg, "fp16", bs, torch.float32).empty(nb)
    i32 = torch.int32
    with torch.no_grad():
        logits, _ = Decoder(cfg, weights)(
            tokens, torch.arange(n), cache, torch.arange(nb, dtype=i32)[None],
            torch.tensor([0], dtype=i32), torch.tensor([0, n], dtype=i32), torch.arange(n))
    return logits


@torch.no_grad()
def forward_collect(cfg, w, tokens):
    """A plain causal forward of the decoder's layer functions that records what calibration
    records: (logits, CalibStats of every layer linear's input + key absmax, keys [L][T, Hkv, D])."""
    n, hq, hkv, d = len(tokens), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = hq // hkv
    stats, keys = CalibStats(), []

    def record(name, x):
        stats.samples[name] = x.clone()
        stats.absmax[name] = x.abs().amax(dim=0)

    h = F.embedding(tokens, w["embed"])
    cos, sin = cos_sin(torch.arange(n), inv_freq(cfg), torch.float32)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attn_norm"], cfg.rms_norm_eps)
        record(p + "wqkv", x)
        qkv = F.linear(x, w[p + "wqkv"], w.get(p + "bqkv"))
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(q.reshape(n, hq, d), cos, sin)
        k = apply_rope(k.reshape(n, hkv, d), cos, sin)
        v = v.reshape(n, hkv, d)
        keys.append(k)
        stats.key_absmax.append(k.abs().amax(dim=0).reshape(-1))
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1), is_causal=True)
        o = o.transpose(0, 1).reshape(n, cfg.q_size)
        record(p + "wo", o)
        h = h + F.linear(o, w[p + "wo"])
        x = rms_norm(h, w[p + "mlp_norm"], cfg.rms_norm_eps)
        record(p + "w_gate_up", x)
        gate, up = F.linear(x, w[p + "w_gate_up"]).split(cfg.intermediate_size, dim=-1)
        act = F.silu(gate) * up
        record(p + "w_down", act)
        h = h + F.linear(act, w[p + "w_down"])
    h = rms_norm(h, w["norm"], cfg.rms_norm_eps)
    return F.linear(h, w.get("lm_head", w["embed"])), stats, keys


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def row_scale(new, old):
    """Per-row factor c with new = c * old (least squares)."""
    return (new * old).sum(-1) / (old * old).sum(-1)


def snapshot(w):
    return {k: v.clone() for k, v in w.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"input tensor {k} was modified"


def test_reference_forward_matches_decoder(model):
    cfg, w, tokens = model
    logits, _, _ = forward_collect(cfg, w, tokens)
    assert rel(logits, decoder_logits(cfg, w, tokens)) < 1e-5


# ------------------------------------------------------------------------------ SmoothAttention


def test_smooth_attention_keeps_logits_for_any_positive_lambda(model):
    cfg, w, tokens = model
    before = snapshot(w)
    g = torch.Generator().manual_seed(0)
    key_absmax = [torch.rand(cfg.kv_size, generator=g) * 5 + 0.05 for _ in range(cfg.num_layers)]
    new = smooth_attention(cfg, w, key_absmax)
    assert_same(w, before)
    assert new is not w
    q, kv = cfg.q_size, cfg.kv_size
    for i in range(cfg.num_layers):
        old, got = w[f"layers.{i}.wqkv"], new[f"layers.{i}.wqkv"]
        assert not torch.allclose(got[:q], old[:q]) and not torch.allclose(got[q:q + kv],
                                                                           old[q:q + kv])
        assert torch.equal(got[q + kv:], old[q + kv:])  # v untouched
        if cfg.qkv_bias:
            assert not torch.allclose(new[f"layers.{i}.bqkv"], w[f"layers.{i}.bqkv"])
    ref = decoder_logits(cfg, w, tokens)
    assert rel(decoder_logits(cfg, new, tokens), ref) < 1e-5


def test_smooth_attention_lambdas_tied_on_rope_pairs_and_gqa(model):
    cfg, w, _ = model
    _, stats, _ = forward_collect(cfg, w, model[2])
    new = smooth_attention(cfg, w, stats.key_absmax, alpha=0.5)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, kv = cfg.q_size, cfg.kv_size
    for i in range(cfg.num_layers):
        lam = attention_lambdas(cfg, stats.key_absmax[i], 0.5)  # [Hkv, D]
        assert torch.equal(lam[:, : d // 2], lam[:, d // 2:])
        ka = stats.key_absmax[i].reshape(hkv, d)
        pair = torch.maximum(ka[:, : d // 2], ka[:, d // 2:])
        torch.testing.assert_close(lam[:, : d // 2], pair.sqrt())
        old, got = w[f"layers.{i}.wqkv"], new[f"layers.{i}.wqkv"]
        cq = row_scale(got[:q], old[:q]).reshape(hkv, hq // hkv, d)
        ck = row_scale(got[q:q + kv], old[q:q + kv]).reshape(hkv, d)
        # every query head of a kv head gets that kv head's lambda, keys get 1 / lambda
        torch.testing.assert_close(cq, lam[:, None, :].expand_as(cq), rtol=1e-5, atol=0)
        torch.testing.assert_close(ck, 1 / lam, rtol=1e-5, atol=0)
        if cfg.qkv_bias:
            b_old, b_new = w[f"layers.{i}.bqkv"], new[f"layers.{i}.bqkv"]
            torch.testing.assert_close(b_new[q:q + kv], b_old[q:q + kv] / lam.reshape(-1))


def test_smooth_attention_shrinks_key_outliers(model):
    cfg, w, tokens = model
    _, stats, _ = forward_collect(cfg, w, tokens)
    new = smooth_attention(cfg, w, stats.key_absmax)
    _, _, keys = forward_collect(cfg, new, tokens)
    for i in range(cfg.num_layers):
        before = stats.key_absmax[i].reshape(cfg.num_kv_heads, cfg.head_dim)
        after = keys[i].abs().amax(dim=0)
        r0 = before.amax(-1) / before.mean(-1)
        r1 = after.amax(-1) / after.mean(-1)
        assert (r1 < r0).all(), (r0, r1)
        assert r1[0] < 0.6 * r0[0]  # the head with the injected outlier pair


def test_smooth_attention_alpha_zero_is_identity(model):
    cfg, w, _ = model
    key_absmax = [torch.full((cfg.kv_size,), 3.0)] * cfg.num_layers
    new = smooth_attention(cfg, w, key_absmax, alpha=0.0)
    for k in w:
        assert torch.equal(new[k], w[k])


# ------------------------------------------------------------------- o_proj / down_proj smoothing


@pytest.mark.parametrize("scheme", [W4A8, W4A8_G128])
def test_smooth_linear_keeps_logits_and_reduces_error(model, scheme):
    cfg, w, tokens = model
    ref, stats, _ = forward_collect(cfg, w, tokens)
    before = snapshot(w)
    new, alphas, _ = smooth_linear(cfg, w, stats, scheme)
    assert_same(w, before)
    names = {f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in ("wo", "w_down")}
    assert set(alphas) == names
    assert all(a in ALPHAS for a in alphas.values()), alphas
    assert rel(decoder_logits(cfg, new, tokens), decoder_logits(cfg, w, tokens)) < 1e-5

    # the smoothed model's real linear inputs: quantized error of every linear goes down
    # against no smoothing (the injected outliers dominate per-token INT8)
    _, stats_new, _ = forward_collect(cfg, new, tokens)
    for name in names:
        x, x_new = stats.samples[name], stats_new.samples[name]
        w_old, w_new = w[name], new[name]
        exact = x @ w_old.T
        plain = fake_quant_act(x) @ dequantize(quantize_weight(w_old, scheme)).T
        smoothed = fake_quant_act(x_new) @ dequantize(quantize_weight(w_new, scheme)).T
        assert (exact - smoothed).norm() < (exact - plain).norm(), name


def test_smooth_linear_scales_tied_across_gqa_and_moved_into_producers(model):
    cfg, w, tokens = model
    _, stats, _ = forward_collect(cfg, w, tokens)
    new, _, _ = smooth_linear(cfg, w, stats, W4A8)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        # wo columns x s, s shared by the query heads of a kv head; v rows (and bias) / s
        s = row_scale(new[p + "wo"].T, w[p + "wo"].T).reshape(hkv, hq // hkv, d)
        torch.testing.assert_close(s, s[:, :1].expand_as(s), rtol=1e-6, atol=0)
        s_kv = s[:, 0].reshape(-1)
        cv = row_scale(new[p + "wqkv"][q + kv:], w[p + "wqkv"][q + kv:])
        torch.testing.assert_close(cv, 1 / s_kv, rtol=1e-5, atol=0)
        assert torch.equal(new[p + "wqkv"][:q + kv], w[p + "wqkv"][:q + kv])
        if cfg.qkv_bias:
            torch.testing.assert_close(new[p + "bqkv"][q + kv:], w[p + "bqkv"][q + kv:] / s_kv)
        # w_down columns x s, up rows / s, gate rows untouched
        s = row_scale(new[p + "w_down"].T, w[p + "w_down"].T)
        cu = row_scale(new[p + "w_gate_up"][inter:], w[p + "w_gate_up"][inter:])
        torch.testing.assert_close(cu, 1 / s, rtol=1e-5, atol=0)
        assert torch.equal(new[p + "w_gate_up"][:inter], w[p + "w_gate_up"][:inter])
        # the smoothed outlier channels shrank
        assert s[[5, 40]].min() > s.median()


# ------------------------------------------------------------ SmoothQuant (RMSNorm-fed linears)


NORM_OUTLIER = {"attn_norm": 1, "mlp_norm": 6}  # residual channel made an outlier per norm


@pytest.fixture
def norm_model(model):
    """`model` with an outlier channel in every RMSNorm output (the wqkv / w_gate_up inputs)."""
    cfg, w, tokens = model
    w = dict(w)
    for i in range(cfg.num_layers):
        for norm, c in NORM_OUTLIER.items():
            g = w[f"layers.{i}.{norm}"].clone()
            g[c] *= 30
            w[f"layers.{i}.{norm}"] = g
    return cfg, w, tokens


@pytest.mark.parametrize("scheme, grid", [(W8A8, SMOOTHQUANT_ALPHAS), (W4A8_G128, ALPHAS)])
def test_smooth_norm_inputs_keeps_logits_and_shrinks_outliers(norm_model, scheme, grid):
    cfg, w, tokens = norm_model
    _, stats, _ = forward_collect(cfg, w, tokens)
    before = snapshot(w)
    new, alphas, _ = smooth_norm_inputs(cfg, w, stats, scheme, grid)
    assert_same(w, before)
    names = {f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in ("wqkv", "w_gate_up")}
    assert set(alphas) == names and all(a in grid for a in alphas.values()), alphas
    assert rel(decoder_logits(cfg, new, tokens), decoder_logits(cfg, w, tokens)) < 1e-5
    changed = {k for k in w if not torch.equal(new[k], w[k])}
    assert changed <= names | {f"layers.{i}.{n}" for i in range(cfg.num_layers)
                               for n in ("attn_norm", "mlp_norm")}

    _, stats_new, _ = forward_collect(cfg, new, tokens)
    for name in names:
        x, x_new = stats.samples[name], stats_new.samples[name]
        # the injected outlier channel shrinks against the others (W8A8: by over half)
        peak = lambda t: (t.abs().amax(0).max() / t.abs().amax(0).median()).item()  # noqa: E731
        assert peak(x_new) < (0.5 if scheme == W8A8 else 1.0) * peak(x), name
        exact = x @ w[name].T
        plain = fake_quant_act(x) @ dequantize(quantize_weight(w[name], scheme)).T
        smoothed = fake_quant_act(x_new) @ dequantize(quantize_weight(new[name], scheme)).T
        assert (exact - smoothed).norm() < (exact - plain).norm(), name


def test_smooth_norm_inputs_one_scale_per_norm(norm_model):
    cfg, w, tokens = norm_model
    _, stats, _ = forward_collect(cfg, w, tokens)
    new, _, _ = smooth_norm_inputs(cfg, w, stats, W8A8)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm, lin in (("attn_norm", "wqkv"), ("mlp_norm", "w_gate_up")):
            s = w[p + norm] / new[p + norm]  # gain / s
            # every row of the fused linear (q, k and v; gate and up) gets the same columns x s
            torch.testing.assert_close(new[p + lin], w[p + lin] * s[None, :], rtol=1e-5,
                                       atol=0)
            assert s[NORM_OUTLIER[norm]] > 4 * s.median()


def test_smooth_keeps_dtypes(model):
    cfg, w, tokens = model
    _, stats, _ = forward_collect(cfg, w, tokens)
    half = {k: v.to(torch.bfloat16) for k, v in w.items()}
    out = smooth_attention(cfg, half, stats.key_absmax)
    out, _, _ = smooth_linear(cfg, out, stats, W8A8, alphas=(0.5,))
    out, _, _ = smooth_norm_inputs(cfg, out, stats, W8A8, alphas=(0.5,))
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in half.items()}


# ------------------------------------------------------------------------ synthetic alpha search


@pytest.mark.parametrize("scheme", [W4A8, W4A8_G128, W8A8, W4A16_G128])
def test_alpha_search_beats_no_smoothing_on_outlier_channels(scheme):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    x[:, [3, 77, 200]] *= 60  # outlier input channels
    w = torch.randn(128, 256, generator=g) / 16
    a, s, errors = search_alpha(x.abs().amax(0), w, x, scheme)
    assert a in ALPHAS and set(errors) == set(ALPHAS) | {None}  # None: no smoothing (s = 1)
    assert errors[a] == min(errors.values())
    assert a > 0
    assert errors[a] < errors[0.0]
    no_smoothing = quantized_output_error(x, w, torch.ones(256), scheme)
    assert errors[a] < 0.5 * no_smoothing
    torch.testing.assert_close(torch.tensor(errors[a]),
                               torch.tensor(quantized_output_error(x, w, s, scheme)))
