"""QoQ weight clipping: the clipping ratio (per output channel by default, or per linear) that
minimizes the linear's quantized output error on calibration rows.

For a linear with weight W [N, K] and calibration input rows X [S, K] the searched objective is

    err(r) = || X W^T - Q_a(X) Q_w(clip_r(W))^T ||_F^2

with Q_a the per-token INT8 fake quantization of the runtime (`quant_a8_ref`) and Q_w the
round-to-nearest of the scheme (`dequantize(quantize_weight(.))`). The ratio is taken from a
grid (1.0, 0.95, ..., 0.5); ties go to the earlier grid entry, so r = 1 (no clipping) wins
unless clipping strictly helps.

clip_r(W) shrinks the quantization range toward zero, always over the same range the
quantizer measures, so that RTN of the clipped weight is exactly the searched quantization:

* symmetric per channel (W8): each row clamped to [-r * max|w|, r * max|w|];
* asymmetric per channel (W4): each row clamped to [r * lo, r * hi], lo = min(min w, 0),
  hi = max(max w, 0) (the zero-including range `quantize_w4_per_channel` uses);
* progressive group (W4 g128 / g64): each group of `group_size` input channels clamped to
  [r * lo_g, r * hi_g] over its own (zero-including) range, i.e. the level-2 range is clipped.
  The level-1 per-row scale is the largest group |range| of the row, so it shrinks by r as well
  and every group keeps its relative place on the INT8 grid; the level-2 UINT4 step of each
  group shrinks by r.

The clipped weights are returned (values only move toward zero, never leave the original
range); the compiler's later RTN then reproduces the searched quantization.

Fused linears are searched per original projection, each on its own output error: q, k and v
row blocks of `wqkv`, gate and up row blocks of `w_gate_up` (keys `layers.{i}.wqkv.q`, ...,
`layers.{i}.w_gate_up.up` in the returned ratios). QServe scores q/k on the attention output;
that needs whole calibration sequences with their positions (RoPE), while `CalibStats` holds a
subsample of independent rows, so the per-block output error is used instead. Since every
scheme quantizes row by row, clipping row blocks separately is exactly what RTN of the fused
matrix sees.

Granularity. The output error is a sum over output channels, and every scheme quantizes row by
row, so the best ratio of each output channel can be taken separately at no extra cost
(`granularity="row"`, the default; `chosen` then reports the mean ratio of each linear's rows).
`granularity="tensor"` takes one ratio per linear (per projection of a fused one). Measured on
SmolLM2-135M-Instruct (float weights of the bundled GGUF, no rotation/smoothing, 512 calibration
rows per linear, NLL on 512 held-out pydoc tokens, weights fake-quantized, float activations;
float 2.86): W4A8 per-channel RTN 3.59, per-tensor clip 3.82 (worse than RTN), per-row clip
3.17; W4A8-g128 RTN 3.13, per-tensor 3.20, per-row 3.12. A single ratio clips every row by the
same amount, which helps the rows it was chosen for and hurts the rest.

The search is vectorized: all ratios of a chunk of rows are clipped, fake-quantized and
multiplied by Q_a(X) in one batch; rows are chunked so that no intermediate exceeds
`max_elements`. The fake quantization of the search computes the quantizer's scales from the
clamp bounds instead of re-measuring the clipped tensor (bitwise equal to
`dequantize(quantize_weight(clip_r(W)))`, tested), which makes the elementwise work a few passes
(`fake_quant_weight` is the same path at r = 1). Its time on SmolLM2-135M is the `clip` entry
of the manifest's `qoq.step_seconds` (bench/results/qoq-speed-2026-12-06.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from qcompile.runtime.ops.quant import quant_a8_ref

from .calibrate import CalibStats
from .config import QuantScheme
from .quantize import PROTECTIVE_RANGE, _safe, fp16_scale

DEFAULT_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))
MAX_ELEMENTS = 1 << 21  # per [R, n, K] / [S, R * n] intermediate (8 MiB in float32: cache-sized)


def fake_quant_act(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token symmetric fake quantization of activations x [..., K] (A8: the runtime's
    `quant_a8_ref`, dequantized)."""
    x = x.float()
    if bits >= 16:
        return x
    codes, s = _act_codes(x, bits)
    return codes * s


