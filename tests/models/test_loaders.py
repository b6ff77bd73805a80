"""qcompile.models.loaders: every accepted source, canonical names/values, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompile.models.config import RopeScaling, UnsupportedArchitectureError
from qcompile.models.loaders import (
    DEFAULT_GGUF, Checkpoint, PickleRefusedError, default_model_path,
    expected_shapes, load_checkpoint)


def _hf_state(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _assert_matches_hf(ckpt: Checkpoint, hf: dict, tie: bool):
    w, c = ckpt.weights, ckpt.config
    assert set(w) == set(expected_shapes(c))
    for name, shape in expected_shapes(c).items():
        assert tuple(w[name].shape) == shape, name
        assert w[name].dtype == torch.float32 and w[name].is_contiguous(), name
    assert ("lm_head" in w) == (not tie)
    assert torch.equal(w["embed"], hf["model.embed_tokens.weight"])
    assert torch.equal(w["norm"], hf["model.norm.weight"])
    if not tie:
        assert torch.equal(w["lm_head"], hf["lm_head.weight"])
    for i in range(c.num_layers):
        a, m, L = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"layers.{i}."
        qkv = torch.cat([hf[a + f"{p}_proj.weight"] for p in "qkv"])
        assert torch.equal(w[L + "wqkv"], qkv)
        assert torch.equal(w[L + "wo"], hf[a + "o_proj.weight"])
        assert torch.equal(w[L + "w_gate_up"],
                          torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]))
        assert torch.equal(w[L + "w_down"], hf[m + "down_proj.weight"])
        assert torch.equal(w[L + "attn_norm"], hf[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(w[L + "mlp_norm"],
                          hf[f"model.layers.{i}.post_attention_layernorm.weight"])
        if c.qkv_bias:
            assert torch.equal(w[L + "bqkv"], torch.cat([hf[a + f"{p}_proj.bias"] for p in "qkv"]))
        else:
            assert L + "bqkv" not in w


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True),
                                            ("mistral", False), ("qwen2", False)])
def test_tiny_checkpoints_load(make_tiny_checkpoint, model_type, tie):
    path = make_tiny_checkpoint(model_type, tie=tie)
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert ckpt.source == str(path)
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_layers) == (model_type, 64, 96, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (4, 2, 16, 256)
    assert c.tie_word_embeddings is tie
    assert c.qkv_bias is (model_type == "qwen2")
    _assert_matches_hf(ckpt, _hf_state(path), tie)
    tok = ckpt.tokenizer
    assert tok is not None and tok.chat_template
    assert tok.eos_token_id in c.eos_token_ids and len(tok) <= c.vocab_size
    text = "def f(x):\n    return x + 1"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|user|>hi\n<|assistant|>"


def test_tied_checkpoint_with_identical_lm_head_drops_it(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama", tie=True)
    tensors = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"))
    ckpt = load_checkpoint(path)
    assert "lm_head" not in ckpt.weights
    assert torch.equal(ckpt.weights["embed"], tensors["model.embed_tokens.weight"])


def test_sharded_safetensors(make_tiny_checkpoint):
    sharded = make_tiny_checkpoint("qwen2", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    got = load_checkpoint(sharded).weights
    want = load_checkpoint(make_tiny_checkpoint("qwen2")).weights  # same seed, one file
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_missing_shard_is_an_error(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama", max_shard_size="20KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_checkpoint(path)


def test_llama3_rope_scaling(make_tiny_checkpoint):
    ckpt = load_checkpoint(make_tiny_checkpoint("llama", llama3_rope=True))
    assert ckpt.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert ckpt.config.rope_theta == 500000.0
    assert load_checkpoint(make_tiny_checkpoint("llama")).config.rope_scaling is None


def _save_pickle(dir_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dir_path, dtype=torch.float32)
    pt = dir_path.parent / f"{dir_path.name}_model.pt"
    torch.save(model, pt)
    return pt


def test_pickle_refused_without_trust(make_tiny_checkpoint):
    pt = _save_pickle(make_tiny_checkpoint("llama"))
    with pytest.raises(PickleRefusedError) as err:
        load_checkpoint(pt)
    msg = str(err.value)
    assert "pickle" in msg and "--trust-pickle" in msg and "arbitrary code" in msg
    assert "safetensors" in msg
    assert isinstance(err.value, ValueError)


def test_pickle_loaded_with_trust(make_tiny_checkpoint):
    path = make_tiny_checkpoint("qwen2")
    pt = _save_pickle(path)
    ckpt = load_checkpoint(pt, trust_pickle=True)
    assert ckpt.tokenizer is None and ckpt.source == str(pt)
    ref = load_checkpoint(path)
    assert ckpt.config == ref.config
    assert all(torch.equal(ckpt.weights[k], ref.weights[k]) for k in ref.weights)
    # a `<stem>_tokenizer/` folder next to the file provides the tokenizer
    ref.tokenizer.save_pretrained(pt.with_name(f"{pt.stem}_tokenizer"))
    assert load_checkpoint(pt, trust_pickle=True).tokenizer.chat_template


def test_pickled_state_dict_is_refused(tmp_path, make_tiny_checkpoint):
    pt = tmp_path / "sd.pth"
    torch.save(load_checkpoint(make_tiny_checkpoint("llama")).weights, pt)
    with pytest.raises(ValueError, match="no config"):
        load_checkpoint(pt, trust_pickle=True)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(missing)
    assert str(missing) in str(err.value)
    assert "safetensors" in str(err.value) and ".gguf" in str(err.value)


def test_unknown_extension(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError) as err:
        load_checkpoint(f)
    msg = str(err.value)
    assert ".onnx" in msg and ".gguf" in msg and ".pt" in msg and "safetensors" in msg


def test_directory_without_safetensors(tmp_path, make_tiny_checkpoint):
    src = make_tiny_checkpoint("llama")
    dst = tmp_path / "bin_only"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(dst)
    assert "safetensors" in str(err.value) and "pytorch_model.bin" in str(err.value)
    assert "save_pretrained" in str(err.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture_real_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                               n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_checkpoint(tmp_path)
    assert "gpt2" in str(err.value) and "llama" in str(err.value)


def test_architecture_checked_before_tensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_checkpoint(tmp_path)


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert "missing" in str(err.value)
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value)


def test_missing_qkv_bias_for_qwen2(make_tiny_checkpoint):
    path = make_tiny_checkpoint("qwen2")
    _rewrite(path, lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.bias"):
        load_checkpoint(path)


def test_wrong_shape_tensor(make_tiny_checkpoint):
    path = make_tiny_checkpoint("mistral")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(name, t[name][:16].contiguous()))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert name in msg and "layers.0.wqkv" in msg
    assert "[16, 64]" in msg and "expected [32, 64]" in msg


def test_extra_layer_is_an_error(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama")

    def add_layer(t):
        for k in [k for k in t if k.startswith("model.layers.1.")]:
            t[k.replace("layers.1.", "layers.2.")] = t[k].clone()
    _rewrite(path, add_layer)
    with pytest.raises(ValueError, match=r"model\.layers\.2\."):
        load_checkpoint(path)


def test_tied_lm_head_that_differs_warns(make_tiny_checkpoint):
    path = make_tiny_checkpoint("llama", tie=True)
    _rewrite(path, lambda t: t.__setitem__(
        "lm_head.weight", torch.zeros_like(t["model.embed_tokens.weight"])))
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        ckpt = load_checkpoint(path)
    assert "lm_head" not in ckpt.weights


# ----------------------------------------------------------------------------- real SmolLM2

def test_default_model_path(smollm2_gguf):
    assert smollm2_gguf == default_model_path()
    assert smollm2_gguf.name == DEFAULT_GGUF and smollm2_gguf.is_file()


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return smollm2_checkpoint


def test_smollm2_gguf_config(smollm2):
    c = smollm2.config
    assert c.model_type == "llama"
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (576, 30, 9, 3, 64)
    assert c.intermediate_size == 1536 and c.vocab_size == 49152
    assert c.tie_word_embeddings and not c.qkv_bias and c.rope_scaling is None


def test_smollm2_gguf_weights(smollm2):
    w, c = smollm2.weights, smollm2.config
    assert set(w) == set(expected_shapes(c)) and "lm_head" not in w
    assert w["embed"].shape == (49152, 576)
    assert w["layers.0.wqkv"].shape == (960, 576)
    assert w["layers.29.w_gate_up"].shape == (3072, 576)
    assert all(t.dtype == torch.float32 for t in w.values())
    for name in ("embed", "layers.0.wqkv", "layers.29.w_down", "norm"):
        assert torch.isfinite(w[name]).all(), name
    assert 0.5 < w["norm"].abs().mean() < 10  # dequantized, not zeros


def test_smollm2_gguf_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert tok is not None and tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert "Hi" in prompt and "assistant" in prompt
    assert tok.eos_token_id is not None


def test_quiet_load_silences_transformers_bars():
    """qcompile -q: transformers' GGUF dequantization bar and its logging bars are off while
    a GGUF loads, and back after."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from qcompile.models.loaders import _transformers_bars
    bar = gguf_utils.tqdm
    with _transformers_bars(False):
        assert gguf_utils.tqdm(range(3)).disable
        assert not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is bar and hf_logging.is_progress_bar_enabled()
    with _transformers_bars(True):
        assert gguf_utils.tqdm is bar
