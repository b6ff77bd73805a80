"""The engine's persistent block table: a device tensor [max_seqs + 1, W] int32, one row per
batch slot, W = ceil(max_seq_len / block_size) columns, so no sequence outgrows its row.

A scheduled sequence gets a free row the first time it is in a step and keeps it while it
holds pages; each step writes only the pages sequences gained since the last one, as
(row * W + column, page) updates that travel in the step's one host -> device copy and land
with one index_copy_ (`apply`). The step's own table is a gather of its rows (`gather`),
inside the captured region for CUDA graphs. The last row is the scratch row (every entry the
cache's scratch page), used by padding spans.

A row is freed once its sequence no longer holds pages (finished, preempted, aborted); a
sequence that was freed and reserved again holds a new page list, so it starts a fresh row.
"""
from __future__ import annotations

import torch


class BlockTable:
    def __init__(self, max_rows: int, width: int, scratch_page: int, device: torch.device):
        self.width, self.scratch_row = width, max_rows
        self.tensor = torch.full((max_rows + 1, width), scratch_page, dtype=torch.int32,
                                 device=device)
        self._free = list(range(max_rows - 1, -1, -1))  # pop() hands out low rows first
        # sequence id -> [row, the cache's page list it mirrors, pages written]
        self._rows: dict[int, list] = {}

    @property
    def max_rows(self) -> int:
        return self.scratch_row

    def release_missing(self, live: dict[int, list[int]]) -> None:
        """Free the rows of sequences whose pages are gone (`live`: the cache's tables)."""
        for sid in [s for s, (_, pages, _) in self._rows.items() if live.get(s) is not pages]:
            self._free.append(self._rows.pop(sid)[0])

    def sync(self, seq_id: int, pages: list[int], updates: list[tuple[int, int]]) -> int:
        """The row of seq_id, after appending to `updates` the (flat index, page) of every page
        it gained since the last step. `pages` is the cache's own list for seq_id (its identity
        tells a reservation after a free from the same sequence growing)."""
        entry = self._rows.get(seq_id)
        if entry is None or entry[1] is not pages:
            if entry is not None:
                self._free.append(entry[0])
            if not self._free:
                raise RuntimeError(f"more than {self.max_rows} sequences in flight: the "
                                   "scheduler admits at most max_seqs")
            entry = self._rows[seq_id] = [self._free.pop(), pages, 0]
        row, _, done = entry
        if len(pages) > self.width:
            raise ValueError(f"sequence {seq_id} holds {len(pages)} pages, more than the "
                             f"{self.width} a block-table row has (max_seq_len)")
        base = row * self.width
        updates.extend((base + col, pages[col]) for col in range(done, len(pages)))
        entry[2] = len(pages)
        return row

    def apply(self, index: torch.Tensor, pages: torch.Tensor) -> None:
        """Write the updates (flat index int64 [U], page int32 [U], on the table's device)."""
        if index.numel():
            self.tensor.view(-1).index_copy_(0, index, pages)

    def gather(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """[B, width] block tables of `rows` (int32 [B]); `width` columns (all when None), a
        contiguous copy as the kernels need."""
        table = self.tensor if width is None or width >= self.width else self.tensor[:, :width]
        return table.index_select(0, rows)
