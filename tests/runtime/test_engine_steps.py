"""Engine steps on the CPU, with a tiny W4A8 / KV4 artifact (float32: its float reductions are
sensitive to how a computation is batched, so bitwise comparisons see any change of it).

* Preemption: a request preempted after g tokens is recomputed in the chunks of its first
  computation, so the logits of every token it samples are bitwise those of an uninterrupted
  run (a single prefill chunk over prompt + generated tokens differs in the last bits); many
  concurrent requests on a cache too small for them give every request its tokens run alone
  (this replaces tests/compiler/test_artifact.py's 4-request preemption test).
* Abort: Engine.abort and a stream closed early free the request's pages at once; the other
  requests, and another stream interleaved with it, carry on unchanged.
* Decode buckets, as on CUDA, exercised on the CPU: single-token steps padded to a bucket
  (padding rows on the scratch page), replayed through a stand-in for the CUDA graphs that
  reads the step buffers' views of each bucket as they were at "capture": the same tokens and
  bitwise the same logits as eager bucketed steps, the same tokens as unpadded steps, and the
  replay taken on every pure decode step while the batch crosses bucket sizes.
"""
from __future__ import annotations

import collections

import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime import engine as engine_mod
from qcompile.runtime.cuda_graphs import decode_buckets
from qcompile.runtime.engine import Engine
from qcompile.runtime.sampler import SamplingParams

CFG = CompileConfig(precision="w4a8", kv="int4", dtype="float32", kernels="skip",
                    quantizer="rtn")
PROMPT = [5, 17, 33, 9, 100, 42, 7]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact(CFG)


@pytest.fixture
def sampled_logits(monkeypatch):
    """Every logits tensor the engine samples from, in order."""
    seen = []
    sample = engine_mod.sample_rows

    def record(logits, *args, **kw):
        seen.append(logits.clone())
        return sample(logits, *args, **kw)
    monkeypatch.setattr(engine_mod, "sample_rows", record)
    return seen


def _greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, stop_on_eos=False, **kw)


def _run_one(engine, prompt, new, sampled_logits, preempt_after=None):
    """Tokens of one request and the logits row each was sampled from; the request is
    preempted (its pages freed, computed = 0) at the first step boundary where it has
    preempt_after tokens and something cached."""
    [req] = engine._submit([prompt], False, _greedy(new))
    rows = []
    while not req.finish_reason:
        if len(req.out) == preempt_after and req.computed and not req.preemptions:
            engine.scheduler.preempt(req)
        before, n = len(req.out), len(sampled_logits)
        engine.step()
        assert len(sampled_logits) == n + 1  # one sampling call per step
        if len(req.out) > before:
            rows.append(sampled_logits[-1][0])
    return req, rows


@pytest.mark.parametrize("preempt_after", [1, 6])
def test_preempted_request_recomputes_bitwise(artifact, sampled_logits, preempt_after):
    engine = Engine.load(artifact)
    want, want_rows = _run_one(engine, PROMPT, 10, sampled_logits)
    got, got_rows = _run_one(engine, PROMPT, 10, sampled_logits, preempt_after)
    assert got.preemptions == 1 and got.out == want.out
    for i, (a, b) in enumerate(zip(got_rows, want_rows)):
        assert torch.equal(a, b), f"token {i}: logits differ by {(a - b).abs().max():.2e}"
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_preempted_mid_prompt_repeats_its_chunks(artifact, sampled_logits):
    """A prompt prefilled in two chunks (token budget 5) is recomputed in those two chunks,
    after a preemption between them as after one during decoding."""
    engine = Engine.load(artifact, max_batch_tokens=5)
    want, want_rows = _run_one(engine, PROMPT, 6, sampled_logits)
    assert want.prefill_ends == [5, 7]
    for after in (0, 3):
        got, got_rows = _run_one(engine, PROMPT, 6, sampled_logits, preempt_after=after)
        assert got.out == want.out and got.preemptions == 1
        assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))


