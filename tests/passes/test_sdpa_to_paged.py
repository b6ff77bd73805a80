"""sdpa_to_paged on transformers' own LlamaForCausalLM graph (prefill, no cache): the causal
SDPA of every layer becomes the paged-KV op over a flat batch, with the logits unchanged
(fp16 KV) or close (int4 KV)."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.sdpa_to_paged import sdpa_to_paged
from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def hf(make_tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_checkpoint("llama"),
                                                 dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        low = Lowering.from_exported(torch.export.export(_Logits(model), (ids,)))
    run_pass(canonicalize, low)
    return low, ids, eager


def _fresh(low):
    return Lowering(copy.deepcopy(low.gm), dict(low.weights), low.inputs)


@pytest.mark.parametrize("fmt,rtol", [("fp16", 1e-5), ("int4", 0.2)])
def test_sdpa_becomes_paged_attention(hf, fmt, rtol):
    base, ids, eager = hf
    low = _fresh(base)
    assert call_targets(low.gm).count(SDPA) == 2
    result = run_pass(sdpa_to_paged, low, fmt)
    targets = call_targets(low.gm)
    assert result.matches == 2
    assert SDPA not in targets
    assert targets.count(ATTENTION_OPS[fmt]) == 2 and targets.count(KV_ENCODE_OPS[fmt]) == 2
    (logits,) = low(ids)
    rel = ((logits - eager).norm() / eager.norm()).item()
    print(f"{fmt} KV: relative error {rel:.2e}")
    assert rel < rtol, f"{fmt} KV: relative error {rel:.2e}"


def test_non_causal_sdpa_is_left_alone():
    class Bidirectional(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 2, 5, 8)
    low = Lowering.from_exported(torch.export.export(Bidirectional(), (x, x, x)))
    assert run_pass(sdpa_to_paged, low).matches == 0
    assert SDPA in call_targets(low.gm)
