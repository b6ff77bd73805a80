"""Overlapped steps (Engine(overlap=True)): each step is launched before the previous one's
sampled ids are read, its in-flight tokens taken on the device (the staged gather). On the CPU
the device is synchronous, so these tests pin the bookkeeping, not the speed: every request
gets exactly the tokens of plain steps, with EOS, length limits, preemption, seeded sampling,
aborts and bucketed (graph-replayed) decode steps; no page is leaked and a request finished
by EOS drops the one token computed after it.
"""
from __future__ import annotations

import pytest
from test_engine_steps import CFG, _bucketed, _greedy

from qcompile.runtime.engine import Engine
from qcompile.runtime.sampler import SamplingParams

@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    """test_engine_steps' tiny W4A8 / KV4 artifact (float32: bitwise-sensitive)."""
    return tiny_artifact(CFG)


PROMPTS = [[3 + i, 50 + i, 7, 9 + i][: 2 + i % 3] for i in range(6)]


def _run(engine, prompts, params):
    reqs = engine.submit(prompts, params) if not isinstance(params, list) else \
        [engine.submit([p], q)[0] for p, q in zip(prompts, params)]
    for _ in engine._run(reqs):
        pass
    return reqs


def test_overlap_gives_the_plain_tokens(artifact):
    params = [_greedy(n) for n in (1, 2, 3, 5, 8, 13)]  # the batch shrinks as they finish
    plain = [r.out for r in _run(Engine.load(artifact, max_seqs=6), PROMPTS, params)]
    engine = Engine.load(artifact, max_seqs=6, overlap=True)
    got = _run(engine, PROMPTS, params)
    assert [r.out for r in got] == plain
    assert [len(r.out) for r in got] == [1, 2, 3, 5, 8, 13]
    assert all(r.pending == 0 for r in got)
    assert engine._inflight is None  # length limits are known ahead: no wasted step
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_overlap_with_bucketed_replays_and_sampling(artifact):
    """Decode buckets replayed on their captured views, seeded random sampling: the gather
    writes the bucket's token buffer before the replay reads it."""
    params = _greedy(9, temperature=0.8, seed=3)
    plain = [r.out for r in _run(_bucketed(artifact, True), PROMPTS, params)]
    engine = _bucketed(artifact, True, overlap=True)
    assert [r.out for r in _run(engine, PROMPTS, params)] == plain
    assert sum(engine.graphs.replays.values()) > 0


def test_eos_seen_one_step_late_drops_the_extra_token(artifact):
    """Make a token the plain run produces early an EOS: both engines stop there; the
    overlapped one has computed one more step for that request, whose token it drops."""
    plain_engine = Engine.load(artifact, max_seqs=6)
    free = [r.out for r in _run(plain_engine, PROMPTS, _greedy(10))]
    eos = free[2][3]
    results = []
    for overlap in (False, True):
        engine = Engine.load(artifact, max_seqs=6, overlap=overlap)
        engine.eos_ids = {eos}
        reqs = _run(engine, PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=True))
        results.append([(r.out, r.finish_reason) for r in reqs])
        assert engine.cache.free_blocks == engine.cache.num_blocks
        if engine._inflight is not None:  # launched before the last EOS was read: dropped
            assert engine.step() == []
        assert all(r.pending == 0 for r in reqs)
    assert results[0] == results[1]
    assert results[1][2][0][-1] == eos and results[1][2][1] == "eos"


def test_overlap_under_preemption_matches_alone(artifact):
    """8 requests outgrow a 17-page cache while decoding (as test_engine_steps'
    test_load_does_not_change_greedy_output): preempted with a token in flight, they still
    produce their tokens run alone."""
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(4 + i)] for i in range(8)]
    engine = Engine.load(artifact)
    alone = [engine.generate([p], max_new_tokens=30, stop_on_eos=False)[0].token_ids
             for p in prompts]
    block = engine.cache.bytes_per_block(engine.cache.spec)
    small = Engine.load(artifact, kv_cache_bytes=block * 17, overlap=True)
    reqs = _run(small, prompts, _greedy(30))
    assert sum(r.preemptions for r in reqs) >= 3, [r.preemptions for r in reqs]
    assert [r.out for r in reqs] == alone
    assert small.cache.free_blocks == small.cache.num_blocks


def test_abort_with_a_step_in_flight(artifact):
    prompts = PROMPTS[:3]
    plain = [r.out for r in _run(Engine.load(artifact), prompts, _greedy(8))]
    engine = Engine.load(artifact, overlap=True)
    reqs = engine.submit(prompts, _greedy(8))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None and reqs[1].pending
    engine.abort(reqs[1])
    assert reqs[1].finish_reason == "abort"
    for _ in engine._run([reqs[0], reqs[2]]):
        pass
    assert reqs[0].out == plain[0] and reqs[2].out == plain[2]
    assert reqs[1].out == plain[1][:len(reqs[1].out)]  # what it had before the abort
    assert engine.cache.free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_generate_and_stream_agree(artifact, overlap):
    engine = Engine.load(artifact, overlap=overlap)
    want = [c.token_ids for c in engine.generate(["ab", "cd"], max_new_tokens=6,
                                                   stop_on_eos=False)]
    events = list(engine.stream(["ab", "cd"], max_new_tokens=6, stop_on_eos=False))
    assert [[e.token_id for e in events if e.index == i] for i in (0, 1)] == want