def test_load_does_not_change_greedy_output(artifact):
    """8 requests on a cache of 17 pages (one full sequence takes 16): they are admitted on
    their one-page prompts, then outgrow the cache while decoding, so the youngest are
    preempted after producing tokens; every request produces its tokens run alone. (The
    token budget holds every prompt whole: only the preemptions depend on the load.)"""
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(4 + i)] for i in range(8)]
    engine = Engine.load(artifact)
    alone = [engine.generate([p], max_new_tokens=30, stop_on_eos=False)[0].token_ids
             for p in prompts]
    block = engine.cache.bytes_per_block(engine.cache.spec)
    small = Engine.load(artifact, kv_cache_bytes=block * 17)
    reqs = small._submit(prompts, False, _greedy(30))
    for _ in small._run(reqs):
        pass
    assert sum(r.preemptions for r in reqs) >= 3, [r.preemptions for r in reqs]
    assert [r.out for r in reqs] == alone
    assert not small.scheduler.has_work()
    assert small.cache.free_blocks == small.cache.num_blocks


# ---- abort ------------------------------------------------------------------------------

def test_abort_frees_pages_and_others_continue(artifact):
    engine = Engine.load(artifact)
    prompts = [PROMPT, [9, 8, 7, 6, 5], [40, 41, 42]]
    alone = [engine.generate([p], max_new_tokens=8, stop_on_eos=False)[0].token_ids
             for p in prompts]
    a, b, c = engine._submit(prompts, False, _greedy(8))
    for _ in range(3):
        engine.step()
    held = len(engine.cache.tables[b.id])
    free = engine.cache.free_blocks
    engine.abort(b)
    assert b.finish_reason == "abort" and b.id not in engine.cache.tables
    assert engine.cache.free_blocks == free + held
    assert b not in engine.scheduler.running
    while a.finish_reason is None or c.finish_reason is None:
        engine.step()
    assert [a.out, c.out] == [alone[0], alone[2]]
    engine.abort(a)  # finished: left as it is
    assert a.finish_reason == "length" and engine.cache.free_blocks == engine.cache.num_blocks


def test_closed_stream_aborts_its_requests(artifact):
    engine = Engine.load(artifact)
    want = engine.generate(["import os", "def f"], max_new_tokens=12, stop_on_eos=False)
    keep = engine.stream(["import os"], max_new_tokens=12, stop_on_eos=False)
    drop = engine.stream(["def f", "the quick brown fox"], max_new_tokens=12, stop_on_eos=False)
    kept = [next(keep).token_id]
    dropped = [next(drop) for _ in range(3)]
    assert len(engine.scheduler.running) == 3
    drop.close()  # the client went away
    assert len(engine.scheduler.running) == 1 and not engine.scheduler.waiting
    kept += [ev.token_id for ev in keep]
    assert kept == want[0].token_ids  # the other stream saw every one of its tokens
    assert [ev.token_id for ev in dropped if ev.index == 0] == want[1].token_ids[:2]
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_interleaved_streams_each_get_all_their_tokens(artifact):
    engine = Engine.load(artifact)
    want = [c.token_ids for c in engine.generate(["ab", "cd", "ef"], max_new_tokens=6,
                                                   stop_on_eos=False)]
    s1 = engine.stream(["ab", "cd"], max_new_tokens=6, stop_on_eos=False)
    s2 = engine.stream(["ef"], max_new_tokens=6, stop_on_eos=False)
    got1, got2 = [next(s1)], []
    got2 += list(s2)  # runs the engine until "ef" is done: s1's requests advance meanwhile
    got1 += list(s1)
    assert [e.token_id for e in got2] == want[2]
    assert [[e.token_id for e in got1 if e.index == i] for i in (0, 1)] == want[:2]
    assert [e.finish_reason for e in got1].count("length") == 2
    assert [e.finish_reason for e in got2] == [None] * 5 + ["length"]


# ---- decode buckets -----------------------------------------------------------------------

