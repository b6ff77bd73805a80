"""runtime/kv_cache.py and runtime/scheduler.py: paged KV bookkeeping and continuous batching.

PagedKVCache: reserve is all-or-nothing (OutOfKVBlocks changes nothing), free returns pages,
the scratch page is never handed out, write puts each record at its slot (page * block_size +
offset, from the flat batch builder; checked in the tensor itself).

Scheduler, driven by a FAKE model the way engine.Engine.step drives it (no program): schedule(),
then `computed = end` for every chunk, one token appended per sampling chunk, `finish()` at
max_new_tokens. The fake model also stores a record (request id, position, token) for every
token it computes through the flat batch's slots and `cache.write`, and before each chunk reads
the request's cached history back through its pages: every earlier position must hold
that request's own record. Invariants checked on every step: the token budget, max_seqs, one
chunk per request starting at its `computed`, pages of different requests disjoint and
nothing leaked (owned + free == all pages), a preempted request is the youngest running one
and goes to the front of the waiting queue with computed = 0. Scenarios: continuous batching
(a request added while another decodes joins the same flat batch), chunked prefill under the
token budget, a tiny cache where requests are preempted yet all finish with exactly their
tokens (identical to a run with a large cache) and every page is free at the end, a preempted
request recomputed in exactly the chunks of its first computation (prompt chunks, then one
generated token per step), and abort from the queue or the batch.
"""
from __future__ import annotations

import pytest
import torch

from qcompile.compiler.capture import KVSpec
from qcompile.runtime.flat_batch import Span, flat_batch
from qcompile.runtime.kv_cache import OutOfKVBlocks, PagedKVCache
from qcompile.runtime.ops.kv import PageLayout
from qcompile.runtime.sampler import SamplingParams
from qcompile.runtime.scheduler import Request, Scheduler

CPU = torch.device("cpu")


def _cache(num_blocks: int, block_size: int = 4, layers: int = 2) -> PagedKVCache:
    return PagedKVCache(KVSpec("fp16", layers, block_size, 16), num_blocks, CPU,
                        PageLayout(1, 16, 0))  # one head of 8 fp16 values: R = 16


# ---------------------------------------------------------------------------------------------
# PagedKVCache
# ---------------------------------------------------------------------------------------------

def test_reserve_all_or_nothing():
    c = _cache(5)
    assert (c.free_blocks, c.capacity_tokens, c.block_size) == (5, 20, 4)
    c.reserve(1, 9)  # 3 pages
    assert c.tables[1] == [0, 1, 2] and c.free_blocks == 2
    c.reserve(1, 12)  # still 3 pages
    assert c.tables[1] == [0, 1, 2] and c.free_blocks == 2
    tables = {k: list(v) for k, v in c.tables.items()}
    with pytest.raises(OutOfKVBlocks):
        c.reserve(1, 21)  # would need 3 more
    with pytest.raises(OutOfKVBlocks):
        c.reserve(2, 12)  # a new sequence needing 3
    assert c.free_blocks == 2 and c.tables == tables and 2 not in c.tables
    assert c.blocks_needed(2, 8) == 2 and c.blocks_needed(1, 13) == 1
    c.reserve(2, 8)
    assert c.tables[2] == [3, 4] and c.free_blocks == 0


def test_free_returns_pages_and_they_are_reused():
    c = _cache(4)
    c.reserve(1, 8)
    c.reserve(2, 8)
    c.free(1)
    assert c.free_blocks == 2 and 1 not in c.tables
    c.free(1)  # freeing twice (or an unknown id) is harmless
    c.free(99)
    assert c.free_blocks == 2
    c.reserve(3, 5)
    assert sorted(c.tables[3]) == [0, 1]
    c.free(2)
    c.free(3)
    assert c.free_blocks == 4 and c.tables == {}


def test_pages_of_a_sequence_need_not_be_contiguous():
    c = _cache(8, block_size=4)
    c.reserve(7, 4)   # page 0
    c.reserve(8, 6)   # pages 1, 2
    c.reserve(7, 10)  # pages 0, 3, 4
    assert c.tables == {7: [0, 3, 4], 8: [1, 2]}
    assert c.scratch_page == 8 and c.tensor.shape[2] == 9  # never handed out


