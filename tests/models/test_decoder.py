"""The canonical decoder against transformers' own models: logits of a prefill, and the same
logits when the sequence is fed in chunks through the paged KV cache."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from qcompile.compiler.capture import KVSpec
from qcompile.models.decoder import Decoder
from qcompile.models.loaders import load_checkpoint
from qcompile.runtime.ops.kv import PageLayout

CASES = [("llama", dict(tie=True)), ("llama", dict(tie=False, llama3_rope=True)),
         ("mistral", {}), ("qwen2", {})]


def _run(dec, cache, ids, start, table):
    n = len(ids)
    i32 = torch.int32
    logits, kv = dec(torch.tensor(ids), torch.arange(start, start + n), cache,
                     torch.tensor([table], dtype=i32), torch.tensor([start], dtype=i32),
                     torch.tensor([0, n], dtype=i32), torch.arange(n))
    return logits, kv


def _write(cache, kv, table, start, layout):
    bs = cache.shape[3]
    pos = torch.arange(start, start + kv.shape[2])
    layout.to_pages(cache, kv, torch.tensor(table)[pos // bs] * bs + pos % bs)


@pytest.mark.parametrize("model_type,opts", CASES, ids=lambda c: str(c))
def test_decoder_matches_transformers(make_tiny_checkpoint, model_type, opts):
    path = make_tiny_checkpoint(model_type, **opts)
    ckpt = load_checkpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dec = Decoder(ckpt.config, ckpt.weights)
    ids = torch.randint(0, ckpt.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        spec = KVSpec.of(ckpt.config, "fp16", 16, torch.float32)
        layout = PageLayout.of("fp16", ckpt.config.num_kv_heads, ckpt.config.head_dim,
                               torch.float32)
        cache = spec.empty(8)
        table = [6, 1, 3]  # scattered, out-of-order pages
        full, _ = _run(dec, cache, ids.tolist(), 0, table)
        # the same tokens as a prefill chunk of 21, then 19 one-token decode steps
        got = []
        logits, kv = _run(dec, cache, ids[:21].tolist(), 0, table)
        _write(cache, kv, table, 0, layout)
        got.append(logits)
        for p in range(21, 40):
            logits, kv = _run(dec, cache, [int(ids[p])], p, table)
            _write(cache, kv, table, p, layout)
            got.append(logits)
    rel = (full - ref).norm() / ref.norm()
    assert rel < 1e-5, f"prefill logits differ from transformers: relative error {rel:.2e}"
    step = torch.cat(got)
    assert (step - ref).norm() / ref.norm() < 1e-5


def test_sliding_window_caps_context():
    from transformers import MistralConfig

    from qcompile.models.config import ModelConfig
    hf = MistralConfig(max_position_embeddings=32768, sliding_window=4096)
    assert ModelConfig.from_hf(hf).max_position_embeddings == 4096
    hf = MistralConfig(max_position_embeddings=2048, sliding_window=4096)
    assert ModelConfig.from_hf(hf).max_position_embeddings == 2048