def fake_quant_weight(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Q_w: the float weight that RTN of `scheme` stands for (rows are independent), float32:
    `dequantize(quantize_weight(w))` bitwise, by the search's fast path at ratio 1 (clip_1 is
    the identity; no integer round trip)."""
    return _fake_quant_clipped(w.float(), _ratios([1.0]), scheme)[0]


def _bounds(w: torch.Tensor, r: torch.Tensor, scheme: QuantScheme):
    """Clamp bounds of clip_r: (lo, hi), broadcastable against w[None] ([R, n, 1]) or, for
    group schemes, against the padded groups [R, n, K/g, g]. r: [R] (every ratio for every
    row) or [R, n] (a ratio per row)."""
    r = r.to(w)
    r = (r[:, None] if r.dim() == 1 else r)[..., None]  # [R, 1 or n, 1]
    if scheme.weight_bits == 8 or (scheme.symmetric and scheme.group_size is None):
        b = w.abs().amax(dim=1, keepdim=True)[None] * r  # [R, n, 1]
        return -b, b
    if scheme.group_size is None:
        return (w.amin(dim=1, keepdim=True).clamp(max=0)[None] * r,
                w.amax(dim=1, keepdim=True).clamp(min=0)[None] * r)
    wg = _groups(w, scheme.group_size)  # zero padding lies inside every zero-including range
    return (wg.amin(dim=2, keepdim=True).clamp(max=0)[None] * r[..., None],
            wg.amax(dim=2, keepdim=True).clamp(min=0)[None] * r[..., None])


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    pad = (-w.shape[1]) % g
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return wp.view(w.shape[0], -1, g)


def _clip_many(w: torch.Tensor, ratios: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """w [n, K] float32, ratios [R] (or [R, n]: per row) -> clip_r(w) for every ratio,
    [R, n, K]."""
    n, k = w.shape
    lo, hi = _bounds(w, ratios, scheme)
    grouped = scheme.group_size is not None and scheme.weight_bits != 8
    src = _groups(w, scheme.group_size) if grouped else w
    return torch.clamp(src[None], lo, hi).view(len(ratios), n, -1)[..., :k]


def _fake_quant_clipped(w: torch.Tensor, ratios: torch.Tensor,
                        scheme: QuantScheme) -> torch.Tensor:
    """fake_quant_weight(clip_r(w), scheme) for every ratio, [R, n, K], without the full-size
    reductions and integer round trips of quantize + dequantize: every statistic the quantizer
    measures on clip_r(w) is a clamp bound (0 < r <= 1, so a row/group extreme lands exactly
    on its bound), or for the level-2 range a monotone function of one, so the scales are
    computed from the bounds with the quantizer's own arithmetic and the result is bitwise
    equal to `fake_quant_weight(clip_weight(w, r), scheme)` (tested)."""
    n, k = w.shape
    nr = len(ratios)
    lo, hi = _bounds(w, ratios, scheme)
    if scheme.weight_bits == 8 or scheme.group_size is None:
        if scheme.weight_bits == 8:  # quantize_w8: s = max|w| / 127, q in [-127, 127]
            s = _safe(hi / 127)
            qlo, qhi = -127.0, 127.0
        else:                         # quantize_w4_per_channel: q - z in [-z, 15 - z]
            s = _safe((hi - lo) / 15)
            z = torch.round(-lo / s)
            qlo, qhi = -z, 15 - z
        out = torch.clamp(w[None], lo, hi).div_(s).round_()
        return out.clamp_(qlo, qhi).mul_(s)
    wg = _groups(w, scheme.group_size)[None]
    if scheme.act_bits >= 16:  # quantize_w4_group_fp: float16 scale, integer zero per group
        s = fp16_scale(lo, hi)
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        out = torch.clamp(wg, lo, hi).div_(s).round_().clamp_(-z, 15 - z).mul_(s).view(nr, n, -1)
        return out[..., :k] if out.shape[-1] != k else out
    # quantize_w4_group: level 1 symmetric INT8 per row, level 2 UINT4 per group
    s1 = _safe(torch.maximum(-lo, hi).amax(dim=2, keepdim=True) / PROTECTIVE_RANGE)
    lo8 = torch.clamp(torch.round(lo / s1), -PROTECTIVE_RANGE, PROTECTIVE_RANGE).clamp(max=0)
    hi8 = torch.clamp(torch.round(hi / s1), -PROTECTIVE_RANGE, PROTECTIVE_RANGE).clamp(min=0)
    s2 = torch.clamp(torch.round((hi8 - lo8) / 15), min=1)
    z2 = torch.clamp(torch.round(-lo8 / s2), 0, 15)
    out = torch.clamp(wg, lo, hi).div_(s1).round_()
    out = out.clamp_(-PROTECTIVE_RANGE, PROTECTIVE_RANGE).div_(s2).round_()
    out = out.clamp_(-z2, 15 - z2).mul_(s2).mul_(s1).view(nr, n, -1)
    return out[..., :k] if out.shape[-1] != k else out


def clip_weight(w: torch.Tensor, ratio: float | torch.Tensor,
                scheme: QuantScheme) -> torch.Tensor:
    """clip_r(w) (see the module docstring) in w's dtype; ratio: one float, or one per row
    ([N] tensor)."""
    rt = _ratios(ratio.reshape(1, -1) if torch.is_tensor(ratio) else [ratio])
    return _clip_many(w.float(), rt, scheme)[0].to(w.dtype)


def _ratios(ratios) -> torch.Tensor:
    rt = torch.as_tensor(ratios if torch.is_tensor(ratios) else [float(r) for r in ratios],
                         dtype=torch.float32)
    if rt.numel() == 0 or not bool(((rt > 0) & (rt <= 1)).all()):
        raise ValueError(f"clipping ratios must be in (0, 1], got {rt.tolist()}")
    return rt


@torch.no_grad()
def row_errors(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme,
               ratios: Sequence[float] = DEFAULT_RATIOS,
               max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Output error per (ratio, output channel): [R, N] float64, entry (r, n) is
    sum_s (X W^T - Q_a(X) Q_w(clip_r(W))^T)[s, n]^2. x [S, K] are input rows of the linear.

    The error is split as Q_a(X) (Q_w - W)^T + (Q_a(X) - X) W^T: the second term does not
    depend on the ratio (one float32 GEMM), and the first, R times larger, runs in bfloat16
    on the activations' integer codes (exact in bfloat16) times the small differences Q_w - W, its
    per-token scale applied after. Relative error of each entry ~2^-8, which only reorders
    ratios whose errors tie to that precision (99% of rows choose as in float32), at half the
    time of one float32 GEMM of Q_a(X) by every clipped weight (SmolLM2-135M: clip 13 -> 7 s
    on 2 cores)."""
    w = w.float()
    x = x.to(device=w.device, dtype=torch.float32)
    codes, s_x = _act_codes(x, scheme.search_act_bits)
    xq_err = codes * s_x - x  # Q_a(X) - X
    codes = codes.to(torch.bfloat16)
    rt = _ratios(ratios)
    nr, (n, k), s = len(rt), w.shape, x.shape[0]
    chunk = max(1, max_elements // (nr * max(k, s)))
    err = torch.empty(nr, n, dtype=torch.float64, device=w.device)
    for n0 in range(0, n, chunk):
        wc = w[n0:n0 + chunk]
        m = wc.shape[0]
        dw = _fake_quant_clipped(wc, rt, scheme).sub_(wc).reshape(nr * m, k)
        d = torch.addcmul((xq_err @ wc.T)[:, None, :],  # [S, R, m]
                          (codes @ dw.to(torch.bfloat16).T).view(s, nr, m), s_x[:, :, None])
        err[:, n0:n0 + m] = torch.linalg.vector_norm(d, dim=0).square_()
    return err


def _act_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, s) with Q_a(x) = codes * s: the integer codes as float (exact in bfloat16 for 8
    bits and fewer) and per-token scales [S, 1]; 16-bit activations: (x, 1)."""
    if bits >= 16:
        return x, torch.ones(x.shape[0], 1, device=x.device)
    if bits == 8:
        q, s, _ = quant_a8_ref(x)
        return q.float(), s
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, 1.0)
    return torch.clamp(torch.round(x / s), -qmax, qmax), s


def search_clip_ratio(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme,
                      ratios: Sequence[float] = DEFAULT_RATIOS) -> tuple[float, torch.Tensor]:
    """(best ratio, output error of every ratio [R]) for one linear w [N, K] on rows x."""
    err = row_errors(w, x, scheme, ratios).sum(dim=1)
    return float(ratios[int(torch.argmin(err))]), err


def _blocks(cfg, name: str) -> list[tuple[str, int, int]]:
    """(suffix, first row, end row) of the original projections fused in linear `name`."""
    kind = name.rsplit(".", 1)[1]
    if kind == "wqkv":
        q, kv = cfg.q_size, cfg.kv_size
        return [("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)]
    if kind == "w_gate_up":
        i = cfg.intermediate_size
        return [("gate", 0, i), ("up", i, 2 * i)]
    return [("", 0, None)]


LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


@torch.no_grad()
def clip_weights(cfg, weights: dict[str, torch.Tensor], stats: CalibStats, scheme: QuantScheme,
                 ratios: Sequence[float] = DEFAULT_RATIOS, *, granularity: str = "row",
                 progress: bool = False, max_elements: int = MAX_ELEMENTS
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Clip every decoder linear (not the head) at its searched ratio.

    granularity "tensor": one ratio per linear (per original projection of a fused one),
    minimizing its summed output error. "row" (default): the output error is a sum over output
    channels and every scheme quantizes row by row, so each output channel takes its own best
    ratio from the grid -- the same objective minimized over a richer family (as AWQ's
    per-channel clipping; see the module docstring for why it is the default).

    Returns (weights, chosen): a new dict with the clipped linears (other tensors shared with
    the input), and per linear, or per original projection of a fused one
    (`layers.{i}.wqkv.q|k|v`, `layers.{i}.w_gate_up.gate|up`, `layers.{i}.wo`,
    `layers.{i}.w_down`), the chosen ratio ("tensor", a grid value) or the mean of its rows'
    ratios ("row")."""
    if granularity not in ("tensor", "row"):
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    rt = _ratios(ratios)
    out, chosen = dict(weights), {}
    names = [f"layers.{i}.{lin}" for i in range(cfg.num_layers) for lin in LINEARS]
    for name in tqdm(names, desc="clip", disable=not progress, unit="linear"):
        if name not in stats.samples:
            raise KeyError(f"clip_weights: no calibration samples for {name}")
        w = weights[name]
        err = row_errors(w, stats.samples[name], scheme, ratios, max_elements)
        per_row = torch.empty(w.shape[0], dtype=torch.float32)
        for suffix, lo, hi in _blocks(cfg, name):
            hi = w.shape[0] if hi is None else hi
            eb = err[:, lo:hi].cpu()
            if granularity == "tensor":  # argmin: the first minimum, i.e. the larger ratio
                per_row[lo:hi] = rt[int(torch.argmin(eb.sum(dim=1)))]
            else:
                per_row[lo:hi] = rt[torch.argmin(eb, dim=0)]
            chosen[f"{name}.{suffix}" if suffix else name] = round(float(per_row[lo:hi].mean()), 4)
        out[name] = _clip_many(w.float(), per_row[None], scheme)[0].to(w.dtype)
    return out, chosen
