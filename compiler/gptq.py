"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): round a linear's weights column by column, each rounding error fed
back into the columns not yet rounded, so that the layer's OUTPUT stays close on calibration
inputs rather than each weight separately.

For a linear with weight W [N, K] and calibration inputs X [n, K], the objective is the squared
output error ||X W^T - X Q^T||_F^2 / n = tr((W - Q) H (W - Q)^T) / 2 with H = 2 X^T X / n
(`CalibStats.hessian`). Rows are independent under it and share H. Rounding column q to Q_q
and re-optimizing the columns F not yet rounded (the OBS update) moves them by

    dW_F = -(W_q - Q_q) / [H_F^-1]_qq * [H_F^-1]_{q,F}

where H_F^-1 is the inverse Hessian of the columns still free, q included. Going left to right
(no act-order), H_F^-1 after columns 0..q-1 are fixed is the Schur complement of the full H^-1,
and row q of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) is exactly
[H_F^-1]_{q,q:} / sqrt([H_F^-1]_qq). So with U computed once:

    err_q = (W_q - Q_q) / U_qq,    W_{:, q+1:} -= err_q U_{q, q+1:}.

Lazy batches: the update of a column only matters when it is rounded, so within a block of
`block` (128) columns the rank-1 updates touch the block only, and the columns to its right
get all of them at once as one GEMM, E [N, B] @ U[block, right], at the end of the block
(same result, cache-friendly).

Numerics (as the paper): H is made positive definite by dampening, H + percdamp * mean(diag H)
* I (percdamp 0.01); a dead input channel (diag 0: always zero on the calibration text) gets
diag 1 and weight 0, which every grid here holds exactly (its code is the zero point). H, its
Cholesky factor and the weight updates are float32, as in the paper's code: the dampening bounds
H's condition number (float64 factors cost SmolLM2-135M's compile 3 s on 2 cores and gave
codes that differ only at float32 ties).

The grid. GPTQ only chooses the CODES: the quantization grid is exactly the scheme's
round-to-nearest grid (`quantize.py`), computed ONCE, before the error feedback, from
`grid_from` (the clipped weights when QoQ clipping ran, so the ratios `clip` chose define the
grid; by default the weights themselves), and the rounding of each column is the scheme's own:

* W8 (symmetric per channel): q = clamp(round(w / s), -127, 127);
* W4 per channel: q = clamp(round(w / s) + z, 0, 15), z integer;
* W4 progressive group: w8 = clamp(round(w / s1), -119, 119), q = clamp(round(w8 / s2) + z2,
  0, 15) with the level-1 s1 of the row and the level-2 integer s2, z2 of the column's group;
* W4A16 group (weight-only): q = clamp(round(w / s) + z, 0, 15), the float16 s and integer z of
  the column's group (GPTQ's own checkpoint format).

Grid parameters (s, z, s1, s2, z2) are thus bitwise those of RTN on `grid_from`, and with a
diagonal H (no correlation between inputs: no feedback) GPTQ returns RTN's codes (tested).
The target W need not lie in the grid's range: QoQ passes the UNCLIPPED weights as W and the
clipped ones as `grid_from`, so the error of a clipped outlier is fed back too and GPTQ
approximates the float model's outputs, not the clipped model's.

Both choices were measured on SmolLM2-135M-Instruct (plain float weights, 32 x 512 calibration
tokens, 20 linears of layers 0/7/15/22/29; tr(dW H dW^T) against the float weights, relative
to RTN of the clipped weights, mean over the linears):

