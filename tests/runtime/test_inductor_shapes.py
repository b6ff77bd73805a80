"""Engine.load(compile=True) compiles the program once for every batch shape: decode buckets,
prefill chunks and mixed steps share one dynamic graph (an H100 load used to recompile six
times, 30 s each: duck sizing tied the step inputs' offsets in the staging buffer to unrelated
sizes, and a step with one sequence, one token, one logits row or one block-table column
specialised a graph of its own; compiled steps now carry a padding row instead). The compiled
engine's greedy tokens equal the eager one's at every batch size."""
import torch._dynamo.utils as dynamo_utils

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine

PROMPTS = ["the quick brown fox", "def main():", "hello", "a b c d e f", "x = 1",
           "a longer prompt that spans more than one page of the cache " * 3]


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
    for prompts in (PROMPTS[:5], PROMPTS[:2], PROMPTS[2:3], PROMPTS[5:], PROMPTS[:3]):
        # prefill of n, decode steps of n (and fewer as requests end); 1 to 4 pages
        want = [c.token_ids for c in eager.generate(prompts, max_new_tokens=4)]
        got = [c.token_ids for c in compiled.generate(prompts, max_new_tokens=4)]
        assert got == want, prompts
    graphs = dynamo_utils.counters["stats"]["unique_graphs"] - before
    assert graphs == 1, f"{graphs} graphs compiled for one program"
