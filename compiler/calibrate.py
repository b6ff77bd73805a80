"""Calibration: run text through the float graph and collect what the QoQ steps need.

An fx.Interpreter walks the canonical (float, canonicalized) graph and records, for every
linear, its input's per-channel absmax and a subsample of input rows (for smoothing-alpha and
clipping searches), and for every layer the keys after RoPE (the first argument of
`kv_encode`) per channel: their absmax (SmoothAttention) and their sum over every calibration
token (the key centering of `--kv int4`, `CalibStats.key_mean`). Statistics are keyed by the
linear's canonical weight name (`layers.3.wqkv`, ..., `lm_head`/`embed` for the head).

On request (`hessian=True`, for GPTQ) it also sums X^T X over ALL calibration tokens of every
linear's input X [T, K]: K^2 float32 per linear (SmolLM2-135M: 0.4 GB for 30 layers), so it is
off by default. Fused linears (wqkv, w_gate_up) are one linear in the graph with one input, so
they get one matrix. Each batch adds its product into the sum with one float32 GEMM (`addmm_`:
no temporary, no conversion; the sum over a batch's 2048 tokens already rounds to ~1e-6
relative, and the few batches add little); `hessian()` hands GPTQ float64.

Attention runs by SDPA's causal kernel (`_prefill_attention`): calibration only prefills empty
caches, where the runtime's reference op (explicit mask, repeated kv heads) computes the same
function more slowly.

Calibration text defaults to the pydoc topics AFTER the evaluation tokens, so calibration and
evaluation never share text; any text file can be used instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx
from tqdm import tqdm

from qcompile.runtime.ops import KV_ENCODE_OPS
from qcompile.runtime.ops.attention import ATTENTION_OPS
from qcompile.runtime.ops.kv import CODECS


@dataclass
class CalibStats:
    absmax: dict[str, torch.Tensor] = field(default_factory=dict)   # name -> [K] max |x|
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, K] rows of x
    key_absmax: list[torch.Tensor] = field(default_factory=list)    # layer -> [Hkv * D] max |k|
    key_sum: list[torch.Tensor] = field(default_factory=list)       # layer -> [Hkv * D] f64 sum k
    key_tokens: int = 0                                             # tokens summed in key_sum
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)      # name -> [K, K] f32 X^T X
    tokens: dict[str, int] = field(default_factory=dict)            # name -> rows summed in xtx

    def hessian(self, name: str) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / n of linear `name` over every calibration token, [K, K] f64
        (the Hessian of the layer's squared output error ||X W^T - X Q^T||^2 / n in W)."""
        if name not in self.xtx:
            raise KeyError(f"no Hessian for {name}: calibrate(..., hessian=True) collects them")
        return self.xtx[name].double() * (2.0 / self.tokens[name])

    def scaled(self, scales: dict[str, torch.Tensor]) -> "CalibStats":
        """The statistics of the model in which input channel j of each linear `name` is
        divided by scales[name][j] (QoQ's smoothing: exact in float, so the new model's
        statistics follow from these without another forward pass): absmax and samples / s,
        X^T X / (s s^T); keys and other linears unchanged."""
        new = dataclasses.replace(self, absmax=dict(self.absmax), samples=dict(self.samples),
                                  xtx=dict(self.xtx))
        for name, s in scales.items():
            s = s.detach().float().cpu()
            if name in new.absmax:
                new.absmax[name] = new.absmax[name] / s.to(new.absmax[name].device)
            if name in new.samples:
                new.samples[name] = new.samples[name] / s.to(new.samples[name].device)
            if name in new.xtx:
                inv = (1.0 / s).to(new.xtx[name])
                new.xtx[name] = new.xtx[name] * inv[:, None] * inv[None, :]
        return new

    @property
    def key_mean(self) -> torch.Tensor:
        """Mean key after RoPE over every calibration token, [L, Hkv * D] float32 (layers in
        the graph's order of kv_encode ops)."""
        if not self.key_sum:
            raise ValueError("no keys recorded: the calibrated graph has no kv_encode_fp16 op")
        return (torch.stack(self.key_sum) / self.key_tokens).float()


