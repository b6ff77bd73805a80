"""Calibration statistics from the float graph: per-linear input absmax and samples, and
per-layer key absmax after RoPE, checked against a direct computation."""
import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.calibrate import calibrate, calibration_sequences
from qcompile.compiler.capture import KVSpec, capture
from qcompile.models.decoder import Decoder, rms_norm
from qcompile.models.loaders import load_checkpoint
from qcompile.models.rope import apply_rope, cos_sin, inv_freq
from qcompile.passes.base import Lowering, run_pass
from qcompile.passes.canonicalize import canonicalize


def test_stats_match_a_direct_forward(make_tiny_checkpoint):
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, w = ckpt.config, ckpt.weights
    spec = KVSpec.of(cfg, "fp16", 16, torch.float32)
    low = Lowering.from_exported(capture(Decoder(cfg, w), spec))
    run_pass(canonicalize, low)
    seqs = [list(range(5, 45)), list(range(50, 70))]
    stats = calibrate(low, seqs, batch=2, rows_per_batch=1000, progress=False)
    # layer 0 by hand: the wqkv input is the normed embedding; keys after RoPE
    toks = torch.tensor(seqs[0] + seqs[1])
    pos = torch.cat([torch.arange(40), torch.arange(20)])
    x = rms_norm(F.embedding(toks, w["embed"]), w["layers.0.attn_norm"], cfg.rms_norm_eps)
    assert torch.allclose(stats.absmax["layers.0.wqkv"], x.abs().amax(0), rtol=1e-5)
    assert stats.samples["layers.0.wqkv"].shape == (60, cfg.hidden_size)
    k = (x @ w["layers.0.wqkv"].T)[:, cfg.q_size:cfg.q_size + cfg.kv_size]
    cos, sin = cos_sin(pos, inv_freq(cfg), torch.float32)
    k = apply_rope(k.reshape(60, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    assert torch.allclose(stats.key_absmax[0], k.reshape(60, -1).abs().amax(0), rtol=1e-5)
    assert stats.key_tokens == 60 and stats.key_mean.shape == (cfg.num_layers, cfg.kv_size)
    assert torch.allclose(stats.key_mean[0], k.reshape(60, -1).mean(0), atol=1e-5)
    assert len(stats.key_absmax) == cfg.num_layers
    assert {f"layers.{i}.{n}" for i in range(cfg.num_layers)
            for n in ("wqkv", "wo", "w_gate_up", "w_down")} <= set(stats.absmax)


def test_eager_float_graph_matches_the_captured_graph(make_tiny_checkpoint):
    """QoQ calibrates the decoder eagerly (`FloatGraph`, no capture); its statistics are those
    of the captured, canonicalized graph: absmax, the same sampled rows, X^T X, keys."""
    from qcompile.compiler.calibrate import FloatGraph
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, w = ckpt.config, {k: v.float() for k, v in ckpt.weights.items()}
    low = Lowering.from_exported(capture(Decoder(cfg, w), KVSpec.of(cfg, "fp16", 16,
                                                                     torch.float32)))
    run_pass(canonicalize, low)
    seqs = [list(range(5, 45)), list(range(50, 70)), list(range(3, 60))]
    want = calibrate(low, seqs, batch=2, hessian=True, progress=False)
    got = FloatGraph(cfg).stats(w, seqs, progress=False, hessian=True, batch=2)
    assert set(got.absmax) == set(want.absmax) == set(got.xtx) and len(got.absmax) == 9
    for name in want.absmax:
        for field in ("absmax", "samples", "xtx"):
            a, b = getattr(got, field)[name], getattr(want, field)[name]
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name,
                                                                                       field)
        assert got.tokens[name] == want.tokens[name]
    assert got.key_tokens == want.key_tokens == 117
    assert torch.allclose(got.key_mean, want.key_mean, atol=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(got.key_absmax, want.key_absmax))


def test_calibration_text_is_disjoint_from_eval(tiny_tokenizer):
    from qcompile.runtime.eval import eval_windows
    cal = calibration_sequences(tiny_tokenizer, 4, 64)
    ev = eval_windows(tiny_tokenizer, 2, 64)
    assert len(cal) == 4 and all(len(s) == 64 for s in cal)
    assert not {tuple(s) for s in cal} & {tuple(s) for s in ev}


def test_scaled_stats_match_a_recalibration_of_the_smoothed_model(make_tiny_checkpoint):
    """QoQ calibrates once: the statistics after smoothing (SmoothQuant into the norms, then
    o_proj / down_proj) are the first calibration's scaled by the returned s, equal to those
    of a second forward through the smoothed model (absmax, the same sampled rows, X^T X)."""
    from qcompile.compiler.calibrate import FloatGraph
    from qcompile.compiler.config import W4A8
    from qcompile.compiler.smooth import smooth_linear, smooth_norm_inputs
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    cfg, w = ckpt.config, {k: v.float() for k, v in ckpt.weights.items()}
    seqs = [list(range(5, 69)), list(range(70, 134))]
    graph = FloatGraph(cfg)
    st = graph.stats(w, seqs, progress=False, hessian=True)
    new, _, scales = smooth_norm_inputs(cfg, w, st, W4A8, (0.5,))
    new, _, more = smooth_linear(cfg, new, st, W4A8)
    scales.update(more)
    assert set(scales) == {f"layers.{i}.{n}" for i in range(cfg.num_layers)
                           for n in ("wqkv", "w_gate_up", "wo", "w_down")}
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    got, want = st.scaled(scales), graph.stats(new, seqs, progress=False, hessian=True)
    for name in scales:
        for field in ("absmax", "samples", "xtx"):
            a, b = getattr(got, field)[name], getattr(want, field)[name]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max())), (name,
                                                                                       field)
    assert torch.allclose(got.key_mean, want.key_mean, atol=1e-5)
    assert got.absmax["lm_head"] is st.absmax["lm_head"]  # not scaled: shared


