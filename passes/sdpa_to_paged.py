"""Rewrite a foreign graph's causal SDPA (prefill, no cache) to the paged-KV attention op.

For graphs not built by qcompile's decoder, e.g. transformers' own LlamaForCausalLM
exported for a cache-free prefill. Matches `aten.scaled_dot_product_attention(q, k, v,
mask?)` on [B, H, S, D] tensors that is causal (`is_causal=True`, or a boolean mask, which
HF emits as its causal mask when there is no padding), with k/v either plain or expanded
from [B, Hkv, S, D] by HF's repeat_kv (unsqueeze, expand, reshape). Emits the tokens as a flat
batch of B sequences of S tokens, `kv_encode_<fmt>(k, v)` on the un-repeated heads and
`paged_attention_<fmt>` over an empty cache (every key is a new token), then back to
[B, H, S, D]. Node walking: the repeat_kv sizes are literal lists a pattern cannot generalize.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS, kv_record_bytes

from .base import Lowering

aten = torch.ops.aten


def _unrepeat(node: fx.Node) -> fx.Node:
    """x if node = reshape(expand(unsqueeze(x, 2), ...), ...) (HF repeat_kv), else node."""
    if node.target in (aten.reshape.default, aten.view.default):
        exp = node.args[0]
        if exp.target == aten.expand.default and exp.args[0].target == aten.unsqueeze.default \
                and exp.args[0].args[1] == 2:
            return exp.args[0].args[0]
    return node


def _is_causal(node: fx.Node) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if node.kwargs.get("is_causal", len(node.args) > 5 and node.args[5]):
        return mask is None
    return mask is not None and mask.meta["val"].dtype == torch.bool


def sdpa_to_paged(lowering: Lowering, fmt: str = "fp16", block_size: int = 16) -> int:
    graph, count = lowering.gm.graph, 0
    for node in [n for n in graph.nodes if n.target == aten.scaled_dot_product_attention.default]:
        if not _is_causal(node) or node.args[0].meta["val"].dim() != 4:
            continue
        q, k, v = node.args[0], _unrepeat(node.args[1]), _unrepeat(node.args[2])
        b, h, s, d = q.meta["val"].shape
        if not all(isinstance(x, int) for x in (b, h, s, d)):
            continue  # static shapes only: the flat-batch metadata is built from them
        hkv = k.meta["val"].shape[1]
        scale = node.kwargs.get("scale") or d ** -0.5
        call = lowering.call
        with graph.inserting_before(node):
            flat = [call(aten.reshape.default, (call(aten.transpose.int, (x, 1, 2)),
                                                [-1, x.meta["val"].shape[1], d]))
                    for x in (q, k, v)]
            kv = call(KV_ENCODE_OPS[fmt], (flat[1], flat[2]))
            r = kv_record_bytes(fmt, hkv, d, q.meta["val"].dtype)
            # metadata made from q (new_*), so nothing is pinned to the export's device
            i32 = {"dtype": torch.int32}
            cache = call(aten.new_zeros.default, (kv, [2, 1, block_size, r]))
            tables = call(aten.new_zeros.default, (q, [b, 1]), i32)
            ctx = call(aten.new_zeros.default, (q, [b]), i32)
            ends = call(aten.cumsum.default, (call(aten.new_full.default, (q, [b + 1], s), i32), 0),
                        i32)
            starts = call(aten.sub.Tensor, (ends, s))  # [0, S, 2S, ..., B*S]
            o = call(ATTENTION_OPS[fmt], (flat[0], kv, cache, tables, ctx, starts, hkv, scale))
            o = call(aten.transpose.int, (call(aten.reshape.default, (o, [b, s, h, d])), 1, 2))
        node.replace_all_uses_with(o)
        graph.erase_node(node)
        count += 1
    return count
