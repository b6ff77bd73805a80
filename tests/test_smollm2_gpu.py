"""The bundled SmolLM2-135M-Instruct compiled for this GPU with its CUTLASS kernels (`--kernels
build`) and served on CUDA: the greedy tokens and logits equal the reference path's (the same
artifact on the same GPU with the kernels switched off, so that only the GEMMs differ), for
every precision, with no GEMM falling back to the reference (`gemm_kernels.STATS.fallbacks`).
The GEMM kernels reproduce the reference's int32 sums and rounding sequence, so
nothing may diverge (the attention kernels run in both runs: they are deterministic); the CPU's tokens are reported beside them (fp16 non-GEMM ops round
differently there, so a near-tie may flip: the first such step is printed with its margin).

Needs a GPU, nvcc and the model (models/default_model.py downloads it, or
$QCOMPILE_DEFAULT_MODEL names a copy: bench/gpu_smollm2.sh brings it to a GPU machine)."""
import collections

import pytest
import torch

from qcompile.compiler.compile import compile_checkpoint
from qcompile.compiler.config import CompileConfig
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.engine import Engine

pytestmark = pytest.mark.gpu

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a list."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def ckpt(smollm2_gguf):
    return load_checkpoint(smollm2_gguf)


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("precision,kv", [("fp16", "fp16"), ("w8a8", "fp16"),
                                          ("w4a8", "int4"), ("w4a8-g128", "int4")])
def test_kernels_generate_the_reference_tokens(ckpt, tmp_path_factory, precision, kv):
    from qcompile.runtime import gemm_kernels
    major, _ = torch.cuda.get_device_capability()
    cfg = CompileConfig(target=f"sm{major}0", precision=precision, kv=kv, dtype="float16",
                        kernels="build", quantizer="rtn")
    art = compile_checkpoint(ckpt, cfg, tmp_path_factory.mktemp("smollm2-gpu") / "art",
                             progress=False)
    gpu = Engine.load(art, device="cuda", compile=False)  # Inductor: test_gpu_reference
    ids = [gpu.encode(p, chat=True) for p in PROMPTS]
    stats = gpu.kernels.gemm  # the engine's own counts
    assert gemm_kernels.STATS is not stats
    before = sum(stats.launches.values())
    fallbacks_before = collections.Counter(stats.fallbacks)
    logits = gpu.score(ids)
    got = [c.token_ids for c in gpu.generate(PROMPTS, chat=True, max_new_tokens=NEW_TOKENS)]
    launched = sum(stats.launches.values()) - before
    fell_back = stats.fallbacks - fallbacks_before
    assert not fell_back, f"GEMMs ran the PyTorch reference instead of a kernel: {fell_back}"
    if precision != "fp16":
        assert launched > 0, "the quantized GEMMs never ran our kernels"

    # the reference ops, same GPU, eager steps (decode graphs replay the kernels they
    # captured; eager steps have the graphs' shapes, so only the GEMMs differ)
    gpu.kernels.gemm_on = False
    graphs, gpu.graphs = gpu.graphs, None
    try:
        ref_logits = gpu.score(ids)
        want = [c.token_ids for c in gpu.generate(PROMPTS, chat=True,
                                                  max_new_tokens=NEW_TOKENS)]
    finally:
        gpu.kernels.gemm_on, gpu.graphs = True, graphs
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    assert got == want

    cpu = Engine.load(art, device="cpu")
    for prompt, toks, ref in zip(PROMPTS, got, [c.token_ids for c in cpu.generate(
            PROMPTS, chat=True, max_new_tokens=NEW_TOKENS)]):
        i = _first_divergence(toks, ref)
        where = "equal" if i is None else f"first differs at new token {i}"
        print(f"{precision} kv {kv}: GPU vs CPU greedy tokens {where} ({prompt!r}: "
              f"{gpu.tokenizer.decode(toks)!r})")


@pytest.mark.parametrize("kv", ["fp16", "int4"])
def test_attention_kernels_match_the_reference(ckpt, tmp_path_factory, kv):
    """The paged attention kernels against the reference attention op, same artifact and GPU
    (float accumulation orders differ, so close, not equal): next-token distributions of
    every position within a small KL, and no fallback to the reference."""
    from qcompile.runtime import attention_kernels
    major, _ = torch.cuda.get_device_capability()
    cfg = CompileConfig(target=f"sm{major}0", precision="fp16", kv=kv, dtype="float16",
                        kernels="build")
    art = compile_checkpoint(ckpt, cfg, tmp_path_factory.mktemp("smollm2-attn") / "art",
                             progress=False)
    gpu = Engine.load(art, device="cuda", compile=False)  # Inductor: test_gpu_reference
    ids = [gpu.encode(p, chat=True) for p in PROMPTS]
    stats = gpu.kernels.attention  # the engine's own counts
    assert attention_kernels.STATS is not stats
    before = sum(stats.launches.values())
    logits = gpu.score(ids)
    assert sum(stats.launches.values()) > before
    assert not stats.fallbacks
    gpu.kernels.attention_on = False
    try:
        ref = gpu.score(ids)
    finally:
        gpu.kernels.attention_on = True
    for a, b in zip(logits, ref):
        kl = torch.nn.functional.kl_div(a.float().log_softmax(-1), b.float().log_softmax(-1),
                                        log_target=True, reduction="none").sum(-1)
        assert kl.max() < 1e-3, f"KL(reference || kernels) up to {kl.max():.2e}"
