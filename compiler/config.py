"""The one frozen configuration of a compile: CLI flags are generated from its fields and the
artifact stores it, so the two cannot drift.

`QuantScheme` is the hashable key of every coverage table; each scheme is one row of
compiler/schemes.py, from which PRECISIONS and the other tables are derived.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .schemes import (FP8, SCHEMES, SPECS, W4A4, W4A8, W4A8_G64, W4A8_G128,  # noqa: F401
                      W4A16_G128, W8A8, QuantScheme)

# --precision value -> weight/activation scheme (None: keep floating-point linears).
PRECISIONS: dict[str, QuantScheme | None] = {s.precision: s.scheme for s in SCHEMES}
TARGETS = {"sm80": (8, 0), "sm90": (9, 0)}
KV_FORMATS = ("fp16", "int4")
QOQ_STEPS = ("rotate", "smooth_attention", "smoothquant", "smooth", "fmpq", "reorder", "clip",
             "gptq")
# --quantizer auto: the best recipe measured per precision (KV4 perplexity of SmolLM2 at
# --dtype float32, bench/results/accuracy-smollm2-2026-11-21c.md: W8A8 SmoothQuant 15.05
# against RTN 15.29; W4A8 QoQ 16.01 against RTN 28.85). `reorder` only acts on group schemes.
# fp16 has nothing to quantize; w4a16-g128 has no measured QoQ recipe (QoQ's steps are
# searched for A8 activations; a weight-only AWQ/GPTQ recipe would need its own ablation), so
# both resolve to rtn.
QOQ_RECIPES: dict[str, str] = {
    "w8a8": "smoothquant",
    "w4a8": "rotate,smooth,clip,gptq",
    "w4a8-g128": "rotate,smooth,reorder,clip,gptq",
    "w4a8-g64": "rotate,smooth,reorder,clip,gptq",
    # COMET's W4A4: QoQ's W4A8 recipe with FMPQ's channel permutations and 8-bit blocks
    "w4a4": "rotate,smooth,fmpq,clip,gptq",
}
# --int8-linears by default (the qoq recipe with gptq): the share of the decoder linears'
# weights kept at W8A8 that meets issue 14's held-out bounds on SmolLM2 (per-channel +16%:
# +12.3% / +14.7% at 0.2; g64 +12%: +8.7% / +11.5% at 0.3; all-4-bit +17.2% / +26.0% and
# +11.7% / +17.1%; bench/results/accuracy-int8-linears-2026-12-07.md), as llama.cpp's Q4_K_M
# keeps some tensors at 6 bits. Recipes not measured keep every linear at 4 bits.
INT8_LINEARS_DEFAULT: dict[str, float] = {"w4a8": 0.2, "w4a8-g64": 0.3}
# --lm-head auto: W8A8 for the precisions whose linears run qcompile's integer GEMMs. The int8
# head costs SmolLM2 at most 0.22% perplexity on held-out text
# (bench/results/accuracy-fmpq-2026-12-07.md) and halves the decode step's largest weight:
# +6.6% output tok/s for the 1B shape on an H100 (bench/results/gpu-h100-2026-12-07e.md); an
# integer head is also batch-invariant (runtime/engine.py: Engine._invariant). The others
# keep it float (the activation dtype, as QServe does).
LM_HEAD_DEFAULT: dict[str, str] = {p: "w8a8" for p in ("w8a8", "w4a8", "w4a8-g128", "w4a8-g64")}
QOQ_FALLBACK_STEPS = "rotate,smooth,reorder,clip,gptq"  # --quantizer qoq where no recipe is
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Tokens per KV page: powers of two from 8 (smaller pages only lengthen the block table, one
# int32 per page per sequence) to 256 (vLLM's largest page; every sequence holds up to one
# page it does not use, and the cache must fit one full sequence of whole pages).
KV_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
MIN_SEQ_LEN = 2            # a prompt token and one generated token
MAX_SEQ_LEN = 1 << 24      # 16M tokens: beyond every released model's context


CALIB_CHOICES = ("pydoc", "stdlib-docstrings")  # runtime/texts.py CALIB_SOURCES + pydoc

def _opt(help: str, choices=None, **kw):
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass(frozen=True)
class CompileConfig:
    target: str = _opt("GPU architecture the artifact is built for", tuple(TARGETS), default="sm80")
    precision: str = _opt("weight/activation format of the linear layers", tuple(PRECISIONS),
                          default="w4a8")
    kv: str = _opt("KV-cache format: fp16 keeps K/V in the activation dtype; int4 stores "
                   "per-(token, head) asymmetric 4-bit values", KV_FORMATS, default="int4")
    kv_rotation: str = _opt("int4 KV only (fp16 stores keys as they are): hadamard rotates "
                            "keys and queries per head by a randomized Hadamard matrix after "
                            "RoPE (exact in float, spreads key outlier channels before the "
                            "4-bit encoding; passes/rotate_kv.py); none: no rotation",
                            ("hadamard", "none"), default="hadamard")
    kv_key_centering: str = _opt("int4 KV only: mean subtracts each (layer, kv head)'s mean "
                                 "post-RoPE key, measured on the calibration text, before the "
                                 "4-bit encoding (exact in float: q . mu shifts every logit of "
                                 "a query alike; passes/center_keys.py); none: keys as they are",
                                 ("mean", "none"), default="mean")
    dtype: str = _opt("activation dtype of the program (float32 for exact CPU checks)",
                      tuple(DTYPES), default="float16")
    kv_block_size: int = _opt("tokens per KV-cache page", default=16)
    max_seq_len: int = _opt("longest sequence (prompt + generation) the artifact serves; "
                            "0 takes the model's max_position_embeddings", default=0)
    quantizer: str = _opt("auto: each precision's best measured recipe (config.QOQ_RECIPES): "
                          "w8a8 SmoothQuant (qoq, steps smoothquant), w4a8 / w4a8-g128 / "
                          "w4a8-g64 QoQ (qoq, steps rotate,smooth[,reorder],clip,gptq), w4a4 "
                          "QoQ with FMPQ (rotate,smooth,fmpq,clip,gptq), rtn for "
                          "fp16, w4a16-g128 and fp8 (no measured QoQ recipe; QoQ does not "
                          "apply to fp8); resolved when the config is made, so the manifest "
                          "stores what ran. rtn: "
                          "round-to-nearest weights, no calibration. qoq: QServe's QoQ on "
                          "calibration text, the steps of --qoq-steps", ("auto", "rtn", "qoq"),
                          default="auto")
    qoq_steps: str = _opt("comma-separated QoQ steps (they always run in the order "
                          + ",".join(QOQ_STEPS) + "); auto: the precision's recipe in "
                          "QOQ_RECIPES (see --quantizer), none with rtn. "
                          "rotate: Hadamard rotation of the residual stream; smooth: "
                          "smoothing of the o_proj/down_proj inputs; reorder: channel "
                          "reordering (group schemes only); fmpq: COMET's channel permutations "
                          "and 8-bit activation blocks (w4a4 only); clip: clipping ratio search; "
                          "gptq: GPTQ's rounding; smoothquant: SmoothQuant's smoothing of the "
                          "RMSNorm-fed inputs (the W8A8 recipe); smooth_attention: "
                          "SmoothAttention, in no recipe (with --kv int4's key rotation it "
                          "raises perplexity; bench/accuracy.py)", default="auto")
    gptq_order: str = _opt("order in which the qoq step gptq rounds each linear's input "
                           "channels: act (decreasing diag of the Hessian, GPTQ's act-order on the "
                           "same grid: the busiest channels round first, while the most "
                           "columns remain to absorb their error; SmolLM2 KV4 "
                           "w4a8 QoQ perplexity 16.01, accuracy-smollm2-2026-11-21c) or natural "
                           "(left to right)",
                           ("act", "natural"), default="act")
    calib_samples: int = _opt("calibration sequences", default=32)
    calib_seq_len: int = _opt("tokens per calibration sequence", default=512)
    key_calib_samples: int = _opt("calibration sequences for --kv-key-centering's key means "
                                  "where QoQ does not measure them (a keys-only forward; 8 "
                                  "is within 0.03 perplexity of 32 on SmolLM2 fp16 KV4, "
                                  "CHANGELOG.md)", default=8)
    calib_text: str | None = _opt("calibration text file (default: --calib-source)",
                                  default=None)
    calib_source: str = _opt("calibration text when no --calib-text is given: pydoc (the "
                             "pydoc topics after the evaluation split) or stdlib-docstrings "
                             "(the standard library's docstrings, a text no evaluation "
                             "scores; runtime/texts.py)", CALIB_CHOICES, default="pydoc")
    kernels: str = _opt("build: compile the GEMM and attention kernels the graph uses for "
                        "--target with nvcc and ship them; skip: ship none (every op runs its "
                        "PyTorch reference)",
                        ("build", "skip"), default="build")
    fmpq_int8_fraction: float = _opt("w4a4 (the qoq step fmpq): the fraction of all the "
                                     "decoder linears' 128-channel activation blocks kept in "
                                     "int8, given where int4 costs the most relative output "
                                     "error (compiler/fmpq.py). 0.5 by default: within 1.10x "
                                     "of W4A8's perplexity on held-out text, where 0.25 is "
                                     "1.16x, and the 4-bit share buys no speed on these "
                                     "kernels (sm90 runs every block on s8 MMAs; on sm80 an "
                                     "s4 block is estimated at 1.00-1.06x an s8 one). COMET "
                                     "keeps 8-16%%; without fmpq every block is int4",
                                     default=0.5)
    fmpq_down_rotation: str = _opt("w4a4 (the qoq step fmpq): hadamard rotates every "
                                   "activation block of w_down's input (the SwiGLU output, "
                                   "which no offline rotation reaches) by a randomized "
                                   "Hadamard matrix at run time, folded into w_down's columns, "
                                   "so that each 4-bit block's scale serves all its channels "
                                   "(one small mm a layer; compiler/fmpq.py); none: no rotation",
                                   ("hadamard", "none"), default="hadamard")
    fmpq_permute: str = _opt("w4a4 (the qoq step fmpq): absmax permutes each linear's input "
                             "channels so that the loud ones fill the leading (int8) blocks, "
                             "folded into the producers; none keeps the model's channel order "
                             "(the ablation of FMPQ's permutation)", ("absmax", "none"),
                             default="absmax")
    fmpq_a4_clip: str = _opt("w4a4 (the qoq step fmpq): search clips each linear's 4-bit "
                             "activation blocks' scale to the share of their max (1.0 .. 0.7) "
                             "with the least weighted error on the calibration rows; a number "
                             "clips every linear's to that share; none: the max sets the scale",
                             ("search", "none", "0.95", "0.9", "0.85", "0.8"), default="search")
    lm_head: str = _opt("the LM head's precision: float (the activation dtype, as in QServe), "
                        "w8a8 (int8 weights per channel, int8 activations per token: half "
                        "the bytes of the largest weight of a decode step; <= 0.22%% "
                        "perplexity on SmolLM2) or same (the linears' --precision); auto: "
                        "w8a8 for w8a8 and the w4a8 family (integer GEMMs), else float",
                        ("auto", "float", "w8a8", "same"), default="auto")
    int8_linears: float | None = _opt(
        "w4a8 family with the qoq step gptq: the share of the decoder linears' weights kept at "
        "W8A8, the linears whose 4-bit weights cost the calibration text's loss the most per "
        "weight (compiler/sensitivity.py); 0 keeps every one at 4 bits (the decode GEMMs read "
        "1.2x / 1.3x fewer bytes than at 0.2 / 0.3); default (None): the recipe's, 0.2 for "
        "w4a8 and 0.3 for w4a8-g64 with qoq, else 0", default=None)

    def __post_init__(self):
        self._resolve_quantizer()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of "
                                 f"{', '.join(choices)}; got {getattr(self, f.name)!r}")
        if self.kv_block_size not in KV_BLOCK_SIZES:
            raise ValueError(f"--kv-block-size must be a power of two from {KV_BLOCK_SIZES[0]} "
                             f"to {KV_BLOCK_SIZES[-1]}, got {self.kv_block_size}")
        unknown = set(self.steps) - set(QOQ_STEPS)
        if unknown:
            raise ValueError(f"--qoq-steps: unknown steps {sorted(unknown)}; known: "
                             f"{', '.join(QOQ_STEPS)}")
        if self.quantizer == "qoq" and self.scheme is None:
            raise ValueError("--quantizer qoq needs a quantized --precision (w8a8, w4a8, ...)")
        spec = SPECS[self.precision]
        if self.quantizer == "qoq" and not spec.qoq:
            raise ValueError(f"--quantizer qoq does not support --precision {self.precision} "
                             "(its steps search integer grids): use --quantizer rtn")
        if self.target not in spec.targets:
            raise ValueError(f"--precision {self.precision} needs --target "
                             f"{' or '.join(spec.targets)}, got --target {self.target}")
        if "fmpq" in self.steps and self.scheme != W4A4:
            raise ValueError(f"--qoq-steps fmpq chooses w4a4's activation blocks; --precision "
                             f"{self.precision} has none")
        if self.lm_head != "float" and self.scheme is None:
            raise ValueError(f"--lm-head {self.lm_head} needs a quantized --precision (the "
                             f"linears of {self.precision} stay float)")
        if not 0.0 <= self.fmpq_int8_fraction <= 1.0:
            raise ValueError(f"--fmpq-int8-fraction must be in [0, 1], got "
                             f"{self.fmpq_int8_fraction}")
        if not 0.0 <= self.int8_linears <= 1.0:
            raise ValueError(f"--int8-linears must be in [0, 1], got {self.int8_linears}")
        if self.int8_linears and (self.scheme is None or self.scheme.weight_bits != 4
                                  or self.scheme.act_bits != 8 or "gptq" not in self.steps):
            raise ValueError(f"--int8-linears keeps W4A8 linears at W8A8 as QoQ's GPTQ measures "
                             f"them: it needs a w4a8 --precision and the qoq step gptq (got "
                             f"--precision {self.precision}, steps {self.qoq_steps or 'none'})")
        if min(self.calib_samples, self.key_calib_samples) < 1 or self.calib_seq_len < 2:
            raise ValueError("--calib-samples and --key-calib-samples must be >= 1 and "
                             "--calib-seq-len >= 2")
        if self.max_seq_len != 0 and not MIN_SEQ_LEN <= self.max_seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"--max-seq-len must be 0 (the model's context) or from "
                             f"{MIN_SEQ_LEN} (one prompt token and one generated token) to "
                             f"{MAX_SEQ_LEN}, got {self.max_seq_len}")

    def _resolve_quantizer(self) -> None:
        """Replace `auto` in quantizer / qoq_steps by the precision's recipe (QOQ_RECIPES),
        lm_head `auto` by LM_HEAD_DEFAULT and int8_linears None by INT8_LINEARS_DEFAULT, so
        that the config, and the manifest that
        stores it, say what runs. A config made with dataclasses.replace keeps the values it
        resolved; pass quantizer="auto" (and qoq_steps="auto", int8_linears=None) to resolve
        them again for another precision."""
        quantizer = self.quantizer
        if quantizer == "auto":
            quantizer = "qoq" if self.precision in QOQ_RECIPES else "rtn"
        steps = self.qoq_steps
        if steps == "auto":
            steps = "" if quantizer == "rtn" else QOQ_RECIPES.get(self.precision,
                                                                  QOQ_FALLBACK_STEPS)
        object.__setattr__(self, "quantizer", quantizer)  # frozen: set once, here
        object.__setattr__(self, "qoq_steps", steps)
        if self.lm_head == "auto":
            object.__setattr__(self, "lm_head", LM_HEAD_DEFAULT.get(self.precision, "float"))
        if self.int8_linears is None:
            share = INT8_LINEARS_DEFAULT.get(self.precision, 0.0) \
                if quantizer == "qoq" and "gptq" in map(str.strip, steps.split(",")) else 0.0
            object.__setattr__(self, "int8_linears", share)

    @property
    def scheme(self) -> QuantScheme | None:
        return PRECISIONS[self.precision]

    @property
    def head_scheme(self) -> QuantScheme | None:
        """The LM head's scheme (None: float)."""
        return {"float": None, "w8a8": W8A8, "same": self.scheme}[self.lm_head]

    def linear_schemes(self, qoq_report: dict | None) -> dict[str, QuantScheme]:
        """{decoder linear: scheme} for those not in --precision's scheme: the ones QoQ kept at
        8 bits (`--int8-linears`, qoq_report["int8_linears"])."""
        return {name: W8A8 for name in (qoq_report or {}).get("int8_linears", ())}

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.qoq_steps.split(",") if x.strip())

    @property
    def centers_keys(self) -> bool:
        return self.kv != "fp16" and self.kv_key_centering == "mean"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    # options of older artifacts, as JSON type names (runtime/manifest.py checks them), that
    # from_json maps onto today's: quantize_lm_head (bool) became lm_head
    LEGACY_FIELDS = {"quantize_lm_head": "bool"}

    @classmethod
    def from_json(cls, d: dict) -> "CompileConfig":
        d = dict(d)
        if "quantize_lm_head" in d:  # before `lm_head`: a bool
            d["lm_head"] = "same" if d.pop("quantize_lm_head") else "float"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown compile options in artifact: {sorted(unknown)}")
        # artifacts older than an option were compiled without it
        return cls(**{"kv_rotation": "none", "kv_key_centering": "none", "gptq_order": "natural",
                      "fmpq_int8_fraction": 0.25, "int8_linears": 0.0, "lm_head": "float",
                      "fmpq_down_rotation": "none", "fmpq_a4_clip": "none", **d})
