"""The architecture description every decoder in qcompile is built from.

One frozen dataclass covers the Llama family: Llama 2/3 (llama3 RoPE scaling), Mistral,
Qwen2 (qkv bias) and SmolLM2 (tied embeddings). It is stored in the artifact's manifest
as JSON, so it holds only plain values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# HF `model_type` -> the features that architecture uses. A checkpoint of any other type
# is refused with this list in the message.
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama 2/3, SmolLM2 (RoPE incl. llama3 scaling, GQA, optional tied embeddings)",
    "mistral": "Mistral (GQA; sequences capped at the sliding window, inside which it is exact)",
    "qwen2": "Qwen2 / Qwen2.5 (bias on q, k, v)",
}


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture qcompile cannot build."""


def check_architecture(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}: qcompile builds {names}. "
            "Convert the checkpoint to one of these or open an issue for the architecture.")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (`rope_type: llama3` in HF configs)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        check_architecture(self.model_type)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers `PretrainedConfig` (any of the supported types)."""
        check_architecture(hf.model_type)
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope = _rope_params(hf)
        eos = hf.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_position_embeddings=_max_positions(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            rope_scaling=_llama3_scaling(rope),
            bos_token_id=hf.bos_token_id,
            eos_token_ids=eos,
        )


def _max_positions(hf) -> int:
    """Sliding-window attention equals full attention up to the window: serve at most that."""
    window = getattr(hf, "sliding_window", None)
    uses_window = hf.model_type == "mistral" or getattr(hf, "use_sliding_window", False)
    if uses_window and window:
        return min(hf.max_position_embeddings, window)
    return hf.max_position_embeddings


def _rope_params(hf) -> dict:
    """RoPE settings across transformers versions (`rope_parameters` in 5.x,
    `rope_theta` + `rope_scaling` before)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(hf, "rope_theta", None) is not None:
        params["rope_theta"] = hf.rope_theta
    scaling = getattr(hf, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params.update(scaling)
    return params


def _llama3_scaling(rope: dict) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedArchitectureError(
            f"unsupported RoPE scaling {kind!r}: qcompile supports default and llama3 RoPE")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
