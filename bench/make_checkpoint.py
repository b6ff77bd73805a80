"""Synthetic Hugging Face checkpoints of real Llama shapes (random weights, float16), made on
the machine that benchmarks them, since no real 8B model can be downloaded there:

    python bench/make_checkpoint.py llama-3.2-1b /tmp/llama1b [--device cuda]

Writes config.json, model.safetensors (weights drawn on --device, N(0, 0.02), norms 1) and a
small byte-level BPE tokenizer trained on Python's pydoc text (ids below the model's vocab;
benchmarks feed token ids, the tokenizer only has to exist).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                       vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                       max_position_embeddings=8192),
}


def tokenizer():
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = list(pydoc_data.topics.topics.values())
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


def weights(cfg: dict, device: str) -> dict[str, torch.Tensor]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).half().cpu()

    out = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h).half()}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = rand(v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": rand(q, h),
                    p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h),
                    p + "self_attn.o_proj.weight": rand(h, q),
                    p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i),
                    p + "input_layernorm.weight": torch.ones(h).half(),
                    p + "post_attention_layernorm.weight": torch.ones(h).half()})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=tuple(SHAPES))
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from safetensors.torch import save_file
    args.out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    cfg = dict(SHAPES[args.shape], architectures=["LlamaForCausalLM"], model_type="llama",
               hidden_act="silu", rms_norm_eps=1e-5, torch_dtype="float16",
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file(weights(cfg, args.device), args.out / "model.safetensors")
    tok.save_pretrained(args.out)
    print(f"{args.shape} -> {args.out}")


if __name__ == "__main__":
    main()