def test_write_puts_records_at_slots():
    c = _cache(6, block_size=4, layers=2)
    c.reserve(1, 3)
    c.reserve(2, 7)
    slots = _slots(c, 2, 2, 7) + _slots(c, 1, 0, 3)
    t = len(slots)
    new = torch.randint(0, 256, (2, 2, t, 16), dtype=torch.uint8)
    c.write(new, torch.tensor(slots))
    pages = c.tensor  # [L, 2, NB + scratch, BS, R]
    assert pages.shape == (2, 2, 7, 4, 16)
    written = torch.zeros(7, 4, dtype=torch.bool)
    for i, s in enumerate(slots):
        page, off = divmod(s, 4)
        assert torch.equal(pages[:, :, page, off], new[:, :, i])
        written[page, off] = True
    assert int(pages[:, :, ~written].count_nonzero()) == 0  # nothing else touched


def _slots(c: PagedKVCache, seq_id: int, start: int, end: int) -> list[int]:
    """Cache slots of positions start..end of seq_id, as the engine's flat batch has them."""
    span = Span([0] * (end - start), start, c.tables[seq_id])
    return flat_batch([span], c.block_size).slots


# ---------------------------------------------------------------------------------------------
# Scheduler with a fake model
# ---------------------------------------------------------------------------------------------

def _next_token(req: Request, pos: int) -> int:
    """What the fake model 'samples' at position pos: a function of the request and position
    only, so a recomputed request produces the same tokens."""
    return (req.index * 31 + pos * 7) % 251


def _record(req: Request, pos: int, kv: int) -> torch.Tensor:
    tok = req.tokens[pos]
    return torch.tensor([req.id, pos, tok, kv], dtype=torch.int32).view(torch.uint8)


