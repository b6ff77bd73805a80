"""The step's inputs: runtime/flat_batch.py (the one builder of the flat batch),
runtime/block_table.py (persistent rows updated in place) and runtime/step_buffers.py (one
staging buffer, one copy, views at addresses that depend on the step's counts only)."""
from __future__ import annotations

import pytest
import torch

from qcompile.runtime.block_table import BlockTable
from qcompile.runtime.flat_batch import Span, flat_batch
from qcompile.runtime.step_buffers import SamplingRows, StepBuffers

CPU = torch.device("cpu")


def test_flat_batch_layout():
    # a decode step after 9 cached tokens (pages 7, 3), a 3-token chunk after 2 (page 5),
    # a fresh 2-token prefill (page 0) whose logits nobody wants; block size 4
    spans = [Span([11], 9, [7, 3, 6], row=2), Span([21, 22, 23], 2, [5, 1], row=0),
             Span([31, 32], 0, [0], row=1, logits=False)]
    b = flat_batch(spans, 4)
    assert b.tokens == [11, 21, 22, 23, 31, 32]
    assert b.positions == [9, 2, 3, 4, 0, 1]
    assert b.slots == [6 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 1 * 4 + 0, 0, 1]
    assert b.ctx_lens == [9, 2, 0] and b.query_start == [0, 1, 4, 6] and b.rows == [2, 0, 1]
    assert b.logits_indices == [0, 3]
    assert b.width == 3 and b.block_tables() == [[7, 3, 6], [5, 1, 0], [0, 0, 0]]
    assert flat_batch(spans, 4, all_logits=True).logits_indices == [0, 1, 2, 3, 4, 5]
    t = b.tensors(CPU)
    assert t.block_tables.dtype == t.ctx_lens.dtype == t.query_start.dtype == torch.int32
    assert t.tokens.dtype == t.positions.dtype == t.slots.dtype == torch.int64
    assert t.logits_indices.tolist() == [0, 3]
    cache = torch.zeros(1)
    assert t.program_args(cache)[2] is cache and len(t.program_args(cache)) == 7


def test_padding_spans_are_ordinary_spans():
    pad = Span([0], 0, [99], row=8)
    b = flat_batch([Span([5], 4, [2, 3]), pad, pad], 4)
    assert b.tokens == [5, 0, 0] and b.ctx_lens == [4, 0, 0] and b.rows == [0, 8, 8]
    assert b.slots == [12, 396, 396] and b.logits_indices == [0, 1, 2]


def test_block_table_rows_and_updates():
    bt = BlockTable(max_rows=3, width=4, scratch_page=50, device=CPU)
    assert bt.tensor.shape == (4, 4) and bt.tensor[3].tolist() == [50] * 4  # scratch row
    pages_a, pages_b = [4, 9], [1]
    up = []
    assert bt.sync(10, pages_a, up) == 0 and bt.sync(11, pages_b, up) == 1
    assert up == [(0, 4), (1, 9), (4, 1)]
    bt.apply(torch.tensor([i for i, _ in up]), torch.tensor([p for _, p in up], dtype=torch.int32))
    pages_a.append(2)  # a gains a page: only that entry travels
    up = []
    assert bt.sync(10, pages_a, up) == 0 and bt.sync(11, pages_b, up) == 1 and up == [(2, 2)]
    bt.apply(torch.tensor([2]), torch.tensor([2], dtype=torch.int32))
    assert bt.gather(torch.tensor([1, 0, 3], dtype=torch.int32), 3).tolist() == [
        [1, 50, 50], [4, 9, 2], [50, 50, 50]]
    assert bt.gather(torch.tensor([0], dtype=torch.int32)).shape == (1, 4)
    # b finished (its pages gone): its row is free again; a was freed and reserved anew
    # (a new page list): a fresh row, written whole
    bt.release_missing({10: pages_a})
    up = []
    assert bt.sync(12, [7], up) == 1 and up == [(4, 7)]
    up = []
    assert bt.sync(10, [8], up) == 0 and up == [(0, 8)]  # its old row, rewritten
    with pytest.raises(ValueError, match="more than the 4"):
        bt.sync(13, [1, 2, 3, 4, 5], [])
    bt.release_missing({})
    for sid in range(3):
        bt.sync(sid, [0], [])
    with pytest.raises(RuntimeError, match="more than 3 sequences"):
        bt.sync(99, [0], [])


def _rows(n):
    return SamplingRows([0.5] * n, [0.9] * n, list(range(n)), [2**62 + i for i in range(n)],
                        [7] * n)


def test_step_buffers_round_trip_and_fixed_addresses():
    buf = StepBuffers(max_tokens=16, max_rows=4, max_updates=8, device=CPU)
    assert buf.dev is buf.host  # CPU: nothing to copy
    b = flat_batch([Span([1, 2, 3], 5, [0, 1], row=1), Span([4], 0, [2], row=0)], 4)
    x = buf.load(b, _rows(2), [(3, 9), (5, 1)], width=2)
    assert x.tokens.tolist() == [1, 2, 3, 4] and x.positions.tolist() == [5, 6, 7, 0]
    assert x.slots.tolist() == b.slots and x.rows.tolist() == [1, 0]
    assert x.ctx_lens.tolist() == [5, 0] and x.query_start.tolist() == [0, 3, 4]
    assert x.logits_indices.tolist() == [2, 3] and x.width == 2
    assert x.seed.tolist() == [2**62, 2**62 + 1] and x.top_k.tolist() == [0, 1]
    assert x.temperature.tolist() == [0.5, 0.5] and x.position.tolist() == [7, 7]
    assert x.update_index.tolist() == [3, 5] and x.update_page.tolist() == [9, 1]
    assert x.update_page.dtype == x.rows.dtype == torch.int32
    # a decode bucket's inputs sit at the same addresses whatever the table updates
    pad = Span([0], 0, [3], row=4)
    one = buf.load(flat_batch([pad] * 4, 4), _rows(4), [])
    two = buf.load(flat_batch([pad] * 4, 4), _rows(4), [(1, 1)] * 5)
    for name in ("tokens", "positions", "slots", "logits_indices", "seed", "temperature",
                 "ctx_lens", "query_start", "rows"):
        assert getattr(one, name).data_ptr() == getattr(two, name).data_ptr(), name
    assert buf.views(4, 4, 4, 0) is one  # kept
    with pytest.raises(ValueError, match="exceeds the buffers"):
        buf.load(flat_batch([Span(list(range(17)), 0, [0, 1, 2, 3, 4])], 4), _rows(1), [])
