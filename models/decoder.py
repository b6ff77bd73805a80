"""The canonical Llama-family decoder, as pure functions of values.

One graph serves prefill and decode of many sequences: it takes a flat batch of tokens with
their positions and the paged-KV metadata, and returns the logits of the requested tokens
plus the KV records of every new token (the runtime stores them in the cache; no layer
writes through a shared buffer).

Inputs
| name | shape, dtype | meaning |
|---|---|---|
| tokens | [T] int64 | the flat batch |
| positions | [T] int64 | position of each token in its sequence |
| kv_cache | [L, 2, NB, BS, R] uint8 | paged cache, R bytes per token record (runtime/ops/kv.py) |
| block_tables | [B, MB] int32 | pages of each sequence |
| ctx_lens | [B] int32 | tokens of each sequence already in the cache |
| query_start | [B + 1] int32 | sequence b owns tokens query_start[b]:query_start[b+1] |
| logits_indices | [N] int64 | which tokens' logits to compute |

Outputs: logits [N, V] float32, new_kv [L, 2, T, R] uint8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import qcompile.runtime.ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

from .config import ModelConfig
from .rope import apply_rope, cos_sin, inv_freq


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as HF LlamaRMSNorm, so logits match it bit for bit in fp32.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def attention(cfg: ModelConfig, x, w: dict, cos, sin, kv_cache, meta: tuple):
    """x [T, H] (normed) -> (out [T, H], kv records [2, T, R])."""
    qkv = F.linear(x, w["wqkv"], w.get("bqkv"))
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = apply_rope(q.reshape(-1, cfg.num_heads, cfg.head_dim), cos, sin)
    k = apply_rope(k.reshape(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
    v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
    kv_new = KV_ENCODE_OPS["fp16"](k, v)
    o = ATTENTION_OPS["fp16"](q, kv_new, kv_cache, *meta, cfg.num_kv_heads,
                              cfg.head_dim ** -0.5)
    return F.linear(o.reshape(-1, cfg.q_size), w["wo"]), kv_new


def mlp(cfg: ModelConfig, x, w: dict) -> torch.Tensor:
    gate, up = F.linear(x, w["w_gate_up"]).split(cfg.intermediate_size, dim=-1)
    return F.linear(F.silu(gate) * up, w["w_down"])


def layer(cfg: ModelConfig, h, w: dict, cos, sin, kv_cache, meta):
    a, kv_new = attention(cfg, rms_norm(h, w["attn_norm"], cfg.rms_norm_eps), w, cos, sin,
                          kv_cache, meta)
    h = h + a
    h = h + mlp(cfg, rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps), w)
    return h, kv_new


class _Weights(nn.Module):
    """A named bag of tensors; registered as buffers so export lifts them as inputs."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())


class Decoder(nn.Module):
    """Holds the weights under their canonical names (`layers.{i}.wqkv`, ...); forward is
    the pure functions above."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        top = {k: v.to(dtype) for k, v in weights.items() if not k.startswith("layers.")}
        top["rope_inv_freq"] = inv_freq(cfg)
        self.top = _Weights(top)
        self.layers = nn.ModuleList(
            _Weights({k.split(".", 2)[2]: v.to(dtype) for k, v in weights.items()
                      if k.startswith(f"layers.{i}.")})
            for i in range(cfg.num_layers))

    def forward(self, tokens, positions, kv_cache, block_tables, ctx_lens, query_start,
                logits_indices):
        cfg, top = self.cfg, self.top.as_dict()
        h = F.embedding(tokens, top["embed"])
        cos, sin = cos_sin(positions, top["rope_inv_freq"], h.dtype)
        meta = (block_tables, ctx_lens, query_start)
        records = []
        for i, lw in enumerate(self.layers):
            h, kv_new = layer(cfg, h, lw.as_dict(), cos, sin, kv_cache[i], meta)
            records.append(kv_new)
        h = rms_norm(h, top["norm"], cfg.rms_norm_eps)[logits_indices]
        logits = F.linear(h, top.get("lm_head", top["embed"])).float()
        return logits, torch.stack(records)
