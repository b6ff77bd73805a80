"""passes/rotate_blocks.py: a linear's input rotated in blocks at run time, the rotation's
transpose in its weight (FMPQ's w_down rotation, compiler/fmpq.py): exact in float, one mm
between views per rotated linear, one weight per rotation, and a clear error where the
weights and the graph disagree."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from test_rewrite_attention import _lowered, _prompts, _serve

from qcompile.compiler.fmpq import block_rotation, rotate_blocks as rotate_weight
from qcompile.passes.base import call_targets, run_pass
from qcompile.passes.rotate_blocks import rotate_blocks

MM = torch.ops.aten.mm.default


def _downs(cfg):
    return [f"layers.{i}.w_down" for i in range(cfg.num_layers)]


def test_rotated_input_and_folded_weight_keep_the_logits(tiny_llama, decoder_lowering):
    cfg, dt = tiny_llama.config, torch.float32
    block = 32  # the tiny llama's intermediate 96 = 3 blocks
    h = block_rotation(block)
    ref, _ = _serve(_lowered(tiny_llama, decoder_lowering, dt, "fp16"), cfg, "fp16", dt,
                    _prompts(cfg.vocab_size), steps=2)
    w = dict(tiny_llama.weights)
    for name in _downs(cfg):
        w[name] = rotate_weight(w[name], h)
    rotated = dataclasses.replace(tiny_llama, weights=w, source=f"{tiny_llama.source}#rot")
    low = _lowered(rotated, decoder_lowering, dt, "fp16")
    n_mm = Counter(call_targets(low.gm))[MM]

    res = run_pass(rotate_blocks, low, {name: h for name in _downs(cfg)})

    assert res.matches == cfg.num_layers
    assert Counter(call_targets(low.gm))[MM] - n_mm == cfg.num_layers
    assert torch.equal(low.weights[f"fmpq_rotation_{block}"], h)
    got, _ = _serve(low, cfg, "fp16", dt, _prompts(cfg.vocab_size), steps=2)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    # without the pass the folded weights alone change the function
    plain, _ = _serve(_lowered(rotated, decoder_lowering, dt, "fp16"), cfg, "fp16", dt,
                      _prompts(cfg.vocab_size), steps=2)
    assert ((plain - ref).norm() / ref.norm()).item() > 1e-2


def test_weights_and_graph_must_agree(tiny_llama, decoder_lowering):
    low = _lowered(tiny_llama, decoder_lowering, torch.float32, "fp16")
    with pytest.raises(ValueError, match="no linear of the graph reads"):
        rotate_blocks(low, {"layers.9.w_down": block_rotation(32)})
    low = _lowered(tiny_llama, decoder_lowering, torch.float32, "fp16")
    with pytest.raises(ValueError, match="not a multiple of"):
        rotate_blocks(low, {"layers.0.w_down": block_rotation(64)})  # 96 channels
    assert rotate_blocks(low, {}) == 0
