"""Sampling parameters (validated up front) and batched next-token selection on the device:
greedy, temperature, top-k and top-p for every row of a step at once, without a host
synchronisation (the engine reads the sampled ids once per step).

Random draws are a counter-based hash of (request seed, position in the output, token id):
Gumbel-max over the kept tokens. So a request's sample does not depend on which other
requests share its step, on the batch order or on a preemption that recomputes it, and no
generator state lives on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0            # 0: no limit
    seed: int | None = None
    stop_on_eos: bool = True

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values < 2**32 (products stay below
    2**63: no overflow)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, position: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float32 of (seed [N, 1], position [N, 1], token [N, V]) int64: a pure function
    of its arguments (24 bits of a hash)."""
    s = _hash32((seed & _MASK32) ^ _hash32(seed >> 32 & _MASK32))
    x = _hash32(_hash32((s + position) & _MASK32) ^ (token & _MASK32))
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) of [N, V], the same indices (the first maximum, NaN as the
    largest), in two passes on CUDA: ATen reduces each row in one thread block, so a batch of
    64 rows of a 128k vocabulary kept 64 blocks busy and took 44 us of a 2.0 ms decode step on
    an H100 (bench/results/gpu-h100-2026-12-07d.md); first the argmax of each of gcd(V, 256)
    chunks of a row, then of the chunks' maxima."""
    c = math.gcd(logits.shape[-1], 256)
    if logits.device.type != "cuda" or c < 16:
        return logits.argmax(dim=-1)
    return _argmax_chunked(logits, c)


def _argmax_chunked(logits: torch.Tensor, c: int) -> torch.Tensor:
    n, v = logits.shape
    part = logits.reshape(n, c, v // c)
    inner = part.argmax(dim=-1)                                   # [N, C] first max of a chunk
    best = part.gather(-1, inner[..., None]).squeeze(-1).argmax(dim=-1)  # the first such chunk
    return best * (v // c) + inner.gather(-1, best[:, None]).squeeze(1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                top_k: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                random: bool = True) -> torch.Tensor:
    """Next token of each row. logits [N, V]; per row: temperature (0 = greedy), top_p, top_k
    (0 = all) float32/int64 [N], seed and position int64 [N]. `random` False (every row
    greedy, known on the host) skips the sort. Returns int64 [N] on the logits' device."""
    greedy = argmax_rows(logits)
    if not random:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    vals, idx = scaled.sort(dim=-1, descending=True)
    probs = vals.softmax(dim=-1)
    rank = torch.arange(vals.shape[-1], device=vals.device)
    keep = (probs.cumsum(dim=-1) - probs < top_p[:, None]) & (
        (top_k[:, None] == 0) | (rank < top_k[:, None]))
    keep[:, 0] = True  # the most likely token always stays
    gumbel = -torch.log(-torch.log(uniform(seed[:, None], position[:, None], idx)))
    choice = (vals + gumbel).masked_fill(~keep, float("-inf")).argmax(dim=-1)
    sampled = idx.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


def sample(logits: torch.Tensor, params: SamplingParams, seed: int = 0,
           position: int = 0) -> int:
    """One row (tests, scripts): `sample_rows` on logits [V]."""
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    out = sample_rows(logits[None], torch.tensor([params.temperature], **f32),
                      torch.tensor([params.top_p], **f32), torch.tensor([params.top_k], **i64),
                      torch.tensor([seed], **i64), torch.tensor([position], **i64),
                      random=params.temperature > 0)
    return int(out[0])
