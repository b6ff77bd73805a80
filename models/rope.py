"""Rotary position embedding: inverse frequencies (with Llama 3 scaling) and the rotation.

Uses the rotate-half convention of HF checkpoints (GGUF q/k are un-permuted to it by
transformers on load).
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] float32."""
    d = cfg.head_dim
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return freq.float()
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    wavelen = 2 * math.pi / freq
    low_wl = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wl = sc.original_max_position_embeddings / sc.high_freq_factor
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * freq / sc.factor + smooth * freq
    out = torch.where(wavelen > low_wl, freq / sc.factor, freq)
    out = torch.where((wavelen >= high_wl) & (wavelen <= low_wl), blended, out)
    return out.float()


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [T] -> cos, sin [T, 1, D] in `dtype` (computed in float32)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]."""
    return x * cos + rotate_half(x) * sin
