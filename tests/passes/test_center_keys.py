"""passes/center_keys.py: keys minus their calibrated mean before the KV encode; exact with a
float cache, centered on calibration data, a smaller int4 error when keys carry an offset."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from test_rewrite_attention import _lowered, _prompts, _serve

from qcompile.compiler.calibrate import calibrate
from qcompile.passes.base import call_targets, run_pass
from qcompile.passes.center_keys import KEY_MEAN, center_keys
from qcompile.passes.rotate_kv import rotate_kv
from qcompile.runtime.ops import KV_ENCODE_OPS
from qcompile.runtime.ops.kv import decode_float, decode_int4

aten = torch.ops.aten
SUB = aten.sub.Tensor
# Relative L2 of the logits, centered against plain graph, fp32 float cache: rounding only.
FLOAT_RTOL = 1e-5


def _seqs(vocab, n=4, length=24, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def _key_mean(ckpt, decoder_lowering, seqs):
    return calibrate(_lowered(ckpt, decoder_lowering, torch.float32, "fp16"), seqs,
                     linears=False, progress=False).key_mean


def _key_offset(ckpt, offset=4.0):
    """The qwen2 tiny model with offsets of `offset` x N(0, 1), a fixed draw per channel, added
    to the key biases: keys sit away from zero, unevenly across the head dim, on every token
    (RoPE turns them with position, slowly in the low-frequency pairs). A uniform offset
    would not do: the int4 zero point of each (token, head) absorbs it."""
    cfg, w = ckpt.config, dict(ckpt.weights)
    gen = torch.Generator().manual_seed(0)
    for i in range(cfg.num_layers):
        b = w[f"layers.{i}.bqkv"].clone()
        b[cfg.q_size:cfg.q_size + cfg.kv_size] += offset * torch.randn(cfg.kv_size, generator=gen)
        w[f"layers.{i}.bqkv"] = b
    return dataclasses.replace(ckpt, weights=w, source=f"{ckpt.source}#key-offset")


@pytest.mark.parametrize("rotate", [False, True])
def test_centering_is_exact_with_a_float_cache(tiny_llama, decoder_lowering, rotate):
    """fp32, float cache: same logits (alone and under rotate_kv); the records hold k - mu
    (rotated: (k - mu) H); one mean weight, one select and one sub per encode."""
    cfg, dt = tiny_llama.config, torch.float32
    mu = _key_mean(tiny_llama, decoder_lowering, _seqs(cfg.vocab_size))
    ref_low = _lowered(tiny_llama, decoder_lowering, dt, "fp16")
    low = _lowered(tiny_llama, decoder_lowering, dt, "fp16")
    n_sub = Counter(call_targets(low.gm))[SUB]

    res = run_pass(center_keys, low, mu)
    if rotate:
        run_pass(rotate_kv, ref_low)
        run_pass(rotate_kv, low)

    assert res.matches == cfg.num_layers
    ops = Counter(call_targets(low.gm))
    assert ops[SUB] - n_sub == cfg.num_layers and ops[aten.select.int] >= cfg.num_layers
    assert low.weights[KEY_MEAN].shape == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    subs = [n for n in low.gm.graph.nodes if n.target is SUB and n.args[1].target is
            aten.select.int and n.args[1].args[0].name == KEY_MEAN]
    assert [s.args[1].args[2] for s in subs] == list(range(cfg.num_layers))
    prompts = _prompts(cfg.vocab_size)
    ref, ref_kv = _serve(ref_low, cfg, "fp16", dt, prompts, steps=3)
    out, kv = _serve(low, cfg, "fp16", dt, prompts, steps=3)
    assert (out - ref).norm() / ref.norm() < FLOAT_RTOL
    k, k_c = (decode_float(x[1, 0], cfg.num_kv_heads, cfg.head_dim, dt) for x in (ref_kv, kv))
    want = mu[1].reshape(cfg.num_kv_heads, cfg.head_dim)  # layer 1
    if rotate:
        want = want @ low.weights["kv_rotation"]
    assert torch.allclose(k_c, k - want, atol=1e-5)


def test_centered_keys_have_zero_mean_on_calibration_data(tiny_qwen2, decoder_lowering):
    ckpt = _key_offset(tiny_qwen2)
    seqs = _seqs(ckpt.config.vocab_size)
    mu = _key_mean(ckpt, decoder_lowering, seqs)
    low = _lowered(ckpt, decoder_lowering, torch.float32, "fp16")
    run_pass(center_keys, low, mu)
    after = calibrate(low, seqs, linears=False, progress=False).key_mean
    assert mu.abs().amax() > 1.0  # the offset shows in the mean
    assert after.abs().amax() < 1e-5 * mu.abs().amax()


def test_centering_cuts_int4_error_of_offset_keys(tiny_qwen2, decoder_lowering):
    """Keys with per-channel offsets: the int4 cache's key error and the logits' error against
    the float cache drop with centering, means taken on other tokens than the prompts'
    (measured: keys 7.4% -> 4.4% relative L2, logits 23.7% -> 15.3%)."""
    ckpt, dt = _key_offset(tiny_qwen2), torch.float32
    cfg, prompts = ckpt.config, _prompts(ckpt.config.vocab_size)
    mu = _key_mean(ckpt, decoder_lowering, _seqs(cfg.vocab_size))
    ref, ref_kv = _serve(_lowered(ckpt, decoder_lowering, dt, "fp16"), cfg, "fp16", dt,
                         prompts, 3)
    k_ref = decode_float(ref_kv[:, 0], cfg.num_kv_heads, cfg.head_dim, dt)  # [L, T, Hkv, D]
    err, kerr = {}, {}
    for name in ("plain", "centered"):
        low = _lowered(ckpt, decoder_lowering, dt, "int4")
        if name == "centered":
            run_pass(center_keys, low, mu)
        out, kv = _serve(low, cfg, "int4", dt, prompts, 3)
        err[name] = ((out - ref).norm() / ref.norm()).item()
        k = decode_int4(kv[:, 0], cfg.num_kv_heads, cfg.head_dim, dt)
        if name == "centered":
            k = k + mu.reshape(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)
        kerr[name] = ((k - k_ref).norm() / k_ref.norm()).item()
    assert kerr["centered"] < 0.7 * kerr["plain"], kerr
    assert err["centered"] < 0.8 * err["plain"], err


def test_centered_graph_does_not_match_again(tiny_llama, decoder_lowering):
    """Negative case: a graph with a kv_key_mean weight is left alone (no double centering);
    means that do not fit the graph are refused."""
    cfg = tiny_llama.config
    low = _lowered(tiny_llama, decoder_lowering, torch.float32, "int4")
    with pytest.raises(ValueError, match="does not fit"):
        center_keys(low, torch.zeros(cfg.num_layers + 1, cfg.kv_size))
    run_pass(center_keys, low, torch.zeros(cfg.num_layers, cfg.kv_size))
    code = low.gm.code
    assert run_pass(center_keys, low, torch.zeros(cfg.num_layers, cfg.kv_size)).matches == 0
    assert low.gm.code == code


def test_graph_without_kv_ops_does_not_match(hf_graph):
    """Negative case: HF's graph before sdpa_to_paged has SDPA, no kv ops: nothing changes."""
    fresh, _ = hf_graph(torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)))
    low = fresh()
    code = low.gm.code
    assert run_pass(center_keys, low, torch.zeros(2, 32)).matches == 0
    assert low.gm.code == code and KEY_MEAN not in low.weights
    assert not any(n.target in KV_ENCODE_OPS.values() for n in low.gm.graph.nodes)


def test_float16_graph(tiny_llama, decoder_lowering):
    """fp16 activations: the means are stored in fp16 and the graph still runs."""
    from qcompile.compiler.capture import KVSpec, example_inputs
    cfg = tiny_llama.config
    low = _lowered(tiny_llama, decoder_lowering, torch.float16, "int4")
    mu = torch.randn(cfg.num_layers, cfg.kv_size)
    assert run_pass(center_keys, low, mu).matches == cfg.num_layers
    assert low.weights[KEY_MEAN].dtype == torch.float16
    logits, kv = low(*example_inputs(KVSpec.of(cfg, "int4", 16, torch.float16)))
    assert torch.isfinite(logits).all() and kv.dtype == torch.uint8