class Driver:
    def __init__(self, num_blocks, block_size=4, max_batch_tokens=64, max_seqs=8):
        self.cache = _cache(num_blocks, block_size, layers=1)
        self.sched = Scheduler(self.cache, max_batch_tokens, max_seqs)
        self.steps: list[list[tuple]] = []  # per step: (req, start, end, samples)
        self.preempted: list[Request] = []
        self.preempt_steps: list[int] = []  # index of the step whose schedule() preempted
        self.finished: list[Request] = []
        orig = self.sched.preempt

        def preempt(req):
            assert req is self.sched.running[-1], "victim must be the youngest running request"
            orig(req)
            assert self.sched.waiting[0] is req and req.computed == 0
            assert req.id not in self.cache.tables
            self.preempted.append(req)
            self.preempt_steps.append(len(self.steps))

        self.sched.preempt = preempt

    def add(self, prompt_len, max_new, index):
        req = Request([(index * 13 + i) % 251 for i in range(prompt_len)],
                      SamplingParams(max_new_tokens=max_new), index=index)
        self.sched.add(req)
        return req

    def _invariants(self, chunks):
        s, c = self.sched, self.cache
        assert sum(ch.end - ch.start for ch in chunks) <= s.max_batch_tokens
        assert len(s.running) <= s.max_seqs
        assert len({ch.req.id for ch in chunks}) == len(chunks)
        for ch in chunks:
            assert ch.req in s.running
            assert ch.start == ch.req.computed < ch.end <= len(ch.req.tokens)
            assert len(c.tables[ch.req.id]) * c.block_size >= ch.end
        owned = [p for t in c.tables.values() for p in t]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert sorted(owned + c._free) == list(range(c.num_blocks)), "page leaked or duplicated"
        assert set(c.tables) <= {r.id for r in s.running}

    def _forward(self, chunks):
        """Check each chunk's cached history, then write its new records."""
        c = self.cache
        flat = c.tensor.view(1, 2, -1, 16)
        recs, slots = [], []
        for ch in chunks:
            for pos in range(ch.start):
                slot = c.tables[ch.req.id][pos // c.block_size] * c.block_size + pos % c.block_size
                for kv in (0, 1):
                    assert torch.equal(flat[0, kv, slot], _record(ch.req, pos, kv)), \
                        f"request {ch.req.index} position {pos}: cache holds another record"
            slots += _slots(c, ch.req.id, ch.start, ch.end)
            recs += [torch.stack([_record(ch.req, p, 0), _record(ch.req, p, 1)])
                     for p in range(ch.start, ch.end)]
        c.write(torch.stack(recs, dim=1)[None], torch.tensor(slots))

    def step(self):
        chunks = self.sched.schedule()
        assert chunks, "scheduler made no progress"
        self._invariants(chunks)
        self._forward(chunks)
        self.steps.append([(ch.req, ch.start, ch.end, ch.samples) for ch in chunks])
        sampling = [ch for ch in chunks if ch.samples]
        for ch in chunks:
            ch.req.computed = ch.end
        for ch in sampling:
            req = ch.req
            req.out.append(_next_token(req, len(req.tokens)))
            if len(req.out) >= req.params.max_new_tokens:
                self.sched.finish(req, "length")
                self.finished.append(req)
        return chunks

    def run(self, max_steps=2000):
        n = 0
        while self.sched.has_work():
            self.step()
            n += 1
            assert n < max_steps, "no termination"
        assert self.cache.free_blocks == self.cache.num_blocks and self.cache.tables == {}
        return n


def _expected_out(req: Request, max_new: int) -> list[int]:
    toks = list(req.prompt)
    for _ in range(max_new):
        toks.append(_next_token(req, len(toks)))
    return toks[len(req.prompt):]


def test_continuous_batching_admits_while_decoding():
    d = Driver(num_blocks=32)
    a = d.add(5, 6, index=0)
    d.step()
    assert d.steps[-1] == [(a, 0, 5, True)] and len(a.out) == 1
    d.step()  # a decodes alone
    assert d.steps[-1] == [(a, 5, 6, True)] and len(a.out) == 2
    b = d.add(4, 3, index=1)
    chunks = d.step()
    assert [(ch.req, ch.start, ch.end) for ch in chunks] == [(a, 6, 7), (b, 0, 4)]
    assert len(a.out) == 3 and len(b.out) == 1  # both sampled in the same flat batch
    d.run()
    assert a.finish_reason == b.finish_reason == "length"
    assert a.out == _expected_out(a, 6) and b.out == _expected_out(b, 3)


def test_max_seqs_limits_running():
    d = Driver(num_blocks=64, max_seqs=2)
    reqs = [d.add(3, 4, index=i) for i in range(5)]
    d.step()
    assert len(d.sched.running) == 2 and len(d.sched.waiting) == 3
    d.run()
    assert all(r.out == _expected_out(r, 4) for r in reqs)
    assert max(len(s) for s in d.steps) == 2


def test_chunked_prefill_under_token_budget():
    d = Driver(num_blocks=32, max_batch_tokens=8)
    a = d.add(3, 10, index=0)
    d.step()  # a: prefill 0..3
    b = d.add(20, 2, index=1)
    b_chunks = []
    while b.computed < 20:
        chunks = d.step()
        assert sum(ch.end - ch.start for ch in chunks) <= 8
        assert chunks[0].req is a and chunks[0].end - chunks[0].start == 1  # a keeps decoding
        b_chunks += [(st, e, smp) for r, st, e, smp in d.steps[-1] if r is b]
    # 7 tokens of budget left per step after a's decode: 0-7, 7-14, 14-20; only the last one
    # reaches the end of the prompt and samples.
    assert b_chunks == [(0, 7, False), (7, 14, False), (14, 20, True)]
    assert len(b.out) == 1
    d.run()
    assert a.out == _expected_out(a, 10) and b.out == _expected_out(b, 2)


def test_long_prompt_alone_is_split_into_budget_chunks():
    d = Driver(num_blocks=32, max_batch_tokens=6)
    r = d.add(16, 1, index=0)
    d.run()
    spans = [(s, e) for step in d.steps for (_, s, e, _) in step]
    assert spans == [(0, 6), (6, 12), (12, 16)]
    assert r.out == _expected_out(r, 1)


@pytest.mark.parametrize("num_blocks,max_batch_tokens,max_seqs", [
    (6, 64, 8), (7, 8, 8), (5, 16, 3)])
def test_tiny_cache_preempts_but_every_request_finishes(num_blocks, max_batch_tokens, max_seqs):
    gen = torch.Generator().manual_seed(num_blocks)
    block = 4
    specs = []
    for i in range(7):
        prompt = int(torch.randint(2, 9, (1,), generator=gen))
        new = int(torch.randint(3, 11, (1,), generator=gen))
        # every request fits the cache on its own (the engine guarantees this via max_seq_len)
        assert -(-(prompt + new) // block) <= num_blocks
        specs.append((prompt, new))

    d = Driver(num_blocks, block, max_batch_tokens, max_seqs)
    reqs = [d.add(p, n, index=i) for i, (p, n) in enumerate(specs)]
    for _ in range(3):  # keep adding requests while the first ones run
        d.step()
    late = [d.add(5, 6, index=7), d.add(3, 4, index=8)]
    d.run()

    assert d.preempted, "the cache is small enough that someone must be preempted"
    assert sum(r.preemptions for r in reqs + late) == len(d.preempted)
    for r, (_, n) in zip(reqs + late, specs + [(5, 6), (3, 4)]):
        assert r.finish_reason == "length"
        assert len(r.out) == n
        assert r.out == _expected_out(r, n)  # preemption neither lost nor duplicated a token
    assert sorted(d.finished, key=lambda r: r.index) == reqs + late
    assert not d.sched.waiting and not d.sched.running
    assert d.cache.free_blocks == d.cache.num_blocks


def test_preempted_request_resumes_first_and_recomputes():
    """Cache of 4 pages of 4 tokens: a (prompt 6) and b (prompt 4) run; when a outgrows its
    pages b, the youngest, is preempted, waits at the head of the queue ahead of c (added
    later), and is recomputed from prompt + generated tokens once pages are free."""
    d = Driver(num_blocks=4, block_size=4)
    a = d.add(6, 7, index=0)
    b = d.add(4, 6, index=1)
    d.step()
    assert [r for r, *_ in d.steps[-1]] == [a, b]
    c = d.add(2, 2, index=2)
    for _ in range(20):
        if d.preempted:
            break
        d.step()
    assert d.preempted[:1] == [b] and b.preemptions == 1 and len(b.out) > 0
    assert list(d.sched.waiting)[:2] == [b, c]
    out_at_preemption = list(b.out)
    d.run()

    def first_step(req, start=None):
        return min(i for i, step in enumerate(d.steps) if i >= d.preempt_steps[0]
                   and any(r is req and (start is None or s == start) for r, s, _, _ in step))

    b_restart, c_start = first_step(b, start=0), first_step(c)
    assert b_restart <= c_start  # front of the queue: b is admitted no later than c
    spans = [(st, e, smp) for step in d.steps for r, st, e, smp in step if r is b]
    cut = [st for st, _, _ in spans].index(0, 1)  # the recomputation starts over
    first, again = spans[:cut], spans[cut:]
    # the same chunks as the first time: the prompt, then each generated token in a step of
    # its own; only the chunk of the newest token samples again
    history = len(b.prompt) + len(out_at_preemption) - 1
    assert [(st, e) for st, e, _ in again[:len(first)]] == [(st, e) for st, e, _ in first]
    assert [(st, e) for st, e, _ in first] == [(0, 4)] + [(p, p + 1) for p in range(4, history)]
    assert [smp for _, e, smp in again if e <= history] == [False] * len(first)
    assert b.out[: len(out_at_preemption)] == out_at_preemption
    assert [r.out for r in (a, b, c)] == [_expected_out(a, 7), _expected_out(b, 6),
                                          _expected_out(c, 2)]


def test_recomputation_repeats_the_prompt_chunks():
    """A prompt first computed in budget-sized chunks beside a decoding request is recomputed
    in those same chunks after a preemption, whatever budget is free then."""
    d = Driver(num_blocks=16, max_batch_tokens=8)
    a = d.add(3, 30, index=0)
    d.step()
    b = d.add(20, 3, index=1)
    while len(b.out) < 2:
        d.step()
    assert b.prefill_ends == [7, 14, 20]
    d.sched.preempt(b)
    d.sched.finish(a, "length")  # the whole budget is free now
    d.run()
    spans = [(st, e) for step in d.steps for r, st, e, _ in step if r is b]
    assert spans == [(0, 7), (7, 14), (14, 20), (20, 21), (0, 7), (7, 14), (14, 20), (20, 21),
                     (21, 22)]
    assert b.out == _expected_out(b, 3)


def test_abort_from_the_batch_and_from_the_queue():
    d = Driver(num_blocks=8, max_seqs=1)
    a = d.add(5, 10, index=0)
    b = d.add(3, 10, index=1)
    d.step()
    assert d.sched.running == [a] and list(d.sched.waiting) == [b]
    d.sched.abort(b)  # waiting
    d.sched.abort(a)  # running, holding pages
    assert a.finish_reason == b.finish_reason == "abort"
    assert not d.sched.has_work() and d.cache.free_blocks == 8 and d.cache.tables == {}
    d.sched.abort(a)  # twice: harmless
    c = d.add(4, 2, index=2)
    d.run()
    assert c.out == _expected_out(c, 2)