def calibration_sequences(tokenizer, num_samples: int, seq_len: int,
                          text_file: str | Path | None = None) -> list[list[int]]:
    """num_samples windows of seq_len tokens (the pydoc text after the eval split by default)."""
    from qcompile.runtime.eval import EVAL_TOKENS_RESERVED, pydoc_text
    if text_file is not None:
        ids = tokenizer.encode(Path(text_file).read_text())
    else:
        ids = tokenizer.encode(pydoc_text())[EVAL_TOKENS_RESERVED:]
    if len(ids) < num_samples * seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {num_samples} x "
                         f"{seq_len}: use fewer or shorter samples, or a longer --calib-text")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]


def canonical_name(module_path: str) -> str:
    """Exported module path of a Decoder weight -> canonical name (`top.embed` -> `embed`)."""
    return module_path.removeprefix("top.")


class _Recorder(fx.Interpreter):
    def __init__(self, gm, names: dict[str, str], stats: CalibStats, rows: int, gen,
                 hessian: bool, linears: bool):
        super().__init__(gm)
        self.names, self.stats, self.rows, self.gen = names, stats, rows, gen
        self.hessian, self.linears = hessian, linears
        self.layer = 0

    def run_node(self, n):
        if n.target is ATTENTION_OPS["fp16"]:
            return _prefill_attention(*self.fetch_args_kwargs_from_env(n)[0])
        out = super().run_node(n)
        if n.target is torch.ops.aten.linear.default and n.args[1].name in self.names:
            self._linear(self.names[n.args[1].name], self.env[n.args[0]])
        elif n.target is KV_ENCODE_OPS["fp16"]:
            self._keys(self.env[n.args[0]])
        return out

    def _keys(self, k: torch.Tensor) -> None:
        """k [T, Hkv, D] of layer self.layer (the encodes run in layer order)."""
        k = k.reshape(k.shape[0], -1).float()
        amax, total = k.abs().amax(0).cpu(), k.double().sum(0).cpu()
        st, i = self.stats, self.layer
        if len(st.key_absmax) <= i:
            st.key_absmax.append(amax)
            st.key_sum.append(total)
        else:
            st.key_absmax[i] = torch.maximum(st.key_absmax[i], amax)
            st.key_sum[i] += total
        if i == 0:
            st.key_tokens += k.shape[0]
        self.layer += 1

    def _linear(self, name: str, x: torch.Tensor) -> None:
        if not self.linears:
            return
        x = x.reshape(-1, x.shape[-1]).float()
        amax = x.abs().amax(0)
        prev = self.stats.absmax.get(name)
        self.stats.absmax[name] = amax if prev is None else torch.maximum(prev, amax)
        pick = x[torch.randperm(x.shape[0], generator=self.gen)[: self.rows]].cpu()
        old = self.stats.samples.get(name)
        self.stats.samples[name] = pick if old is None else torch.cat([old, pick])
        if self.hessian:
            prev = self.stats.xtx.get(name)  # float32 GEMM-accumulate, no temporary
            self.stats.xtx[name] = x.T @ x if prev is None else prev.addmm_(x.T, x)
            self.stats.tokens[name] = self.stats.tokens.get(name, 0) + x.shape[0]


SAMPLE_ROWS = 512  # input rows kept per linear for the smoothing / reorder / clip searches


def _prefill_attention(q, kv_new, kv_cache, block_tables, ctx_lens, query_start,
                       num_kv_heads: int, scale: float) -> torch.Tensor:
    """`paged_attention_fp16` where every sequence is a prefill over an empty cache (as in
    calibration): causal attention of each sequence's new tokens, by SDPA's causal kernel with
    grouped kv heads instead of the reference op's explicit mask and repeated heads (the same
    function; the reference spent a third of a calibration forward there)."""
    if bool(ctx_lens.any()):
        raise ValueError("calibration attention expects empty caches (ctx_lens 0)")
    t, hq, d = q.shape
    kv = CODECS["fp16"][1](kv_new, num_kv_heads, d, q.dtype)  # [2, T, Hkv, D]
    out = torch.empty_like(q)
    starts = query_start.tolist()
    for lo, hi in zip(starts[:-1], starts[1:]):
        qb, k, v = (x[lo:hi].transpose(0, 1) for x in (q, kv[0], kv[1]))  # [H, n, D]
        o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale,
                                           enable_gqa=hq != num_kv_heads)
        out[lo:hi] = o.transpose(0, 1)
    return out


