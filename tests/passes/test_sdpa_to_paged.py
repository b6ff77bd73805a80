"""sdpa_to_paged on transformers' own LlamaForCausalLM graph (prefill, no cache): the causal
SDPA of every layer becomes the paged-KV op over a flat batch, with the logits unchanged
(fp16 KV) or close (int4 KV)."""
import pytest
import torch

from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.sdpa_to_paged import sdpa_to_paged
from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module")
def hf(hf_graph):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    fresh, eager = hf_graph(ids)
    return fresh, ids, eager


@pytest.mark.parametrize("fmt,rtol", [("fp16", 1e-5), ("int4", 0.2)])
def test_sdpa_becomes_paged_attention(hf, fmt, rtol):
    fresh, ids, eager = hf
    low = fresh()
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
