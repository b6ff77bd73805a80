"""Engine.load(compile=True) compiles the program once for every batch shape: the decode
buckets, prefill chunks and mixed steps share one dynamic graph, single-token steps get at most
one more (an H100 load used to recompile six times, 30 s each, because duck sizing tied the step
inputs' offsets in the staging buffer to unrelated sizes). The compiled engine's greedy tokens
equal the eager one's at every batch size."""
import torch._dynamo.utils as dynamo_utils

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine

PROMPTS = ["the quick brown fox", "def main():", "hello", "a b c d e f", "x = 1"]


def test_one_graph_for_every_batch_shape(make_tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cfg = CompileConfig(precision="w4a8", kv="int4", dtype="float32", kernels="skip",
                        quantizer="rtn")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    eager = Engine.load(art, compile=False, max_seqs=8)
    compiled = Engine.load(art, compile=True, max_seqs=8)
    assert compiled.compiled
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for n in (5, 2, 1, 3):  # prefill of n, decode steps of n (and fewer as requests end)
        want = [c.token_ids for c in eager.generate(PROMPTS[:n], max_new_tokens=4)]
        got = [c.token_ids for c in compiled.generate(PROMPTS[:n], max_new_tokens=4)]
        assert got == want, n
    graphs = dynamo_utils.counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= 2, f"{graphs} graphs compiled for one program"