def calibrate(lowering, sequences: list[list[int]], *, rows_per_batch: int | None = None,
              batch: int = 4, seed: int = 0, hessian: bool = False, linears: bool = True,
              progress: bool = True) -> CalibStats:
    """Statistics of the float graph in `lowering` (canonicalized, before any quantization
    pass) over the calibration sequences, `batch` sequences per forward; with `hessian`, also
    X^T X of every linear's input (see the module docstring); without `linears`, keys only.
    rows_per_batch (default: SAMPLE_ROWS over the batches, so the searches see as many rows
    whatever the number of sequences) input rows of each linear are kept per forward."""
    from .capture import KVSpec  # noqa: F401  (the cache layout the graph reads)
    if rows_per_batch is None:
        rows_per_batch = -(-SAMPLE_ROWS // -(-len(sequences) // batch))
    names = {ph: canonical_name(path) for ph, path in lowering.origin.items()}
    stats, gen = CalibStats(), torch.Generator().manual_seed(seed)
    weights = list(lowering.weights.values())
    device = weights[0].device
    for i in tqdm(range(0, len(sequences), batch), desc="calibrate", unit="batch",
                  disable=not progress):
        rec = _Recorder(lowering.gm, names, stats, rows_per_batch, gen, hessian, linears)
        with torch.no_grad():
            rec.run(*weights, *_prefill_inputs(lowering, sequences[i:i + batch], device))
    return stats


class FloatGraph:
    """One float32 capture of the decoder, canonicalized; its weights are swapped for each
    calibration (the QoQ steps calibrate the model as they transform it)."""

    def __init__(self, cfg, weights: dict[str, torch.Tensor], device="cpu"):
        from qcompile.models.decoder import Decoder
        from qcompile.passes.base import Lowering, run_pass
        from qcompile.passes.canonicalize import canonicalize

        from .capture import KVSpec, capture
        # captured on the CPU (export's example inputs live there; the graph itself is device
        # agnostic, as the runtime's is), then its weights move to `device`
        dec = Decoder(cfg, weights, torch.float32)
        self.low = Lowering.from_exported(capture(dec, KVSpec.of(cfg, "fp16", 16, torch.float32)))
        run_pass(canonicalize, self.low)
        for ph, w in self.low.weights.items():
            self.low.weights[ph] = w.to(device)

    def stats(self, weights: dict[str, torch.Tensor], seqs, progress: bool,
              hessian: bool = False, linears: bool = True) -> CalibStats:
        for ph, path in self.low.origin.items():
            name = canonical_name(path)
            if name in weights:
                self.low.weights[ph] = weights[name].to(self.low.weights[ph])
        return calibrate(self.low, seqs, hessian=hessian, linears=linears, progress=progress)


def key_mean(cfg, weights: dict[str, torch.Tensor], seqs, progress: bool = True
             ) -> torch.Tensor:
    """[L, Hkv * D] mean post-RoPE key of the float model with these (canonical) weights over
    the calibration sequences: one forward of the float graph, keys only."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FloatGraph(cfg, weights, device).stats(weights, seqs, progress, linears=False).key_mean


def _prefill_inputs(lowering, seqs: list[list[int]], device) -> tuple:
    """A flat prefill of seqs over an empty paged cache sized for them."""
    from qcompile.runtime.flat_batch import Span, flat_batch
    cache_node = lowering.placeholders()["kv_cache"]
    layers, _, _, block, record = cache_node.meta["val"].shape
    spans, start = [], 0
    for s in seqs:
        n = -(-len(s) // int(block))
        spans.append(Span(s, 0, range(start, start + n)))
        start += n
    x = flat_batch(spans, int(block)).tensors(device)
    cache = torch.zeros(int(layers), 2, start, int(block), int(record), dtype=torch.uint8,
                        device=device)
    return x.program_args(cache)