| | w4a8 | w4a8-g128 |
|---|---|---|
| RTN, no clipping | 2.28 | 1.60 |
| RTN of the clipped weights (QoQ `clip`) | 1 | 1 |
| GPTQ, no clipping | 0.51 | 0.37 |
| GPTQ on the clipped weights (target and grid clipped) | 0.60 | 0.56 |
| GPTQ, grid clipped, target unclipped (this module's use) | **0.41** | 0.38 |
| GPTQ, groups measured when they start (reference groupwise mode) | | 0.37 |

So the clipped grid with the unclipped target is best per channel, and for groups every GPTQ
variant on a zero-including range is within 3%.

Act-order (`act_order`, `--gptq-order act`, the default): the input channels are rounded in
order of decreasing diag(H), the largest-energy inputs first, while the most columns are left
to absorb their error; each column keeps its own grid (static groups: the grid is computed
before, so the order changes no scale). SmolLM2 perplexity (24 x 512, KV4 with key rotation
and centering, QoQ recipes of 948c73d): w4a8 16.39 -> 16.01, g64 15.73 -> 15.56.

The static group grid is kept: the reference's groupwise mode (each group's level-2 range
measured on the error-updated weights when the group starts) is no better here, and it would
discard the ratios `clip` searched (with QoQ's A8 activations, which H does not see).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from tqdm import tqdm

from .calibrate import CalibStats
from .clip import fake_quant_weight
from .config import QuantScheme
from .quantize import (PROTECTIVE_RANGE, W4FloatGroupWeights, W4GroupWeights, W4Weights,
                       W8Weights, dequantize, quantize_weight)

PERCDAMP = 0.01
BLOCK = 128
LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")  # the decoder linears QoQ transforms
GPTQ_BATCH_BYTES = 2 << 30  # memory bound of one batched GPTQ loop (gptq_weights)


class _Rounder:
    """The scheme's rounding with its grid fixed (taken from RTN integer weights), for a batch
    of same-shape linears: codes and values of column j of each, in rounding order (`orders`:
    each linear's input channel per column)."""

    def __init__(self, grids: list, orders: torch.Tensor):
        grid = grids[0]
        self.progressive = self.per_group = False
        if isinstance(grid, W8Weights):
            self.s = self._rows(grids, "scale")
            self.z = torch.zeros_like(self.s)
            self.qmin, self.qmax = -127, 127
        elif isinstance(grid, W4Weights):
            self.s, self.z = self._rows(grids, "scale"), self._rows(grids, "zero")
            self.qmin, self.qmax = 0, 15
        elif isinstance(grid, W4FloatGroupWeights):  # W4A16: (q - z) * s, s and z per group
            self.s, self.z = (self._per_column(grids, a, orders) for a in ("scale", "zero"))
            self.qmin, self.qmax, self.per_group = 0, 15, True
        elif isinstance(grid, W4GroupWeights):
            self.s1, self.progressive = self._rows(grids, "s1"), True
            self.s2, self.z2 = (self._per_column(grids, a, orders) for a in ("s2", "z2"))
        else:
            raise TypeError(f"GPTQ has no grid for {type(grid).__name__}")

    @staticmethod
    def _rows(grids, attr: str) -> torch.Tensor:
        """[L, N]: a per-row parameter of each linear."""
        return torch.stack([getattr(g, attr) for g in grids])

    @staticmethod
    def _per_column(grids, attr: str, orders: torch.Tensor) -> torch.Tensor:
        """[L, N, K/g] per-group values -> [K, L, N] float32, row j for the column rounded j-th
        (each column's parameters contiguous)."""
        out = []
        for g, order in zip(grids, orders):
            k = g.q.shape[1]
            t = getattr(g, attr).float().repeat_interleave(g.group_size, dim=1)[:, :k]
            out.append(t.T[order.to(t.device)])
        return torch.stack(out, dim=1).contiguous()

    def __call__(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w [L, N] (column j of each) -> (codes [L, N], the values they stand for [L, N]),
        both float32."""
        # the same op order as quantize.py's quantizers and dequantize: bitwise RTN
        if self.progressive:
            s2, z2 = self.s2[j], self.z2[j]
            w8 = torch.clamp(torch.round(w / self.s1), -PROTECTIVE_RANGE, PROTECTIVE_RANGE)
            q = torch.clamp(torch.round(w8 / s2) + z2, 0, 15)
            return q, (q - z2) * s2 * self.s1
        s, z = (self.s[j], self.z[j]) if self.per_group else (self.s, self.z)
        q = torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax)
        return q, (q - z) * s


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = PERCDAMP, *,
                           reversed_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U [..., K, K] float32 upper triangular with U^T U = (H')^-1, H' = H with dead
    channels' diagonal set to 1, dampened by percdamp * mean(diag); dead [..., K] bool. A
    leading batch of Hessians gives a batch of factors."""
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"Hessian must be square [K, K], got {tuple(h.shape)}")
    # U without forming H^-1: with J the reversal of the channels and L the lower Cholesky
    # factor of J H J, H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J, upper triangular with a
    # positive diagonal, hence THE Cholesky factor (one factorization and one triangular
    # inverse instead of the reference's factorize, invert, factorize again: half the flops).
    # `reversed_input`: h is J H J already (gptq_quantize_many gathers it so, saving a copy);
    # without it, h is left unchanged.
    h = (h.detach().to(torch.float32, copy=True) if reversed_input
         else h.detach().to(torch.float32).flip(-2, -1))
    # one reduction instead of a [.., K, K] bool tensor: any inf or nan makes the sum so
    if not bool(torch.isfinite(h.sum(dim=(-2, -1))).all()):
        raise ValueError("Hessian has non-finite entries (inf/nan in the calibration inputs?)")
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean(-1, keepdim=True))
    dead = dead.flip(-1)
    lower, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise ValueError(f"Hessian not positive definite after dampening {percdamp} (leading "
                         f"minor {int(info.max())}): raise percdamp or calibrate on more "
                         "tokens")
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(-2, -1), dead


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, *,
                  grid_from: torch.Tensor | None = None, percdamp: float = PERCDAMP,
                  block: int = BLOCK, act_order: bool = False
                  ) -> W8Weights | W4Weights | W4GroupWeights:
    """Integer weights of w [N, K] for `scheme`, chosen by GPTQ under H [K, K] on the RTN grid
    of `grid_from` (default w; same shape): see the module docstring. act_order: round the
    input channels in order of decreasing diag(H) (the grid stays each channel's own)."""
    return gptq_quantize_many([w], [h], scheme, grid_from=None if grid_from is None
                              else [grid_from], percdamp=percdamp, block=block,
                              act_order=act_order)[0]


