"""Rewrite attention to the paged-KV op of the chosen cache format.

Matches: `qcompile::kv_encode_fp16(k, v)` and every `qcompile::paged_attention_fp16` that
reads its records (the canonical decoder's attention; k is already rotated).
Emits: the `kv_encode_<fmt>` / `paged_attention_<fmt>` pair of the format; the encoded
records are also what the graph returns for the runtime to store, so the cache and the
current step see the same quantized values. The cache input keeps its shape
[L, 2, NB, BS, R]; only R (bytes per token record) changes.
"""
from __future__ import annotations


from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

from .base import Lowering

_FROM = "fp16"


def rewrite_attention(lowering: Lowering, fmt: str) -> int:
    if fmt == _FROM:
        return 0
    graph, count = lowering.gm.graph, 0
    for enc in [n for n in graph.nodes if n.target == KV_ENCODE_OPS[_FROM]]:
        with graph.inserting_before(enc):
            new_enc = lowering.call(KV_ENCODE_OPS[fmt], enc.args)
        for attn in [u for u in enc.users if u.target == ATTENTION_OPS[_FROM]]:
            args = (attn.args[0], new_enc, *attn.args[2:])
            with graph.inserting_before(attn):
                new_attn = lowering.call(ATTENTION_OPS[fmt], args)
            attn.replace_all_uses_with(new_attn)
            graph.erase_node(attn)
        enc.replace_all_uses_with(new_enc)
        graph.erase_node(enc)
        count += 1
    return count
