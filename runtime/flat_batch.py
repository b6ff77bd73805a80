"""The flat batch the lowered program takes (models/decoder.py has the input table), built in
one place for the engine's steps, `Engine.score` and calibration.

A batch is a list of spans, one per sequence: its new tokens, the tokens it already has in the
cache and the pages that hold (or will hold) its records. `flat_batch` lays them out as host
lists: every token's position and cache slot, per-sequence context lengths, query offsets and
block-table rows, and the rows whose logits are wanted. `FlatBatch.tensors` turns them into
one-off device tensors (scoring, calibration); the engine's steps copy them into persistent
buffers instead (runtime/step_buffers.py).

Padding is not special: a bucketed decode step appends padding spans (one token, nothing
cached, the scratch page) until it has the bucket's rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Span:
    """One sequence's part of a flat batch: `tokens` at positions start, start + 1, ... after
    the `start` tokens already cached; `pages` hold its records in order (at least up to
    start + len(tokens)); `row` is its row of a persistent block table (the engine's batch
    slot); `logits`: compute the logits of its last token."""
    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    row: int = 0
    logits: bool = True


@dataclass
class FlatBatch:
    """Host lists, T tokens of B sequences, N logits rows."""
    tokens: list[int]           # [T]
    positions: list[int]        # [T]
    slots: list[int]            # [T] cache slot of each new record: page * block_size + offset
    ctx_lens: list[int]         # [B]
    query_start: list[int]      # [B + 1]
    logits_indices: list[int]   # [N]
    rows: list[int]             # [B] persistent block-table rows
    pages: list[Sequence[int]]  # [B] pages of each sequence
    width: int                  # pages of the longest sequence (>= 1): block-table columns

    def block_tables(self) -> list[list[int]]:
        """[B, width] pages, rows padded with page 0 (never read: past each ctx_len)."""
        return [list(p) + [0] * (self.width - len(p)) for p in self.pages]

    def tensors(self, device) -> "BatchTensors":
        """One-off tensors on `device` (each sequence's block-table row from its pages)."""
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return BatchTensors(
            torch.tensor(self.tokens, **i64), torch.tensor(self.positions, **i64),
            torch.tensor(self.block_tables(), **i32), torch.tensor(self.ctx_lens, **i32),
            torch.tensor(self.query_start, **i32), torch.tensor(self.logits_indices, **i64),
            torch.tensor(self.slots, **i64))


@dataclass
class BatchTensors:
    tokens: torch.Tensor          # [T] int64
    positions: torch.Tensor       # [T] int64
    block_tables: torch.Tensor    # [B, MB] int32
    ctx_lens: torch.Tensor        # [B] int32
    query_start: torch.Tensor     # [B + 1] int32
    logits_indices: torch.Tensor  # [N] int64
    slots: torch.Tensor           # [T] int64, for PagedKVCache.write

    def program_args(self, kv_cache: torch.Tensor) -> tuple:
        """The program's inputs after the weights, in models/decoder.py's order."""
        return (self.tokens, self.positions, kv_cache, self.block_tables, self.ctx_lens,
                self.query_start, self.logits_indices)


def flat_batch(spans: Sequence[Span], block_size: int, *, all_logits: bool = False) -> FlatBatch:
    """The flat batch of `spans`, in order. Logits rows: every token with all_logits (scoring),
    else the last token of each span whose `logits` is set."""
    b = FlatBatch([], [], [], [], [0], [], [], [], 1)
    for s in spans:
        n, lo, pages = len(s.tokens), len(b.tokens), s.pages
        b.tokens.extend(s.tokens)
        b.positions.extend(range(s.start, s.start + n))
        b.slots.extend(pages[p // block_size] * block_size + p % block_size
                       for p in range(s.start, s.start + n))
        b.ctx_lens.append(s.start)
        b.query_start.append(lo + n)
        b.rows.append(s.row)
        b.pages.append(pages)
        b.width = max(b.width, len(pages))
        if all_logits:
            b.logits_indices.extend(range(lo, lo + n))
        elif s.logits:
            b.logits_indices.append(lo + n - 1)
    return b
