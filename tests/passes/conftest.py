"""Fixtures of the pass tests: tiny checkpoints loaded once (the canonical decoder exported once
per (checkpoint, dtype), each test getting its own copy of the graph, is tests/conftest.py's
`decoder_lowering`), and transformers' own tiny model exported.

The tiny model (tests/conftest.py): hidden 64, intermediate 96, 2 layers, 4 heads, 2 KV heads,
head_dim 16, vocab 256. Its canonical graph has 4 linears per layer (wqkv, wo, w_gate_up,
w_down) plus the LM head, 2 RMSNorms per layer plus the final one.
"""
from __future__ import annotations

import copy

import pytest
import torch

from qcompile.models.loaders import Checkpoint, load_checkpoint
from qcompile.passes.base import Lowering


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_checkpoint) -> Checkpoint:
    return load_checkpoint(make_tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(make_tiny_checkpoint) -> Checkpoint:
    """q/k/v carry a bias: `layers.{i}.bqkv`."""
    return load_checkpoint(make_tiny_checkpoint("qwen2"))


class _HFLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="session")
def hf_graph(make_tiny_checkpoint):
    """`export(ids)` -> (fresh, eager logits) for transformers' own tiny LlamaForCausalLM
    exported for a cache-free prefill of ids; `fresh()` returns a new copy of the
    canonicalized Lowering."""
    from transformers import AutoModelForCausalLM

    from qcompile.passes.base import run_pass
    from qcompile.passes.canonicalize import canonicalize
    model = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint("llama"),
                                                 dtype=torch.float32).eval()

    def export(ids):
        with torch.no_grad():
            eager = model(input_ids=ids, use_cache=False).logits
            base = Lowering.from_exported(torch.export.export(_HFLogits(model), (ids,)))
        run_pass(canonicalize, base)

        def fresh() -> Lowering:
            return Lowering(copy.deepcopy(base.gm), dict(base.weights), base.inputs,
                            dict(base.origin))
        return fresh, eager
    return export
