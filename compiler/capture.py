"""Capture the canonical decoder with torch.export: one graph, symbolic in every batch size.

Symbolic dims: T tokens in the flat batch, B sequences, MB pages per sequence, NB pages in
the cache, N logits. Example inputs use >= 2 of each so export does not specialize 0/1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from qcompile.models.config import ModelConfig
from qcompile.runtime.flat_batch import Span, flat_batch
from qcompile.runtime.ops import kv_record_bytes

INPUT_NAMES = ("tokens", "positions", "kv_cache", "block_tables", "ctx_lens", "query_start",
               "logits_indices")


@dataclass(frozen=True)
class KVSpec:
    """Shape of the paged cache input: [L, 2, NB, block_size, record_bytes] uint8."""
    fmt: str
    num_layers: int
    block_size: int
    record_bytes: int

    @classmethod
    def of(cls, cfg: ModelConfig, fmt: str, block_size: int, dtype: torch.dtype) -> "KVSpec":
        return cls(fmt, cfg.num_layers, block_size,
                   kv_record_bytes(fmt, cfg.num_kv_heads, cfg.head_dim, dtype))

    def empty(self, num_blocks: int, device="cpu") -> torch.Tensor:
        return torch.zeros(self.num_layers, 2, num_blocks, self.block_size, self.record_bytes,
                           dtype=torch.uint8, device=device)


def example_inputs(kv: KVSpec, device="cpu") -> tuple:
    """Two sequences: 3 new tokens after 2 cached ones, and a 2-token prefill (two pages
    each, so no dimension is 1)."""
    spans = [Span([5, 6, 7], 2, [0, 1]), Span([8, 9], 0, [2, 3])]
    return flat_batch(spans, kv.block_size).tensors(device).program_args(kv.empty(4, device))


def dynamic_shapes() -> tuple:
    t, b, mb, nb, n = Dim("T", min=1), Dim("B", min=1), Dim("MB", min=1), Dim("NB", min=1), \
        Dim("N", min=1)
    return ({0: t}, {0: t}, {2: nb}, {0: b, 1: mb}, {0: b}, {0: b + 1}, {0: n})


def capture(module: torch.nn.Module, kv: KVSpec) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, example_inputs(kv), dynamic_shapes=dynamic_shapes())
