"""CUDA graphs of the decode step: one per batch-size bucket (1, 2, 4, ... max_seqs) and
sampling mode (greedy only, or with random rows), captured at load into one shared memory
pool, largest bucket first so the smaller ones reuse its memory.

A captured step is the device part of Engine.step for a bucket of B single-token rows: gather
the rows' block tables, run the program, write the KV records at their slots, sample every
row. Its inputs are the step buffers' views for (T = B, B, N = B), so a replay reads whatever
the host staged there. Before capturing, each bucket runs twice eagerly on a side stream: once
to compile (Inductor), allocate (split-K counters) and fill the kernels' caches, once more
with synchronising calls made errors, which is how a program that cannot be captured (a
PyTorch reference op that reads lengths on the host) is found: then the engine runs without
graphs and says why. Warm-up and capture steps are all padding: they write the scratch page
only.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Callable

import torch

from .step_buffers import StepInputs


def decode_buckets(max_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_seqs, then max_seqs."""
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    return (*out, max_seqs)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `rows` rows, or None."""
    return next((b for b in buckets if b >= rows), None)


@contextlib.contextmanager
def no_host_sync():
    """Make every synchronising CUDA call in the block raise (torch's sync debug mode)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


class DecodeGraphs:
    """step(views, random) -> sampled ids [B]; stage(bucket) fills the step buffers with a
    bucket of padding rows and returns their views."""

    def __init__(self, step: Callable[[StepInputs, bool], torch.Tensor],
                 stage: Callable[[int], StepInputs], buckets: tuple[int, ...],
                 device: torch.device):
        self.buckets = buckets
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays: collections.Counter = collections.Counter()  # (bucket, random) -> n
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()
            self._capture(step, stage)

    def _capture(self, step, stage) -> None:
        side = torch.cuda.Stream()
        for bucket in sorted(self.buckets, reverse=True):
            for random in (True, False):
                views = stage(bucket)
                side.wait_stream(torch.cuda.current_stream())  # the staged copy
                with torch.cuda.stream(side):
                    step(views, random)  # compiles, allocates, autotunes: may synchronise
                    with no_host_sync():
                        step(views, random)  # as it will be captured: must not
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    ids = step(views, random)
                self.graphs[bucket, random] = graph, ids
        torch.cuda.synchronize()

    def replay(self, bucket: int, random: bool) -> torch.Tensor:
        """Run the bucket's graph on the inputs staged for it; its sampled ids [bucket]."""
        graph, ids = self.graphs[bucket, random]
        graph.replay()
        self.replays[bucket, random] += 1
        return ids
