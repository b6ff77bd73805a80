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
relative, and the few batches add little); `hessian()` hands GPTQ float32. bfloat16 blocks
(twice float32's GEMM rate on this CPU) were tried and dropped: their ~0.3% error per entry
left some of SmolLM2's H indefinite after GPTQ's 1% dampening.

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
from torch.overrides import TorchFunctionMode
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
        """GPTQ's H = 2 X^T X / n of linear `name` over every calibration token, [K, K] f32
        (the Hessian of the layer's squared output error ||X W^T - X Q^T||^2 / n in W)."""
        if name not in self.xtx:
            raise KeyError(f"no Hessian for {name}: calibrate(..., hessian=True) collects them")
        return self.xtx[name] * (2.0 / self.tokens[name])

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
                          text_file: str | Path | None = None,
                          source: str = "pydoc") -> list[list[int]]:
    """num_samples windows of seq_len tokens of text_file, else of `source`: "pydoc" is the
    pydoc text after the evaluation split, any other a `runtime/texts.py` source."""
    from qcompile.runtime.eval import EVAL_TOKENS_RESERVED, pydoc_text
    if text_file is not None:
        ids = tokenizer.encode(Path(text_file).read_text())
    elif source == "pydoc":
        ids = tokenizer.encode(pydoc_text())[EVAL_TOKENS_RESERVED:]
    else:
        from qcompile.runtime.texts import read_source
        ids = tokenizer.encode(read_source(source))
    if len(ids) < num_samples * seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {num_samples} x "
                         f"{seq_len}: use fewer or shorter samples, or a longer --calib-text")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]


def canonical_name(module_path: str) -> str:
    """Exported module path of a Decoder weight -> canonical name (`top.embed` -> `embed`)."""
    return module_path.removeprefix("top.")


