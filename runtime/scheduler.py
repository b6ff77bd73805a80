"""Continuous batching: every step packs the running sequences' next tokens (decode steps
and prefill chunks) into one flat batch, admits waiting requests while the token budget and
KV pages allow, and preempts the youngest sequence when pages run out. A preempted request
goes back to the front of the queue and is recomputed from its prompt and the tokens it
already produced: requests are never dropped."""
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
    finish_reason: str | None = None    # "eos" | "length"
    preemptions: int = 0
    seed: int = 0                       # of its random draws (runtime/sampler.py)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


@dataclass(frozen=True)
class Chunk:
    req: Request
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next one."""
        return self.end == len(self.req.tokens)


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
            if req not in self.running or budget == 0:
                continue
            n = min(len(req.tokens) - req.computed, budget)
            if not self._reserve(req, req.computed + n):
                continue
            chunks.append(Chunk(req, req.computed, req.computed + n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            n = min(len(req.tokens) - req.computed, budget)
            # Leave one page per running sequence so admitting does not force a preemption
            # on the very next decode step.
            spare = self.cache.free_blocks - len(self.running)
            if self.cache.blocks_needed(req.id, req.computed + n) > spare:
                break
            self.cache.reserve(req.id, req.computed + n)
            self.running.append(self.waiting.popleft())
            chunks.append(Chunk(req, req.computed, req.computed + n))
            budget -= n
        return chunks

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
        self.running.remove(req)
