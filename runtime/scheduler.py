"""Continuous batching: every step packs the running sequences' next tokens (decode steps
and prefill chunks) into one flat batch, admits waiting requests while the token budget and
KV pages allow, and preempts the youngest sequence when pages run out. A preempted request
goes back to the front of the queue: requests are never dropped, only aborted on request.

A preempted request is recomputed in the chunks it was first computed in: its prompt chunks
as they were (`Request.prefill_ends`), then its generated tokens one per step, as they were
decoded. So its KV records and logits come out of the same computations as before, and its
greedy output does not depend on being preempted (a single prefill chunk of prompt +
generated tokens rounds differently from the decode steps it replaces: with int8 activations
and a 4-bit KV cache that changed tokens). It is readmitted only when the pages of all it had
computed are free, and takes them at once, so the recomputation does not itself run out of
pages. The cost is latency: a request preempted after g tokens needs g more steps before it
produces again (one row each in otherwise normal steps): 288 steps instead of 265 for 100
requests on a 20-page cache (bench/results/preemption-replay-2026-12-06.md).
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field


from .kv_cache import PagedKVCache
from .sampler import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    index: int = 0                      # position in the caller's prompt list
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    computed: int = 0                   # tokens whose KV is in the cache
    finish_reason: str | None = None    # "eos" | "length" | "abort"
    preemptions: int = 0
    seed: int = 0                       # of its random draws (runtime/sampler.py)
    prefill_ends: list[int] = field(default_factory=list)  # ends of its prompt chunks
    # tokens sampled on the device whose ids the host has not read yet (an overlapped
    # engine launches the next step first: Engine(overlap=True)); they count in num_tokens
    pending: int = 0
    pending_row: int = -1               # its logits row in the step that samples it
    limit: int | None = None            # num_tokens at which it finishes by length

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.out) + self.pending

    @property
    def ends_by_length(self) -> bool:
        """Its pending token will finish it (length): no step should be scheduled for it."""
        return bool(self.pending) and self.limit is not None and self.num_tokens >= self.limit

    def token_span(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (decode steps take one); a
        pending token (not read yet) is a 0 that the engine replaces on the device."""
        p = len(self.prompt)
        if start >= p:
            span = self.out[start - p:end - p]
        else:
            span = self.prompt[start:end] + (self.out[:end - p] if end > p else [])
        return span + [0] * (end - start - len(span))


@dataclass(frozen=True)
class Chunk:
    req: Request
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.end == self.req.num_tokens


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_seqs: int):
        self.cache, self.max_batch_tokens, self.max_seqs = cache, max_batch_tokens, max_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        chunks, budget = [], self.max_batch_tokens
        for req in list(self.running):  # oldest first
            if req not in self.running or budget == 0 or req.ends_by_length:
                continue
            end = self._next_end(req, budget)
            if end is None or not self._reserve(req, end):
                continue
            chunks.append(self._chunk(req, end))
            budget -= end - req.computed
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            end = self._next_end(req, budget)
            if end is None:
                break
            # Leave one page per running sequence so admitting does not force a preemption
            # on the very next decode step. A preempted request takes the pages of all it
            # had computed at once, as it will recompute that before producing again.
            pages_for = max(end, req.num_tokens - 1) if req.out else end
            spare = self.cache.free_blocks - len(self.running)
            if self.cache.blocks_needed(req.id, pages_for) > spare:
                break
            self.cache.reserve(req.id, pages_for)
            self.running.append(self.waiting.popleft())
            chunks.append(self._chunk(req, end))
            budget -= end - req.computed
        return chunks

    @staticmethod
    def _next_end(req: Request, budget: int) -> int | None:
        """End of req's next chunk within `budget` tokens, or None if it must wait: a prompt
        chunk computed before is repeated whole, a generated token takes a step of its own,
        a new prompt chunk takes what the budget allows."""
        start, prompt = req.computed, len(req.prompt)
        if start >= prompt:
            return start + 1
        end = next((e for e in req.prefill_ends if e > start), None)
        if end is not None:
            return end if end - start <= budget else None
        return min(prompt, start + budget)

    @staticmethod
    def _chunk(req: Request, end: int) -> Chunk:
        if end <= len(req.prompt) and (not req.prefill_ends or end > req.prefill_ends[-1]):
            req.prefill_ends.append(end)
        return Chunk(req, req.computed, end)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Pages for req, preempting the youngest other sequences as needed."""
        while self.cache.blocks_needed(req.id, num_tokens) > self.cache.free_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        self.cache.reserve(req.id, num_tokens)
        return True

    def preempt(self, req: Request) -> None:
        self.cache.free(req.id)
        req.computed = 0
        req.preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.cache.free(req.id)
        if req in self.running:
            self.running.remove(req)
        else:  # preempted while its last token was in flight (an overlapped engine)
            self.waiting.remove(req)

    def abort(self, req: Request) -> None:
        """Drop req wherever it is (running or waiting) and free its pages."""
        if req.finish_reason is not None:
            return
        req.finish_reason = "abort"
        self.cache.free(req.id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
