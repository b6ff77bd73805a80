"""Load a Llama-family checkpoint into qcompile's canonical weight names.

Accepted inputs (see `load_checkpoint`):

* a Hugging Face model directory: `config.json` + `*.safetensors` (single file, or shards
  listed in `model.safetensors.index.json`); read without instantiating the model;
* a `.gguf` file: transformers dequantizes it (and un-permutes q/k) to float32;
* a `.pt`/`.pth` file written by `torch.save(model)` of a transformers causal LM: a pickle,
  refused unless `trust_pickle=True` (the `--trust-pickle` flag). Its tokenizer, if any, is
  read from the folder `<stem>_tokenizer/` next to it (e.g. `model.pt` -> `model_tokenizer/`).

Canonical names (all float32, contiguous):
  `embed` [V, H], `norm` [H], `lm_head` [V, H] (only when embeddings are not tied), and per
  layer i: `layers.{i}.attn_norm` [H], `layers.{i}.wqkv` [(nh + 2 nkv) hd, H] (rows q, k, v),
  `layers.{i}.bqkv` [(nh + 2 nkv) hd] (only with qkv bias), `layers.{i}.wo` [H, nh hd],
  `layers.{i}.mlp_norm` [H], `layers.{i}.w_gate_up` [2 I, H] (rows gate, up),
  `layers.{i}.w_down` [H, I].
"""
from __future__ import annotations

import contextlib
import functools
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig, check_architecture
from .default_model import DEFAULT_GGUF, default_model_path  # noqa: F401  (the CLI's lookup)
from .gguf_tokenizer import load_gguf_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ACCEPTED_INPUTS = (
    "a Hugging Face model directory with config.json and *.safetensors, a .gguf file, "
    "or a .pt/.pth file saved with torch.save(model) (needs --trust-pickle)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# HF buffers that carry no weights and may appear in a state dict.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: "PreTrainedTokenizerBase | None"
    source: str


class PickleRefusedError(ValueError):
    """A pickled checkpoint was given without `trust_pickle=True`."""


def load_checkpoint(path, *, trust_pickle: bool = False, progress: bool = True) -> Checkpoint:
    """Load `path` (see the module docstring for accepted inputs) into a `Checkpoint`;
    `progress=False` also silences transformers' bars (a GGUF's dequantization).

    The architecture is checked from the config before any tensor is read; every tensor is
    checked against the config's shapes; missing or unexpected tensors are errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}. qcompile accepts {ACCEPTED_INPUTS}.")
    suffix = path.suffix.lower()
    if path.is_dir():
        config, hf_weights, tokenizer = _load_hf_dir(path)
    elif suffix == ".gguf":
        config, hf_weights, tokenizer = _load_gguf(path, progress)
    elif suffix in (".pt", ".pth"):
        config, hf_weights, tokenizer = _load_pickle(path, trust_pickle)
    else:
        raise ValueError(f"don't know how to load {path} (extension {suffix or 'none'!r}). "
                         f"qcompile accepts {ACCEPTED_INPUTS}.")
    return Checkpoint(config, canonical_weights(hf_weights, config), tokenizer, str(path))


# ----------------------------------------------------------------------------- sources

def _load_hf_dir(path: Path):
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is a directory without config.json: qcompile accepts "
                                f"{ACCEPTED_INPUTS}.")
    check_architecture(json.loads(cfg_file.read_text()).get("model_type", "<missing>"))
    config = ModelConfig.from_hf(AutoConfig.from_pretrained(path))
    return config, _read_safetensors(path), _dir_tokenizer(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{path} has no *.safetensors weights (found: {found}). qcompile reads only "
            "safetensors (pickled .bin files can run code when loaded): convert with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)`.")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"shard {f.name} listed in {index} is missing from {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="Loading safetensors shards", disable=len(files) < 2):
        tensors.update(load_file(str(f)))
    return tensors


def _dir_tokenizer(path: Path):
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _load_gguf(path: Path, progress: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = check_gguf(path)
    folder, name = path.parent, path.name
    with _one_header_parse(path, reader), _transformers_bars(progress):
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
        config = ModelConfig.from_hf(hf_config)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=hf_config,
                                                     dtype=torch.float32)
        tokenizer = load_gguf_tokenizer(path, reader)
    return config, model.state_dict(), tokenizer


@contextlib.contextmanager
def _transformers_bars(progress: bool):
    """transformers' progress bars while it loads a GGUF ("Converting and de-quantizing GGUF
    tensors", "Loading weights") follow qcompile's -q: its logging switch covers the second,
    and the first is a plain tqdm of its GGUF module, given disable=True here."""
    if progress:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    was_on, bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _one_header_parse(path: Path, reader):
    """While transformers loads the GGUF, parse its header once and build each tensor-name
    table once. transformers parses the header anew for the config, the weights and the
    tokenizer (SmolLM2's 49k-token vocabulary: ~3 s a parse on 2 cores), and builds gguf's
    tensor-name table anew for each of the model's ~400 modules (~10 ms each): here
    `gguf.GGUFReader(path)` returns the reader already made and `gguf.get_tensor_name_map`
    is memoized. Both are only read."""
    import gguf
    made, name_map, target = gguf.GGUFReader, gguf.get_tensor_name_map, path.resolve()

    def reader_of(p, *args, **kwargs):
        same = not args and not kwargs and Path(p).resolve() == target
        return reader if same else made(p, *args, **kwargs)

    gguf.GGUFReader = reader_of
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = made, name_map


def check_gguf(path: Path):
    """The file's GGUFReader, or a one-line error for a file that is not a complete GGUF (the
    gguf reader fails on a truncated file with numpy's "cannot reshape array ..." or a
    struct.error)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < 4 and b"GGUF".startswith(magic):
        raise ValueError(f"{path}: the file is truncated ({len(magic)} bytes)")
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    from gguf import GGUFReader
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, IndexError, OverflowError, struct.error) as e:
        raise ValueError(f"{path}: the file is truncated or corrupt ({size} bytes; the GGUF "
                         f"reader says: {str(e).splitlines()[0][:120]}); download or convert "
                         "it again") from None
    if end > size:
        raise ValueError(f"{path}: the file is truncated ({size} bytes, its tensors end at "
                         f"byte {end}); download or convert it again")
    return reader