@torch.no_grad()
def gptq_quantize_many(ws: list[torch.Tensor], hs: list[torch.Tensor], scheme: QuantScheme, *,
                       grid_from: list[torch.Tensor] | None = None, percdamp: float = PERCDAMP,
                       block: int = BLOCK, act_order: bool = False) -> list:
    """`gptq_quantize` of several linears of one shape at once (each with its own H, grid and
    order): the column loop runs once for all of them, its per-column ops batched. Rows are
    independent under GPTQ, so this is the same algorithm; it exists for speed, because the
    loop is ~10 small ops per column and, one linear at a time, their dispatch is most of the
    time (SmolLM2-135M: 30 layers' w_down, K 1536, in one loop instead of thirty)."""
    srcs = ws if grid_from is None else grid_from
    for w, src, h in zip(ws, srcs, hs, strict=True):
        if src.shape != w.shape or h.shape != (w.shape[1], w.shape[1]) or \
                w.shape != ws[0].shape:
            raise ValueError(f"shapes do not match: w {tuple(w.shape)}, grid_from "
                             f"{tuple(src.shape)}, H {tuple(h.shape)}, first w "
                             f"{tuple(ws[0].shape)}")
    grids = [quantize_weight(src.detach().float(), scheme) for src in srcs]  # RTN's parameters
    device = ws[0].device
    with _cpu_threads(1) if device.type == "cpu" and len(ws) == 1 else contextlib.nullcontext():
        h = torch.stack([x.to(device) for x in hs])  # [L, K, K]
        k = h.shape[-1]
        orders = (torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True,
                                stable=True) if act_order
                  else torch.arange(k, device=device).expand(len(ws), k))
        rev = orders.flip(-1)  # J H[order][:, order] J in one indexing copy
        layer = torch.arange(len(ws), device=device)[:, None, None]
        h = h[layer, rev[:, :, None], rev[:, None, :]]
        u, dead = inverse_hessian_factor(h, percdamp, reversed_input=True)
        w = torch.stack([torch.gather(x.detach().float(), 1, o.expand(x.shape[0], -1))
                         for x, o in zip(ws, orders)])  # [L, N, K], columns in order
        w.masked_fill_(dead[:, None, :], 0.0)  # never seen: 0 is on every grid, no error
        codes = _columns(w, u, _Rounder(grids, orders), block)  # [L, K, N]
        out = torch.empty_like(codes)
        out.scatter_(1, orders[:, :, None].expand_as(codes), codes)
    return [dataclasses.replace(g, q=c.T.to(g.q.dtype)) for g, c in zip(grids, out)]