class ViewReplay:
    """Stands in for runtime/cuda_graphs.DecodeGraphs on the CPU: 'captures' each bucket's
    step-buffer views once and replays the step on exactly those views, as a graph reads
    the device addresses it was captured with."""

    def __init__(self, step, stage, buckets):
        self.step, self.replays = step, collections.Counter()
        self.views = {b: stage(b) for b in buckets}

    def replay(self, bucket, random):
        self.replays[bucket, random] += 1
        return self.step(self.views[bucket], random)


def _bucketed(artifact, graphs: bool, **kw):
    engine = Engine.load(artifact, max_seqs=6, **kw)
    engine.decode_buckets = decode_buckets(6)
    if graphs:
        engine.graphs = ViewReplay(engine._device_step, engine._stage_padding,
                                   engine.decode_buckets)
    return engine


def test_decode_buckets_replay_equals_eager(artifact, sampled_logits):
    assert decode_buckets(6) == (1, 2, 4, 6) and decode_buckets(1) == (1,)
    prompts = [[3 + i, 50 + i, 7] for i in range(6)]
    params = [_greedy(n) for n in (2, 3, 4, 5, 6, 8)]  # the batch shrinks: 6 .. 1 rows

    def run(engine):
        sampled_logits.clear()
        reqs = [engine._submit([p], False, q)[0] for p, q in zip(prompts, params)]
        while any(r.finish_reason is None for r in reqs):
            engine.step()
        assert engine.cache.free_blocks == engine.cache.num_blocks
        return [r.out for r in reqs], [x.clone() for x in sampled_logits]

    graphs = _bucketed(artifact, True)
    got, got_logits = run(graphs)
    want, want_logits = run(_bucketed(artifact, False))
    plain, _ = run(Engine.load(artifact, max_seqs=6))
    assert got == want == plain
    assert len(got_logits) == len(want_logits)
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    # every step after the prefill is a pure decode step: 7 of them, buckets 6, 4, 2, 1
    assert graphs.graphs.replays == {(6, False): 2, (4, False): 2, (2, False): 1, (1, False): 2}
    assert sorted({x.shape[0] for x in got_logits[1:]}) == [1, 2, 4, 6]


def test_fixed_logits_rows(artifact, sampled_logits):
    """A batch-invariant engine with a float LM head computes the same number of logits rows
    every step (Engine._invariant; set here by hand: batch_invariant is for CUDA): prefill,
    eager and bucketed decode steps all sample from 6 rows, and every request gets the tokens
    of an engine without the padding."""
    prompts = [[3 + i, 50 + i, 7] for i in range(5)]

    def run(engine):
        sampled_logits.clear()
        reqs = [engine._submit([p], False, _greedy(n))[0] for p, n in zip(prompts, range(2, 7))]
        while any(r.finish_reason is None for r in reqs):
            engine.step()
        return [r.out for r in reqs], [x.shape[0] for x in sampled_logits]

    want, _ = run(Engine.load(artifact, max_seqs=6))
    for graphs in (False, True):
        engine = _bucketed(artifact, False)
        engine._logits_rows = 6  # before the "capture", as Engine.load orders them
        if graphs:
            engine.graphs = ViewReplay(engine._device_step, engine._stage_padding,
                                       engine.decode_buckets)
        got, rows = run(engine)
        assert got == want and set(rows) == {6}, (graphs, rows)


