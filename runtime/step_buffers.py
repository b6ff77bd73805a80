"""Persistent step inputs: one staging buffer on the host (pinned on CUDA) and its device
twin, sized at load, and one asynchronous host -> device copy per step.

A step with T tokens, B sequences, N logits rows, U block-table updates and P tokens still in
flight (an overlapped engine) packs every input (models/decoder.py's tokens, positions,
ctx_lens, query_start, logits_indices; the KV slots; the block-table rows; the sampling
parameters of each logits row; the updates; the gathers of the in-flight tokens) into the
front of the staging buffer, in the layout `_layout(T, B, N, U, P)` gives, copies those bytes
once and views the device buffer in the same layout. The layout depends on the counts only,
updates and gathers last, so every step of a decode bucket (T = B = N) sees its inputs at the
same device addresses: the CUDA graph of the bucket reads them there.

Before the staging buffer is rewritten the previous copy must be done: `load` checks an
event recorded after it, and waits only if it is not complete (it is in practice: each step
reads its sampled ids after its copy, so a decode step makes no synchronising call before
that read). On the CPU the staging buffer is the device buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .flat_batch import FlatBatch

# (name, dtype, count): count is a key of the step's sizes (T, B, B1 = B + 1, N, U)
_FIELDS = (
    ("tokens", torch.int64, "T"), ("positions", torch.int64, "T"), ("slots", torch.int64, "T"),
    ("logits_indices", torch.int64, "N"), ("top_k", torch.int64, "N"),
    ("seed", torch.int64, "N"), ("position", torch.int64, "N"),
    ("temperature", torch.float32, "N"), ("top_p", torch.float32, "N"),
    ("ctx_lens", torch.int32, "B"), ("query_start", torch.int32, "B1"), ("rows", torch.int32, "B"),
    ("update_index", torch.int64, "U"), ("update_page", torch.int32, "U"),  # last: see above
    # tokens sampled by the previous step, not read yet (an overlapped engine): tokens[dst]
    # takes the previous step's ids[src] on the device
    ("gather_dst", torch.int64, "P"), ("gather_src", torch.int64, "P"),
)
_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def _layout(t: int, b: int, n: int, u: int,
            g: int = 0) -> tuple[dict[str, tuple[int, int, torch.dtype]], int]:
    """name -> (byte offset, count, dtype), and the bytes used; offsets 8-byte aligned."""
    sizes = dict(T=t, B=b, B1=b + 1, N=n, U=u, P=g)
    out, off = {}, 0
    for name, dtype, key in _FIELDS:
        out[name] = (off, sizes[key], dtype)
        off += -(-sizes[key] * dtype.itemsize // 8) * 8
    return out, off


@dataclass(frozen=True)
class SamplingRows:
    """Sampling parameters of each logits row (runtime/sampler.py's sample_rows)."""
    temperature: Sequence[float]
    top_p: Sequence[float]
    top_k: Sequence[int]
    seed: Sequence[int]
    position: Sequence[int]


@dataclass
class StepInputs:
    """Device views of one step's inputs (see _FIELDS); `width`: block-table columns the
    step's attention reads (None: all, as a CUDA graph bucket does)."""
    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_indices: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    position: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    ctx_lens: torch.Tensor
    query_start: torch.Tensor
    rows: torch.Tensor
    update_index: torch.Tensor
    update_page: torch.Tensor
    gather_dst: torch.Tensor
    gather_src: torch.Tensor
    width: int | None = None


class StepBuffers:
    def __init__(self, max_tokens: int, max_rows: int, max_updates: int, device: torch.device):
        self.device = device
        self.limits = (max_tokens, max_rows, max_updates)
        _, nbytes = _layout(max_tokens, max_rows, max_rows, max_updates, max_rows)
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.zeros(nbytes, dtype=torch.uint8, device=device) if pin else self.host
        self._np = self.host.numpy()
        self._copied = torch.cuda.Event() if pin else None
        self._views: dict[tuple, StepInputs] = {}

    def load(self, batch: FlatBatch, sampling: SamplingRows, updates: list[tuple[int, int]],
             width: int | None = None, gathers: list[tuple[int, int]] = ()) -> StepInputs:
        """Stage the batch, its logits rows' sampling parameters, the block-table updates and
        the (token index, previous step's row) of its pending tokens, copy them to the device
        in one asynchronous copy, return the device views."""
        t, b, n, u = len(batch.tokens), len(batch.rows), len(batch.logits_indices), len(updates)
        g = len(gathers)
        if t > self.limits[0] or b > self.limits[1] or n > self.limits[1] or u > self.limits[2] \
                or g > self.limits[1]:
            raise ValueError(f"step of {t} tokens, {b} sequences, {n} logits rows, {u} table "
                             f"updates exceeds the buffers sized at load "
                             f"({self.limits[0]} tokens, {self.limits[1]} sequences, "
                             f"{self.limits[2]} updates)")
        layout, nbytes = _layout(t, b, n, u, g)
        if self._copied is not None and not self._copied.query():
            self._copied.synchronize()  # the last copy must have read the staging buffer
        index, pages = zip(*updates) if updates else ((), ())
        dst, src = zip(*gathers) if gathers else ((), ())
        values = dict(tokens=batch.tokens, positions=batch.positions, slots=batch.slots,
                      logits_indices=batch.logits_indices, top_k=sampling.top_k,
                      seed=sampling.seed, position=sampling.position,
                      temperature=sampling.temperature, top_p=sampling.top_p,
                      ctx_lens=batch.ctx_lens, query_start=batch.query_start, rows=batch.rows,
                      update_index=index, update_page=pages, gather_dst=dst, gather_src=src)
        for name, (off, count, dtype) in layout.items():
            if count:
                self._np[off:off + count * dtype.itemsize].view(_NP[dtype])[:] = values[name]
        if self.dev is not self.host:
            self.dev[:nbytes].copy_(self.host[:nbytes], non_blocking=True)
            self._copied.record(torch.cuda.current_stream(self.device))
        return self.views(t, b, n, u, width, g)

    def views(self, t: int, b: int, n: int, u: int, width: int | None = None,
              g: int = 0) -> StepInputs:
        """Device views in the layout of (T, B, N, U, P) (kept for reuse: a bucket's are the
        same tensors every step)."""
        key = (t, b, n, u, width, g)
        views = self._views.get(key)
        if views is None:
            layout, _ = _layout(t, b, n, u, g)
            views = StepInputs(**{name: self.dev[off:off + count * dtype.itemsize].view(dtype)
                                  for name, (off, count, dtype) in layout.items()}, width=width)
            if len(self._views) < 256:
                self._views[key] = views
        return views
