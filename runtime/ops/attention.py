"""Paged attention over a flat batch: prefill chunks and decode steps of many sequences in
one call.

Sequence b owns queries `q[query_start[b]:query_start[b+1]]` at positions
`ctx_lens[b] + i`. Its keys are the `ctx_lens[b]` tokens already in the paged cache (pages
listed in `block_tables[b]`) followed by its new tokens (`kv_new`, the records the graph
also returns for the runtime to store), causally masked. New tokens are read back through
the same codec as cached ones, so a token attends to identical values in every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv import CODECS, PageLayout, rotate_heads


def _gather_past(kv_cache, table, ctx: int, layout: PageLayout) -> torch.Tensor:
    """[2, NB, BS, R] pages (head-major, see PageLayout) -> [2, ctx, R] records of one
    sequence, in order."""
    bs = kv_cache.shape[2]
    blocks = table[: -(-ctx // bs)].long()
    return layout.from_pages(kv_cache[:, blocks])[:, :ctx]


def paged_attention_ref(fmt: str, q, kv_new, kv_cache, block_tables, ctx_lens, query_start,
                        num_kv_heads: int, scale: float, rotation=None) -> torch.Tensor:
    """rotation: q @ rotation per head first (the keys' rotation, see kv_encode's)."""
    decode = CODECS[fmt][1]
    q = rotate_heads(q, rotation)
    t, hq, d = q.shape
    layout = PageLayout.of(fmt, num_kv_heads, d, q.dtype)
    out = torch.empty_like(q)
    starts, ctxs = query_start.tolist(), ctx_lens.tolist()
    for b, ctx in enumerate(ctxs):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        recs = torch.cat([_gather_past(kv_cache, block_tables[b], ctx, layout), kv_new[:, lo:hi]], dim=1)
        kv = decode(recs, num_kv_heads, d, q.dtype).float()  # [2, ctx + n, Hkv, D]
        k, v = (x.transpose(0, 1).repeat_interleave(hq // num_kv_heads, dim=0) for x in kv)
        qb = q[lo:hi].float().transpose(0, 1)  # [Hq, n, D]
        n = hi - lo
        mask = (torch.arange(ctx + n)[None, :] <= ctx + torch.arange(n)[:, None]).to(q.device)
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


def _register(fmt: str):
    name = f"qcompile::paged_attention_{fmt}"

    @torch.library.custom_op(name, mutates_args=())
    def op(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor, query_start: torch.Tensor,
           num_kv_heads: int, scale: float,
           rotation: torch.Tensor | None = None) -> torch.Tensor:
        return paged_attention_ref(fmt, q, kv_new, kv_cache, block_tables, ctx_lens,
                                   query_start, num_kv_heads, scale, rotation)

    op.register_fake(lambda q, *args: torch.empty_like(q))
    return getattr(torch.ops.qcompile, f"paged_attention_{fmt}").default


# --kv format -> attention op reading that cache format.
ATTENTION_OPS = {fmt: _register(fmt) for fmt in CODECS}
