"""The bundled SmolLM2-135M-Instruct (GGUF) compiled end to end, as the README's quickstart
does it: fp16 logits equal transformers', and every precision answers a question."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from qcompile.compiler.compile import compile_checkpoint
from qcompile.compiler.config import CompileConfig
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.engine import Engine

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ckpt(smollm2_gguf):
    return load_checkpoint(smollm2_gguf)


def _compile(ckpt, tmp_path_factory, **cfg):
    # reference ops on the CPU (no GPU kernels); RTN: these tests check serving, not QoQ
    cfg = CompileConfig(kernels="skip", quantizer="rtn", **cfg)
    out = tmp_path_factory.mktemp("smollm2") / f"{cfg.precision}-{cfg.kv}-{cfg.dtype}"
    return compile_checkpoint(ckpt, cfg, out, progress=False)


def test_fp16_logits_match_transformers(ckpt, smollm2_gguf, tmp_path_factory):
    art = _compile(ckpt, tmp_path_factory, precision="fp16", kv="fp16", dtype="float32")
    engine = Engine.load(art)
    ids = engine.encode(QUESTION, chat=True)
    ours = engine.score([ids])[0]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, f"relative error {rel:.2e}"
    answer = engine.generate([QUESTION], chat=True, max_new_tokens=24)[0]
    assert "Paris" in answer.text


@pytest.mark.parametrize("precision", ["fp16", "w8a8", "w4a8"])
def test_precisions_answer_with_int4_kv(ckpt, tmp_path_factory, precision):
    art = _compile(ckpt, tmp_path_factory, precision=precision, kv="int4")
    engine = Engine.load(art)
    answer = engine.generate([QUESTION], chat=True, max_new_tokens=24)[0]
    print(f"{precision} kv int4: {answer.text!r}")
    assert answer.token_ids and answer.text.strip()
    if precision == "fp16":
        # The int4 cache against the float one, same weights: the question's next-token
        # distributions stay close (mean KL 0.12 measured, with the key rotation and centering;
        # a wrong key mean or rotation sends it past 1). Not the answer's words: at KV4 the
        # first answer token is a near-tie on this prompt (logits 25.11 / 24.91 in float16),
        # which rounding decides.
        ref = Engine.load(_compile(ckpt, tmp_path_factory, precision="fp16", kv="fp16"))
        ids = engine.encode(QUESTION, chat=True)
        lp, lq = (torch.log_softmax(e.score([ids])[0].float(), -1) for e in (ref, engine))
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        assert kl < 0.25, f"KV4 next-token KL {kl:.3f} against the float cache"
