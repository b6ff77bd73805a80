"""Paged KV cache: one uint8 tensor [L, 2, NB + 1, BS, R] and the bookkeeping of its pages.

Sequences own lists of pages; a step's new records ([L, 2, T, R] from the program) land at
their slots (page * BS + offset) in the pages' head-major order (`PageLayout`: one index_put_
for the codes or values, one for int4 parameters), slots given as a device tensor, so the
write needs no host synchronisation and a CUDA graph can capture it. Allocation is
all-or-nothing so the scheduler can preempt cleanly when pages run out. The page after the
NB that sequences get is the scratch page: padding rows of a bucketed decode step (CUDA
graphs) write their records there and read nothing else.
"""
from __future__ import annotations

import torch

from qcompile.compiler.capture import KVSpec
from qcompile.runtime.ops.kv import PageLayout


class OutOfKVBlocks(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, spec: KVSpec, num_blocks: int, device: torch.device, layout: PageLayout):
        self.spec, self.num_blocks, self.device, self.layout = spec, num_blocks, device, layout
        self.tensor = spec.empty(num_blocks + 1, device)  # + the scratch page
        self.scratch_page = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low pages first
        self.tables: dict[int, list[int]] = {}

    @staticmethod
    def bytes_per_block(spec: KVSpec) -> int:
        return spec.num_layers * 2 * spec.block_size * spec.record_bytes

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make seq_id hold pages for its first num_tokens tokens, or change nothing."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise OutOfKVBlocks(f"need {need} KV pages, {len(self._free)} free")
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))

    def free(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))

    def write(self, new_kv: torch.Tensor, slots: torch.Tensor) -> None:
        """new_kv [L, 2, T, R] -> pages at slots [T] (int64, on the cache's device): on CUDA
        the active kernel table's store kernel (one launch), else `PageLayout.to_pages`."""
        if self.tensor.is_cuda:
            from .attention_kernels import store_pages
            if store_pages(self.layout, self.tensor, new_kv, slots):
                return
        self.layout.to_pages(self.tensor, new_kv, slots)