def test_rotation_folded_into_the_kv_ops(artifact, sampled_logits, monkeypatch):
    """The "kernel" rotation mode (what an engine whose attention kernels rotate runs,
    compiled.fold_kv_rotation): each layer's two mms by the kv_rotation weight become the int4
    encode's and attention's `rotation` argument, and the reference ops multiply as the graph
    did, so the engine samples bitwise the same logits."""
    from qcompile.runtime import compiled
    from qcompile.runtime.artifact import load_program, load_weights, open_artifact
    from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS
    art = open_artifact(artifact, torch.device("cpu"))
    gm, weights = load_program(art.path).module(), load_weights(art, torch.device("cpu"))
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert compiled.fold_kv_rotation(gm, weights) == 2 * art.model.num_layers
    ops = [n for n in gm.graph.nodes if n.target in (ATTENTION_OPS["int4"], KV_ENCODE_OPS["int4"])]
    assert all(n.kwargs["rotation"].name == "kv_rotation" for n in ops), ops
    left = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default]
    assert len(mms) - len(left) == 2 * art.model.num_layers  # the rotations' mms are gone
    assert compiled.fold_kv_rotation(gm, weights) == 0  # folded already
    assert compiled.fold_kv_rotation(load_program(art.path).module(), ()) == 0  # no weights

    prompts = [PROMPT, [9, 8, 7, 6, 5]]
    want = Engine.load(artifact).generate(prompts, max_new_tokens=6, stop_on_eos=False)
    want_logits = [x.clone() for x in sampled_logits]
    sampled_logits.clear()
    monkeypatch.setattr(compiled, "rotation_mode", lambda *a: "kernel")
    folds = []
    fold = compiled.fast_kv_rotation
    monkeypatch.setattr(compiled, "fast_kv_rotation", lambda *a: folds.append(fold(*a)))
    engine = Engine.load(artifact)
    got = engine.generate(prompts, max_new_tokens=6, stop_on_eos=False)
    assert engine.rotation == "kernel" and folds == [2 * art.model.num_layers]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert len(sampled_logits) == len(want_logits)
    assert all(torch.equal(a, b) for a, b in zip(sampled_logits, want_logits))


def test_batch_invariant_needs_cuda_inductor_and_integer_gemms(artifact, served_artifact):
    """Engine.load(batch_invariant=True) says in one line why it cannot hold: on the CPU, without
    Inductor, for float linears, without the attention kernels."""
    from qcompile.runtime.artifact import open_artifact
    from qcompile.runtime.engine import _check_invariant
    with pytest.raises(ValueError, match="for CUDA"):
        Engine.load(artifact, batch_invariant=True)
    cuda = torch.device("cuda")
    cpu = torch.device("cpu")
    w4a8, fp16 = open_artifact(artifact, cpu), open_artifact(served_artifact, cpu)
    with pytest.raises(ValueError, match="compile=True"):
        _check_invariant(w4a8, cuda, False, object())
    with pytest.raises(ValueError, match="precision fp16"):
        _check_invariant(fp16, cuda, True, object())
    with pytest.raises(ValueError, match="attention kernels"):
        _check_invariant(w4a8, cuda, True, None)


def test_bucketed_steps_with_sampling_and_preemption(artifact):
    """Random sampling rows and a preempted request's recomputed (non-sampling) rows in
    bucketed steps: the same tokens as unbucketed steps."""
    prompts = [[3 + i, 50 + i, 7, 9] for i in range(5)]

    def run(engine):
        reqs = engine._submit(prompts, False, _greedy(10, temperature=0.8, seed=3))
        for _ in range(4):
            engine.step()
        engine.scheduler.preempt(reqs[2])
        for _ in engine._run(reqs):
            pass
        return [r.out for r in reqs]

    bucketed = _bucketed(artifact, True)
    assert run(bucketed) == run(Engine.load(artifact, max_seqs=6))
    assert bucketed.graphs.replays[6, True] > 0  # random rows, recomputed rows, padding


@pytest.mark.parametrize("max_seq_len", [2, 64])
def test_warm_up_fits_and_leaves_nothing(make_tiny_checkpoint, tmp_path, max_seq_len):
    """The load's warm-up (run on CUDA; called here on the CPU) fits any served length and
    leaves the engine as it found it: no request, every page free."""
    cfg = CompileConfig(precision="fp16", kv="fp16", dtype="float32", kernels="skip",
                        max_seq_len=max_seq_len)
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    engine = Engine.load(art)
    engine._warm_up()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.cache.free_blocks == engine.cache.num_blocks