def _load_pickle(path: Path, trust: bool):
    if not trust:
        raise PickleRefusedError(
            f"{path} is a pickle file: unpickling runs arbitrary code from the file. Pass "
            "--trust-pickle (trust_pickle=True) only for files you made or trust, or convert it "
            "to safetensors with `model.save_pretrained(out_dir)` and load that directory.")
    obj = torch.load(path, weights_only=False, map_location="cpu")
    if not (hasattr(obj, "config") and hasattr(obj, "state_dict")):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a transformers model saved "
                         "with torch.save(model): a bare state dict has no config. Save the "
                         "model with save_pretrained and load the directory instead.")
    config = ModelConfig.from_hf(obj.config)
    tok_dir = path.with_name(f"{path.stem}_tokenizer")
    tokenizer = _dir_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return config, obj.state_dict(), tokenizer


# ----------------------------------------------------------------------------- mapping

def hf_layout(config: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """canonical name -> [(HF tensor name, expected shape), ...] concatenated along dim 0."""
    H, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    layout = {"embed": [("model.embed_tokens.weight", (V, H))],
              "norm": [("model.norm.weight", (H,))]}
    if not config.tie_word_embeddings:
        layout["lm_head"] = [("lm_head.weight", (V, H))]
    for i in range(config.num_layers):
        a, m, c = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"layers.{i}."
        layout[c + "attn_norm"] = [(f"model.layers.{i}.input_layernorm.weight", (H,))]
        layout[c + "wqkv"] = [(a + "q_proj.weight", (q, H)), (a + "k_proj.weight", (kv, H)),
                              (a + "v_proj.weight", (kv, H))]
        if config.qkv_bias:
            layout[c + "bqkv"] = [(a + "q_proj.bias", (q,)), (a + "k_proj.bias", (kv,)),
                                  (a + "v_proj.bias", (kv,))]
        layout[c + "wo"] = [(a + "o_proj.weight", (H, q))]
        layout[c + "mlp_norm"] = [(f"model.layers.{i}.post_attention_layernorm.weight", (H,))]
        layout[c + "w_gate_up"] = [(m + "gate_proj.weight", (I, H)), (m + "up_proj.weight", (I, H))]
        layout[c + "w_down"] = [(m + "down_proj.weight", (H, I))]
    return layout


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """canonical name -> shape, for every tensor a checkpoint of `config` has."""
    return {name: (sum(s[0] for _, s in parts), *parts[0][1][1:])
            for name, parts in hf_layout(config).items()}


def canonical_weights(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map an HF-named state dict to canonical names, checking names and shapes."""
    hf = dict(hf)
    if config.tie_word_embeddings and "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        embed = hf.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(lm_head, embed):
            warnings.warn("tie_word_embeddings is set but lm_head.weight differs from the "
                          "embeddings; using the embeddings, as transformers does")
    layout = hf_layout(config)
    wanted = [(c, n, s) for c, parts in layout.items() for n, s in parts]
    missing = [n for _, n, _ in wanted if n not in hf]
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config "
                         f"({config.model_type}, {config.num_layers} layers) needs: {shown}")
    for canon, name, shape in wanted:
        if tuple(hf[name].shape) != shape:
            raise ValueError(f"tensor {name} (canonical {canon}) has shape "
                             f"{list(hf[name].shape)}, expected {list(shape)} from the config: "
                             "the checkpoint is truncated or does not match its config")
    used = {n for _, n, _ in wanted}
    extra = sorted(k for k in hf if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} tensor(s) qcompile does not use for "
                         f"{config.model_type} (e.g. more layers or biases than the config "
                         f"says): {', '.join(extra[:12])}")
    return {canon: _join([hf[n] for n, _ in parts]) for canon, parts in layout.items()}


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The parts of one canonical tensor along dim 0, in the checkpoint's dtype (float32
    only where the parts' dtypes differ): a float32 copy of a float16 checkpoint doubled the
    compile's memory (Llama-3.2-1B shape: peak 9.8 GB for a 2.5 GB checkpoint); every
    consumer converts per tensor where it needs float32 (QoQ, the quantizers)."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.to(torch.float32) for t in tensors]
    return (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).contiguous()
