"""The reference ops on a GPU: an artifact compiled (without a GPU) for this GPU's target
serves on CUDA with the same greedy tokens as on the CPU, and CUDA tensors flow through every
op (nothing in the lowered graph is pinned to the CPU)."""
import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.artifact import ArtifactError
from qcompile.runtime.engine import Engine

pytestmark = pytest.mark.gpu


def _target() -> str:
    major, _ = torch.cuda.get_device_capability()
    return f"sm{major}0"


@pytest.mark.parametrize("precision,kv", [("fp16", "fp16"), ("w8a8", "int4"), ("w4a8", "int4"),
                                          ("w4a8-g128", "int4")])
def test_cuda_matches_cpu(make_tiny_checkpoint, tmp_path, precision, kv):
    cfg = CompileConfig(target=_target(), precision=precision, kv=kv, dtype="float32", kernels="skip",
                        quantizer="rtn")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    prompts = ["the quick brown fox", "def main():"]
    cpu = Engine.load(art, device="cpu")
    gpu = Engine.load(art, device="cuda", compile=False)  # Inductor: test_inductor_*
    assert gpu.cache.tensor.is_cuda and all(w.is_cuda for w in gpu.weights)
    ids = [cpu.encode(p) for p in prompts]
    lc, lg = cpu.score(ids), gpu.score(ids)
    for a, b in zip(lc, lg):
        assert (a - b.cpu()).norm() / a.norm() < 1e-4
    want = [c.token_ids for c in cpu.generate(prompts, max_new_tokens=12)]
    got = [c.token_ids for c in gpu.generate(prompts, max_new_tokens=12)]
    assert got == want


def test_wrong_target_is_refused(make_tiny_checkpoint, tmp_path):
    other = "sm80" if _target() == "sm90" else "sm90"
    cfg = CompileConfig(target=other, precision="fp16", kv="fp16", dtype="float32", kernels="skip")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    with pytest.raises(ArtifactError, match=f"built for {other}"):
        Engine.load(art, device="cuda")


def test_inductor_compiled_program_matches_eager(make_tiny_checkpoint, tmp_path):
    """Engine.load(compile=True): TorchInductor compiles the lowered graph around the custom
    ops (the fused norm/SwiGLU quantization becomes Triton). With emulate_precision_casts
    the fused kernels round to fp16 where eager does, so the int8 codes are the reference's
    and the logits agree to fp16 accumulation-order noise, amplified a little by the int4 KV
    cache: a key that lands one fp16 ulp apart (the KV rotation's mm runs as Inductor's, not
    eager's, kernel) can flip a 4-bit code (measured 1.2e-3 relative on an H100)."""
    cfg = CompileConfig(target=_target(), precision="w4a8", kv="int4", dtype="float16", kernels="skip",
                        quantizer="rtn")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    eager = Engine.load(art, device="cuda", compile=False)
    compiled = Engine.load(art, device="cuda", compile=True)
    ids = [eager.encode(p) for p in ["the quick brown fox", "def main():"]]
    for a, b in zip(eager.score(ids), compiled.score(ids)):
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert rel < 3e-3, f"compiled vs eager logits: relative error {rel:.2e}"
    prompts = ["the quick brown fox", "def main():"]
    want = [c.token_ids for c in eager.generate(prompts, max_new_tokens=10)]
    assert [c.token_ids for c in compiled.generate(prompts, max_new_tokens=10)] == want