def test_prefill_attention_matches_the_paged_reference():
    """Calibration's causal-SDPA attention is the reference op's function on prefills over an
    empty cache: GQA (4 query heads on 2 kv heads), three sequences of uneven lengths."""
    from qcompile.compiler.calibrate import _prefill_attention
    from qcompile.runtime.ops.attention import paged_attention_ref
    from qcompile.runtime.ops.kv import CODECS
    g = torch.Generator().manual_seed(0)
    lens, hq, hkv, d = [5, 17, 1], 4, 2, 8
    t = sum(lens)
    q = torch.randn(t, hq, d, generator=g)
    k, v = (torch.randn(t, hkv, d, generator=g) for _ in range(2))
    kv_new = torch.stack([CODECS["fp16"][0](k), CODECS["fp16"][0](v)])  # [2, T, R]
    cache = torch.zeros(1, 2, 4, 16, kv_new.shape[-1], dtype=torch.uint8)[0]
    tables = torch.tensor([[0, 0], [1, 2], [3, 0]], dtype=torch.int32)
    ctx = torch.zeros(3, dtype=torch.int32)
    qs = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    args = (q, kv_new, cache, tables, ctx, qs, hkv, d ** -0.5)
    ref = paged_attention_ref("fp16", *args)
    assert torch.allclose(_prefill_attention(*args), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty caches"):
        _prefill_attention(q, kv_new, cache, tables, ctx + 1, qs, hkv, d ** -0.5)


def test_calibration_routes_attention_through_the_prefill_path(make_tiny_checkpoint,
                                                               monkeypatch):
    """Every layer's attention takes `_prefill_attention` and the statistics after it (the wo
    input) equal those through the reference op."""
    import qcompile.compiler.calibrate as calib
    from qcompile.runtime.ops.attention import paged_attention_ref
    ckpt = load_checkpoint(make_tiny_checkpoint("llama"))
    w = {k: v.float() for k, v in ckpt.weights.items()}
    graph, seqs = calib.FloatGraph(ckpt.config), [list(range(5, 45)), list(range(50, 70))]
    fast = graph.stats(w, seqs, progress=False)
    calls = []

    def reference(*args):
        calls.append(1)
        return paged_attention_ref("fp16", *args)

    monkeypatch.setattr(calib, "_prefill_attention", reference)
    ref = graph.stats(w, seqs, progress=False)
    assert len(calls) == ckpt.config.num_layers  # one batch: one call per layer
    for i in range(ckpt.config.num_layers):
        name = f"layers.{i}.wo"
        assert torch.allclose(fast.absmax[name], ref.absmax[name], rtol=1e-5, atol=1e-6)
        assert torch.allclose(fast.samples[name], ref.samples[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [7, 576, 1000])
def test_add_gram_is_the_full_product(k):
    """X^T X from the blocks above the diagonal, mirrored: the full product (accumulated)."""
    from qcompile.compiler.calibrate import add_gram
    g = torch.Generator().manual_seed(k)
    xs = [torch.randn(300, k, generator=g) for _ in range(2)]
    acc = torch.zeros(k, k)
    for x in xs:
        add_gram(acc, x)
    want = xs[0].T @ xs[0] + xs[1].T @ xs[1]
    if k >= 384:  # blocked: the lower blocks are the upper ones mirrored
        assert torch.equal(acc, acc.T)
    assert torch.allclose(acc, want, rtol=1e-5, atol=1e-4)
