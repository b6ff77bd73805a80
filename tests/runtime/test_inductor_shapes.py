"""Engine.load(compile=True) compiles the program once for every batch shape: decode buckets,
prefill chunks and mixed steps share one dynamic graph (an H100 load used to recompile six
times, 30 s each: duck sizing tied the step inputs' offsets in the staging buffer to unrelated
sizes, and a step with one sequence, one token, one logits row or one block-table column
specialised a graph of its own; compiled steps now carry a padding row instead). The compiled
engine's greedy tokens equal the eager one's at every batch size."""
import torch._dynamo.utils as dynamo_utils

from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine

CFG = CompileConfig(precision="w4a8", kv="int4", dtype="float32", kernels="skip",
                    quantizer="rtn")
PROMPTS = ["the quick brown fox", "def main():", "hello", "a b c d e f", "x = 1",
           "a longer prompt that spans more than one page of the cache " * 3]


def test_one_graph_for_every_batch_shape(tiny_artifact, inductor_cache_dir, tmp_path,
                                         monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir)
    art = tiny_artifact(CFG)
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


def test_wo_input_quantizer_inlined_for_inductor(tiny_artifact):
    """The activation quantizer the fusion passes leave opaque (the attention output's, wo's
    input) is called as its ATen reference in the program Inductor compiles, so it fuses into
    one kernel; the artifact's program keeps the op."""
    import torch

    from qcompile.runtime.artifact import load_program
    from qcompile.runtime.compiled import inline_act_quants
    gm = load_program(tiny_artifact(CFG)).module()
    op = torch.ops.qcompile.quant_a8.default
    calls = lambda: sum(n.target is op for n in gm.graph.nodes)  # noqa: E731
    layers = 2
    assert calls() == layers + 1  # one per layer (wo's input) and the W8A8 head's input
    assert inline_act_quants(gm) == layers + 1 and calls() == 0
