"""CUDA graphs of the decode step (runtime/cuda_graphs.py) on a real GPU, with the artifact's
own kernels: a tiny Llama with head dim 64 (the attention kernels' smallest) compiled for
this GPU in float16 with `--kernels build`, fp16 and W4A8 / KV4.

* Greedy (and seeded random) output is identical with and without graphs, for a batch whose
  size crosses every bucket (8 -> 4 -> 2 -> 1 rows) as requests finish, and the graphs are
  what ran: replays counted per bucket, one per pure decode step.
* A decode step makes no host synchronisation before its one read of the sampled ids
  (torch.cuda sync debug mode "error" around everything else: scheduling, staging, the copy,
  the block-table updates, the replay or the eager launches), including steps where
  sequences gain pages.
* Overlapped steps (Engine(overlap=True)) give the same tokens, with graphs and without.
* A program that cannot be captured (the attention reference reads lengths on the host)
  turns graphs off with a warning, or fails the load when graphs were asked for.

Needs a GPU and nvcc (the kernels are built for the artifact, as in tests/test_smollm2_gpu.py).
"""
from __future__ import annotations

import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.cuda_graphs import no_host_sync
from qcompile.runtime.engine import Engine
from qcompile.runtime.sampler import SamplingParams

pytestmark = pytest.mark.gpu

HEAD_DIM_64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)
KV_BYTES = 64 << 20
PROMPTS = [[3 + i, 40 + 7 * i, 9, 100 + i, 17][: 2 + i % 4] for i in range(7)]
NEW_TOKENS = [2, 3, 5, 8, 12, 20, 40]  # 7 rows (bucket 8), then 4, 2, 1 as they finish


@pytest.fixture(scope="module", params=[("fp16", "fp16"), ("w4a8", "int4")],
                ids=["fp16", "w4a8-kv4"])
def artifact(request, make_tiny_checkpoint, tmp_path_factory):
    precision, kv = request.param
    major, _ = torch.cuda.get_device_capability()
    extra = dict(quantizer="rtn") if precision != "fp16" else {}
    cfg = CompileConfig(target=f"sm{major}0", precision=precision, kv=kv, dtype="float16",
                        kernels="build", **extra)
    out = tmp_path_factory.mktemp(f"graphs-{precision}") / "art"
    return compile_model(make_tiny_checkpoint("llama", **HEAD_DIM_64), cfg, out,
                         progress=False)


def _load(artifact, graphs, overlap=False):
    return Engine.load(artifact, device="cuda", max_seqs=8, kv_cache_bytes=KV_BYTES,
                       cuda_graphs=graphs, compile=False,  # Inductor: test_gpu_reference
                       overlap=overlap)


def _params(n, **sampling):
    return SamplingParams(max_new_tokens=n, stop_on_eos=False, **sampling)


def _generate(engine, **sampling):
    reqs = [engine._submit([p], False, _params(n, **sampling))[0]
            for p, n in zip(PROMPTS, NEW_TOKENS)]
    for _ in engine._run(reqs):
        pass
    assert engine.cache.free_blocks == engine.cache.num_blocks
    return [r.out for r in reqs]


def test_graphs_give_the_eager_tokens_across_buckets(artifact):
    graphs, eager = _load(artifact, True), _load(artifact, False)
    assert eager.graphs is None and graphs.graphs is not None
    assert set(graphs.graphs.graphs) == {(b, r) for b in (1, 2, 4, 8) for r in (True, False)}
    assert _generate(graphs) == _generate(eager)
    # after the one prefill step every step is a pure decode step: 39, each replayed, in
    # the smallest bucket that holds the rows still running (7, 6, 5, 5, then 4 ... 1)
    assert graphs.graphs.replays == {(8, False): 4, (4, False): 7, (2, False): 8,
                                     (1, False): 20}
    seeded = dict(temperature=0.8, top_p=0.9, seed=5)
    assert _generate(graphs, **seeded) == _generate(eager, **seeded)
    assert sum(n for (_, random), n in graphs.graphs.replays.items() if random) == 39


@pytest.mark.parametrize("compile", [True, "aot"], ids=["inductor", "aot"])
def test_compiled_engine_with_graphs_and_overlap(artifact, compile, tmp_path, monkeypatch):
    """The program under torch.compile (one dynamic graph, padding rows, buckets from 2) and
    under AOTInductor (a cached package): decode steps replayed from CUDA graphs and
    overlapped give the tokens of the same program's plain eager steps; its logits are the
    uncompiled program's to fp16 noise (as test_gpu_reference's Inductor test bounds them)."""
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))

    def load(graphs, overlap, compile=compile):
        return Engine.load(artifact, device="cuda", max_seqs=8, kv_cache_bytes=KV_BYTES,
                           cuda_graphs=graphs, compile=compile, overlap=overlap)
    fast, plain = load(True, True), load(False, False)
    assert fast.graphs is not None and fast.compiled == compile
    assert _generate(fast) == _generate(plain)
    ids = [[3, 40, 9, 100, 17, 5, 6], [4, 47]]
    for a, b in zip(load(False, False, compile=False).score(ids), fast.score(ids)):
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert rel < 3e-3, f"{compile} vs uncompiled logits: relative error {rel:.2e}"


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_overlapped_steps_give_the_same_tokens(artifact, graphs):
    """Engine(overlap=True) on the GPU: the in-flight tokens gathered on the device into the
    bucket's token buffer before its replay (and the ids' pinned copies, double-buffered)
    give the plain steps' tokens, greedy and seeded."""
    plain, over = _load(artifact, graphs), _load(artifact, graphs, overlap=True)
    assert _generate(over) == _generate(plain)
    seeded = dict(temperature=0.8, top_p=0.9, seed=5)
    assert _generate(over, **seeded) == _generate(plain, **seeded)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_decode_step_does_not_synchronise(artifact, graphs):
    engine = _load(artifact, graphs)
    reqs = [engine._submit([p], False, _params(40))[0] for p in PROMPTS[:5]]
    engine.step()  # the prefill
    before = dict(engine.graphs.replays) if graphs else {}
    for _ in range(20):  # crosses a page boundary (16 tokens a page): table updates too
        with no_host_sync():
            launched = engine._launch(None)
        engine._complete(launched)  # the step's one synchronisation: its ids' copy
    assert all(len(r.out) == 21 for r in reqs)
    if graphs:
        assert engine.graphs.replays[8, False] == before.get((8, False), 0) + 20


def test_uncapturable_program_runs_eagerly(artifact, monkeypatch):
    monkeypatch.setenv("QCOMPILE_ATTENTION", "reference")  # the engine's attention: reference
    with pytest.warns(UserWarning, match="CUDA graphs are off"):
        engine = _load(artifact, None)
    assert engine.graphs is None
    assert len(engine.generate([PROMPTS[0]], max_new_tokens=3)[0].token_ids) <= 3
    with pytest.raises(RuntimeError, match="synchroniz"):
        _load(artifact, True)