def _columns(w: torch.Tensor, u: torch.Tensor, rnd: _Rounder, block: int) -> torch.Tensor:
    """The GPTQ loop (module docstring) over w [L, N, K] (updated in place) with U [L, K, K]:
    the codes, transposed [L, K, N]. Column j of w is rounded j-th (`rnd`'s column j)."""
    nl, n, k = w.shape
    codes = torch.empty(nl, k, n, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, :, b0:b1].transpose(1, 2).contiguous()  # [L, B, N]: a column per row
        ub = u[:, b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for i in range(b1 - b0):
            codes[:, b0 + i], v = rnd(wb[:, i], b0 + i)
            torch.div(wb[:, i] - v, ub[:, i, i, None], out=err[:, i])
            # rank-1 update of the block: wb[:, i+1:] -= ub[:, i, i+1:] (x) err[:, i]
            wb[:, i + 1:].addcmul_(ub[:, i, i + 1:, None], err[:, i, None, :], value=-1)
        w[:, :, b1:].baddbmm_(err.transpose(1, 2), u[:, b0:b1, b1:], alpha=-1)  # lazily
    return codes


@contextlib.contextmanager
def _cpu_threads(n: int):
    """GPTQ runs single-threaded on CPU. Its column loop is ~10 small ops per column (vectors
    of N <= a few thousand), for which forking threads costs more than the work, and on a
    busy 2-core machine spinning OpenMP threads made the loop and the Cholesky factorizations
    20-40x slower (SmolLM2-135M's w_down [576, 1536]: 1.0 s with one thread, 38 s with two
    while another process ran)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): with H = 2 X^T X / n, twice the mean squared output error of
    the linear over the calibration tokens (float32 GEMM: a report, not a decision)."""
    d = (w.float() - wq.float()).to(h.device)
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


@torch.no_grad()
def gptq_weights(cfg, weights: dict[str, torch.Tensor], stats: CalibStats, scheme: QuantScheme,
                 grid_weights: dict[str, torch.Tensor] | None = None, *,
                 percdamp: float = PERCDAMP, act_order: bool = False,
                 progress: bool = False) -> tuple[dict, dict, dict]:
    """GPTQ every decoder linear (the LM head keeps its own rounding, like `clip`).

    weights: the float weights to approximate (canonical names); grid_weights: the weights
    whose RTN grid is used (the clipped ones; default `weights`). Returns (integer weights
    {name: W8Weights | ...}, their dequantized float weights {name: [N, K]} in the weights'
    dtype, report). The report has, per linear, the output error of GPTQ relative to RTN on
    the same grid, tr(dW H dW^T) of each against `weights` (Hessian of all calibration
    tokens), and its mean."""
    grid_weights = weights if grid_weights is None else grid_weights
    names = [f"layers.{i}.{lin}" for i in range(cfg.num_layers) for lin in LINEARS]
    quantized, floats, ratio, t0 = {}, {}, {}, time.perf_counter()
    # one batched GPTQ per linear kind (every layer's have one shape), in chunks that bound
    # the batch's memory (float32 H and factors of [K, K] and the [N, K] weights, per linear)
    bar = tqdm(total=len(names), desc="gptq", disable=not progress, unit="linear")
    for lin in LINEARS:
        group = [n for n in names if n.endswith(f".{lin}")]
        n_, k_ = weights[group[0]].shape
        chunk = max(1, int(GPTQ_BATCH_BYTES // (12 * k_ * k_ + 8 * n_ * k_)))
        for c0 in range(0, len(group), chunk):
            part = group[c0:c0 + chunk]
            hs = [stats.hessian(name) for name in part]
            qws = gptq_quantize_many([weights[name] for name in part], hs, scheme,
                                     grid_from=[grid_weights[name] for name in part],
                                     percdamp=percdamp, act_order=act_order)
            for name, h, qw in zip(part, hs, qws):
                w, wg, wq, h = weights[name], grid_weights[name], dequantize(qw), h.float()
                e_rtn = output_error(w, fake_quant_weight(wg, scheme), h)
                ratio[name] = round(output_error(w, wq, h) / e_rtn, 4) if e_rtn > 0 else 1.0
                quantized[name], floats[name] = qw, wq.to(w.dtype)
            bar.update(len(part))
    bar.close()
    report = {"error_vs_rtn": ratio,
              "mean_error_reduction": round(1 - sum(ratio.values()) / len(ratio), 4),
              "hessian_tokens": max(stats.tokens.values(), default=0),
              "percdamp": percdamp, "act_order": act_order,
              "seconds": round(time.perf_counter() - t0, 1)}
    return quantized, floats, report