class _Collector:
    """Adds one forward's values into `stats`: a linear's input rows (absmax, `rows` sampled
    rows, X^T X with `hessian`) and, layer after layer, the keys after RoPE."""

    def __init__(self, stats: CalibStats, rows: int, gen, hessian: bool, linears: bool):
        self.stats, self.rows, self.gen = stats, rows, gen
        self.hessian, self.linears = hessian, linears
        self.layer = 0

    def keys(self, k: torch.Tensor) -> None:
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

    def linear(self, name: str, x: torch.Tensor) -> None:
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
            acc = self.stats.xtx.get(name)
            if acc is None:
                acc = self.stats.xtx[name] = x.new_zeros(x.shape[1], x.shape[1])
            add_gram(acc, x)
            self.stats.tokens[name] = self.stats.tokens.get(name, 0) + x.shape[0]


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc [K, K] += X^T X for x [n, K], float32 GEMM-accumulate (no temporary), computing only
    the blocks on and above the diagonal and mirroring them: the Gram matrix is symmetric, so
    with b blocks per side b(b+1)/2 of b^2 GEMMs run (SmolLM2's K 576 / 1536: 6.3 / 48 ms per
    4 x 512 tokens instead of 9.3 / 76; bitwise the full product on the CPU)."""
    k = x.shape[1]
    bs = -(-k // max(1, min(8, k // 192)))
    for i in range(0, k, bs):
        xi = x[:, i:i + bs]
        for j in range(i, k, bs):
            acc[i:i + bs, j:j + bs].addmm_(xi.T, x[:, j:j + bs])
            if j > i:
                acc[j:j + bs, i:i + bs].copy_(acc[i:i + bs, j:j + bs].T)


class _Recorder(fx.Interpreter):
    """Runs a graph, handing each linear's input and each layer's keys to a `_Collector`."""

    def __init__(self, gm, names: dict[str, str], collect: _Collector):
        super().__init__(gm)
        self.names, self.collect = names, collect

    def run_node(self, n):
        if n.target is ATTENTION_OPS["fp16"]:
            return _prefill_attention(*self.fetch_args_kwargs_from_env(n)[0])
        out = super().run_node(n)
        if n.target is torch.ops.aten.linear.default and n.args[1].name in self.names:
            self.collect.linear(self.names[n.args[1].name], self.env[n.args[0]])
        elif n.target is KV_ENCODE_OPS["fp16"]:
            self.collect.keys(self.env[n.args[0]])
        return out


class _EagerRecorder(TorchFunctionMode):
    """The same for the decoder run eagerly: every `F.linear` whose weight is one of `names`
    (tensor id -> canonical name) and every fp16 key encode goes to the collector, and
    attention takes the causal prefill path."""

    def __init__(self, names: dict[int, str], collect: _Collector):
        super().__init__()
        self.names, self.collect = names, collect

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATTENTION_OPS["fp16"]:
            return _prefill_attention(*args, **kwargs)
        if func is F.linear and id(args[1]) in self.names:
            self.collect.linear(self.names[id(args[1])], args[0])
        elif func is KV_ENCODE_OPS["fp16"]:
            self.collect.keys(args[0])
        return func(*args, **kwargs)


SAMPLE_ROWS = 512  # input rows kept per linear for the smoothing / reorder / clip searches


def _prefill_attention(q, kv_new, kv_cache, block_tables, ctx_lens, query_start,
                       num_kv_heads: int, scale: float) -> torch.Tensor:
    """`paged_attention_fp16` where every sequence is a prefill over an empty cache (as in
    calibration): causal attention of each sequence's new tokens, by SDPA's causal kernel with
    grouped kv heads instead of the reference op's explicit mask and repeated heads (the same
    function; the reference spent a third of a calibration forward there)."""
    if bool(ctx_lens.any()):
        raise ValueError("calibration attention expects empty caches (ctx_lens 0)")
    kv = CODECS["fp16"][1](kv_new, num_kv_heads, q.shape[-1], q.dtype)  # [2, T, Hkv, D]
    return causal_attention(q, kv[0], kv[1], query_start, scale)


def causal_attention(q, k, v, query_start, scale: float) -> torch.Tensor:
    """Causal attention of each sequence of a flat batch (q [T, Hq, D], k and v [T, Hkv, D],
    sequence i = rows query_start[i]:query_start[i + 1]) over its own tokens; differentiable."""
    out = []
    starts = query_start.tolist()
    for lo, hi in zip(starts[:-1], starts[1:]):
        # [1, H, n, D]: with a batch dimension the CPU takes SDPA's flash kernel (3.5x faster
        # than the 3-d call's math path on SmolLM2's 9 heads x 512 tokens)
        qb, kb, vb = (x[lo:hi].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def calibrate(lowering, sequences: list[list[int]], *, rows_per_batch: int | None = None,
              batch: int = 4, seed: int = 0, hessian: bool = False, linears: bool = True,
              progress: bool = True) -> CalibStats:
    """Statistics of the float graph in `lowering` (canonicalized, before any quantization
    pass) over the calibration sequences, `batch` sequences per forward; with `hessian`, also
    X^T X of every linear's input (see the module docstring); without `linears`, keys only.
    rows_per_batch (default: SAMPLE_ROWS over the batches, so the searches see as many rows
    whatever the number of sequences) input rows of each linear are kept per forward."""
    names = {ph: canonical_name(path) for ph, path in lowering.origin.items()}
    weights = list(lowering.weights.values())
    kv_shape = tuple(int(n) for n in lowering.placeholders()["kv_cache"].meta["val"].shape)

    def forward(collect, seqs):
        _Recorder(lowering.gm, names, collect).run(
            *weights, *_prefill_inputs(kv_shape, seqs, weights[0].device))
    return _collect(forward, sequences, batch, rows_per_batch, seed, hessian, linears,
                    progress)


def _collect(forward, sequences, batch: int, rows_per_batch: int | None, seed: int,
             hessian: bool, linears: bool, progress: bool) -> CalibStats:
    """The statistics of `forward(collector, sequences)` run on `batch` sequences at a time:
    the loop `calibrate` (a graph) and `FloatGraph` (the eager decoder) share."""
    if rows_per_batch is None:  # SAMPLE_ROWS over the batches
        rows_per_batch = -(-SAMPLE_ROWS // -(-len(sequences) // batch))
    stats, gen = CalibStats(), torch.Generator().manual_seed(seed)
    for i in tqdm(range(0, len(sequences), batch), desc="calibrate", unit="batch",
                  disable=not progress):
        with torch.no_grad():
            forward(_Collector(stats, rows_per_batch, gen, hessian, linears),
                    sequences[i:i + batch])
    return stats


class FloatGraph:
    """The float32 decoder (`models/decoder.py`) run eagerly for calibration, with each call's
    weights (the QoQ steps calibrate the model as they transform it). Eager, not a torch.export
    capture: a capture costs ~5 s of CPU on SmolLM2-135M on top of the compile's own, and the
    eager forward runs the same aten ops; `_EagerRecorder` sees every linear's input and every
    key as `_Recorder` does in a graph (tested equal). Float32 throughout: running the linears
    in bfloat16 on the CPU saved only ~4 s of SmolLM2's ~45 s calibration and measured worse on
    held-out text (cpython-prose 35.25 -> 36.13, package-readmes 20.20 -> 20.65; pydoc, the
    calibration's own source, 16.24 -> 16.05), so it was not kept."""

    def __init__(self, cfg, device="cpu"):
        from .capture import KVSpec
        self.cfg, self.device = cfg, torch.device(device)
        spec = KVSpec.of(cfg, "fp16", 16, torch.float32)
        self.kv_shape = (spec.num_layers, 2, 0, spec.block_size, spec.record_bytes)

    def stats(self, weights: dict[str, torch.Tensor], seqs, progress: bool,
              hessian: bool = False, linears: bool = True, batch: int = 4,
              seed: int = 0) -> CalibStats:
        """Statistics of the float model with these (canonical) weights over `seqs`, as
        `calibrate` collects them from a graph."""
        from qcompile.models.decoder import Decoder
        dec = Decoder(self.cfg, {k: v.to(self.device, torch.float32)
                                 for k, v in weights.items()}, torch.float32).to(self.device)
        names = {id(t): canonical_name(path) for path, t in dec.named_buffers()}

        def forward(collect, part):
            with _EagerRecorder(names, collect):
                dec(*_prefill_inputs(self.kv_shape, part, self.device))
        return _collect(forward, seqs, batch, None, seed, hessian, linears, progress)


def key_mean(cfg, weights: dict[str, torch.Tensor], seqs, progress: bool = True
             ) -> torch.Tensor:
    """[L, Hkv * D] mean post-RoPE key of the float model with these (canonical) weights over
    the calibration sequences: one forward of the float decoder, keys only."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return FloatGraph(cfg, device).stats(weights, seqs, progress, linears=False).key_mean


def _prefill_inputs(kv_shape: tuple, seqs: list[list[int]], device) -> tuple:
    """A flat prefill of seqs over an empty paged cache sized for them; kv_shape is the
    cache's [L, 2, pages, block, record] (its page count is not used)."""
    from qcompile.runtime.flat_batch import Span, flat_batch
    layers, _, _, block, record = (int(n) for n in kv_shape)
    spans, start = [], 0
    for s in seqs:
        n = -(-len(s) // block)
        spans.append(Span(s, 0, range(start, start + n)))
        start += n
    x = flat_batch(spans, block).tensors(device)
    cache = torch.zeros(layers, 2, start, block, record, dtype=torch.uint8, device=device)
    return x.program_args(cache)
