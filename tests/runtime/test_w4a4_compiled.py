"""A w4a4 artifact under TorchInductor (the GPU runtime's path): w_down's run-time block
rotation (passes/rotate_blocks.py) and the inlined FMPQ quantizer with its per-linear clip
compile into the step graph and give the eager engine's greedy tokens (CPU)."""
import torch

from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine

PROMPTS = ["the quick brown fox", "def main():", "hello", "a b c d e f"]


def test_w4a4_compiled_matches_eager(make_tiny_checkpoint, inductor_cache_dir, tmp_path,
                                     monkeypatch):
    from qcompile.compiler.compile import compile_model
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir)
    cfg = CompileConfig(precision="w4a4", kv="int4", dtype="float32", calib_samples=4,
                        calib_seq_len=64, fmpq_int8_fraction=0.5, kernels="skip")
    art = compile_model(make_tiny_checkpoint("llama", intermediate_size=128), cfg,
                        tmp_path / "art", progress=False)
    eager = Engine.load(art, compile=False, max_seqs=8)
    compiled = Engine.load(art, compile=True, max_seqs=8)
    for prompts in (PROMPTS, PROMPTS[2:3]):
        want = [c.token_ids for c in eager.generate(prompts, max_new_tokens=4)]
        got = [c.token_ids for c in compiled.generate(prompts, max_new_tokens=4)]
        assert got == want, prompts
    a, b = eager.score([[5, 6, 7, 8]])[0], compiled.score([[5, 6, 7, 8]])[0]
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()
