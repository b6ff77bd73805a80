"""SmolLM2-135M-Instruct (the default model's GGUF) compiled end to end, as the README's
quickstart does it: fp16 logits equal transformers', and each precision with the 4-bit KV
cache scores the pydoc text under a perplexity bound and answers the question.

The default run compiles the README's precision (w4a8, KV4); the others are `slow`
(`pytest -m slow`). Perplexity here is on 4 windows of 256 tokens, a quick stand-in for
qeval's 24 x 512 (bounds: measured values + about 10%, printed with -s; a broken scale or
layout sends them past 100). Weights are round-to-nearest here, the quickest compile of each
precision; QoQ's accuracy is tested in tests/compiler/ and measured by bench/accuracy.py."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from qcompile.compiler.compile import compile_checkpoint
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import perplexity

QUESTION = "What is the capital of France?"
SEQS, SEQ_LEN = 4, 256
# Perplexity on SEQS x SEQ_LEN pydoc tokens, round-to-nearest weights, KV4, float16: measured
# 17.84 / 18.79 / 38.20 (2026-12-06, the GGUF's own pre-tokenizer); bounds about 10% above.
PPL_BOUND = {"fp16": 19.5, "w8a8": 20.5, "w4a8": 42.0}


@pytest.fixture(scope="module")
def ckpt(smollm2_checkpoint):
    return smollm2_checkpoint


def _compile(ckpt, tmp_path_factory, **cfg):
    # reference ops on the CPU (no GPU kernels); RTN: these tests check serving, not QoQ
    cfg = CompileConfig(kernels="skip", quantizer="rtn", **cfg)
    out = tmp_path_factory.mktemp("smollm2") / f"{cfg.precision}-{cfg.kv}-{cfg.dtype}"
    return compile_checkpoint(ckpt, cfg, out, progress=False)


@pytest.mark.slow
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


@pytest.mark.parametrize("precision", [pytest.param("fp16", marks=pytest.mark.slow),
                                       pytest.param("w8a8", marks=pytest.mark.slow), "w4a8"])
def test_precisions_with_int4_kv(ckpt, tmp_path_factory, precision):
    engine = Engine.load(_compile(ckpt, tmp_path_factory, precision=precision, kv="int4"))
    ppl = perplexity(engine, SEQS, SEQ_LEN, progress=False).perplexity
    answer = engine.generate([QUESTION], chat=True, max_new_tokens=24)[0]
    print(f"{precision} kv int4: perplexity {ppl:.3f} ({SEQS} x {SEQ_LEN}); {answer.text!r}")
    assert 1 < ppl < PPL_BOUND[precision], f"perplexity {ppl:.3f}"
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
