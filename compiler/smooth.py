"""QoQ smoothing: SmoothAttention for the keys, smoothing of the o_proj / down_proj inputs, and
SmoothQuant's smoothing of the RMSNorm-fed q/k/v and gate/up inputs.

All steps rescale a channel of an intermediate value and undo the scale in the next linear,
so the float model computes the same function while the quantized operand gets milder
outliers. They work on canonical weights (models/decoder.py names) and return a new dict; the
input dict and its tensors are never modified. Math is float32; each tensor keeps its dtype.

* `smooth_attention`: K is what the KV cache stores in 4 bits. Per layer, kv head and key
  channel i, lambda_i = max|K_i| ** alpha, tied across the RoPE pair (i, i + D/2) (the max of
  the pair is raised to the power), clamped to >= 1e-5. The k rows (and bias) of W_qkv are
  divided by lambda and the q rows (and bias) of every query head using that kv head are
  multiplied by it. RoPE rotates only within a pair, so a pair-uniform scale commutes with it
  and q . k is unchanged.

* `smooth_linear`: the inputs of `wo` and `w_down` are outputs of other linears, so a
  per-channel scale s can be moved into the producer: X <- X / s, W <- W diag(s).
  - `w_down`: producer is `up` (silu(gate) * up is linear in up): up rows / s.
  - `wo`: producer is `v` (attention output is a convex combination of V rows, per head):
    v rows (and bias) / s. s is per (kv head, channel) and shared by the query heads of
    that kv head (GQA); the activation and weight statistics of the o_proj input are taken
    as the max over those query heads.
  s_j = max|X_j| ** a / max|W_:,j| ** (1 - a), clamped to [1e-5, 1e5]. The migration
  strength a is searched per layer and per linear over a grid: the one minimizing the
  squared output error of the fake-quantized linear on the calibration samples,
  || X W^T - Q_a(X / s) Q_w(W diag(s))^T ||_F^2, Q_a per-token INT8 (`quant_a8_ref`; the
  identity for weight-only schemes, which makes this AWQ's activation-aware scale search),
  Q_w round-to-nearest of the scheme (`quantize_weight` + `dequantize`). Ties go to the
  smaller a.

* `smooth_norm_inputs` (SmoothQuant, the W8A8 baseline's step `smoothquant`): the inputs of
  `wqkv` and `w_gate_up` are RMSNorm outputs x_hat * g, so the scale goes into the gain:
  g <- g / s, W <- W diag(s). One s per norm serves every linear it feeds (q, k and v are one
  fused `wqkv`, gate and up one `w_gate_up`), so max |W_:,j| is over all their rows. After
  `rotate` the gains are ones and become 1 / s. a is fixed, `SMOOTHQUANT_ALPHAS` = (0.8,)
  (no smoothing stays a candidate per linear): on SmolLM2-135M W8A8 KV16 (24 x 512 pydoc
  tokens, RTN 14.64) a fixed 0.5 / 0.8 / 0.85 / 0.9 gives 14.41 / 14.36 / 14.37 / 14.39, while
  searching the output error per linear over 0..1 (it picks 0.6..0.9) gives 14.40 and over
  0.5..0.95 14.41; adding `smooth` (o_proj / down_proj) to the searched run 14.40, `rotate`
  before it 14.42. SmoothQuant itself uses 0.8..0.85 for Llama.
"""
from __future__ import annotations

import torch

from qcompile.models.config import ModelConfig

from .calibrate import CalibStats
from .clip import fake_quant_act, fake_quant_weight
from .config import QuantScheme

ALPHAS = tuple(i / 10 for i in range(11))
SMOOTHQUANT_ALPHAS = (0.8,)
LAMBDA_MIN = 1e-5
SCALE_RANGE = (1e-5, 1e5)
_STAT_FLOOR = 1e-8  # keeps 0 ** a / 0 ** (1 - a) from becoming NaN; s is clamped afterwards


# ---------------------------------------------------------------------------------------------
# SmoothAttention


def attention_lambdas(cfg: ModelConfig, key_absmax: torch.Tensor, alpha: float = 0.5
                      ) -> torch.Tensor:
    """key_absmax [Hkv * D] (max |k| after RoPE) -> lambda [Hkv, D] float32, equal on the two
    channels of each RoPE pair (i, i + D/2)."""
    d = cfg.head_dim
    ka = key_absmax.detach().float().reshape(cfg.num_kv_heads, d)
    pair = torch.maximum(ka[:, : d // 2], ka[:, d // 2:])
    lam = pair.pow(alpha).clamp(min=LAMBDA_MIN)
    return torch.cat([lam, lam], dim=-1)


def smooth_attention(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                     key_absmax: list[torch.Tensor], alpha: float = 0.5
                     ) -> dict[str, torch.Tensor]:
    """Fold SmoothAttention scales into W_q (x lambda) and W_k (/ lambda), biases included."""
    if len(key_absmax) != cfg.num_layers:
        raise ValueError(f"key_absmax has {len(key_absmax)} layers, the model {cfg.num_layers}")
    group = cfg.num_heads // cfg.num_kv_heads
    kv = cfg.kv_size
    out = dict(weights)
    for i in range(cfg.num_layers):
        wname, bname = f"layers.{i}.wqkv", f"layers.{i}.bqkv"
        w = weights[wname]
        lam = attention_lambdas(cfg, key_absmax[i], alpha).to(w.device)  # [Hkv, D]
        lam_k = lam.reshape(-1)                                          # [Hkv * D]
        lam_q = lam.repeat_interleave(group, dim=0).reshape(-1)          # [Hq * D]
        scale = torch.cat([lam_q, 1.0 / lam_k, torch.ones(kv, device=w.device)])
        out[wname] = (w.float() * scale[:, None]).to(w.dtype)
        if bname in weights:
            b = weights[bname]
            out[bname] = (b.float() * scale.to(b.device)).to(b.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Smoothing of the o_proj / down_proj inputs


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha), clamped to SCALE_RANGE."""
    xa = x_absmax.float().clamp(min=_STAT_FLOOR)
    wa = w_absmax.float().clamp(min=_STAT_FLOOR)
    return (xa.pow(alpha) / wa.pow(1 - alpha)).clamp(*SCALE_RANGE)


def quantized_output_error(samples: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                           scheme: QuantScheme, ref: torch.Tensor | None = None) -> float:
    """|| X W^T - Q_a(X / s) Q_w(W diag(s))^T ||_F^2 over the sample rows X [S, K]; w [N, K],
    s [K]. s = 1 is the error without smoothing. ref: X W^T when the caller has it (a search
    scores many s against one reference)."""
    w = w.float()
    s = s.float().to(w.device)
    x = samples.float().to(w.device)
    ref = x @ w.T if ref is None else ref
    got = (fake_quant_act(x / s, scheme.search_act_bits)
           @ fake_quant_weight(w * s[None, :], scheme).T)
    return float((ref - got).pow_(2).sum(dtype=torch.float64))


def search_alpha(x_absmax: torch.Tensor, w: torch.Tensor, samples: torch.Tensor,
                 scheme: QuantScheme, alphas=ALPHAS, *, w_absmax: torch.Tensor | None = None,
                 expand=None) -> tuple[float | None, torch.Tensor, dict]:
    """Grid search of the migration strength for one linear w [N, K] with input samples
    [S, K]. x_absmax / w_absmax are the statistics the scales are computed from (default
    w_absmax: max |w| per input channel); `expand` maps those scales to the K input channels
    (for tied scales; default identity). Returns (best alpha, its s [K], errors by alpha).
    No smoothing (s = 1, reported as alpha None) is a candidate too: with s = x^a / w^(1-a),
    no alpha of the grid means "leave it alone"."""
    if not alphas:
        raise ValueError("alphas must not be empty")
    w = w.float()
    if w_absmax is None:
        w_absmax = w.abs().amax(dim=0)
    x_absmax = x_absmax.float().to(w.device)
    ones = torch.ones_like(x_absmax)
    best, best_s = None, ones
    ref = samples.float().to(w.device) @ w.T
    best_err = quantized_output_error(samples, w, expand(ones) if expand is not None else ones,
                                      scheme, ref)
    errors = {None: best_err}
    for a in alphas:
        s = smooth_scales(x_absmax, w_absmax, a)
        s_full = expand(s) if expand is not None else s
        err = quantized_output_error(samples, w, s_full, scheme, ref)
        errors[float(a)] = err
        if err < best_err:
            best, best_s, best_err = float(a), s, err
    return best, best_s, errors


def _input_stats(stats: CalibStats, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in stats.samples:
        raise KeyError(f"calibration statistics have no samples of the input of {name!r}")
    samples = stats.samples[name]
    absmax = stats.absmax.get(name)
    if absmax is None:
        absmax = samples.abs().amax(dim=0)
    return absmax, samples


def _scale(t: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """t with slice j along `dim` multiplied by s[j] (float32 math, dtype kept)."""
    shape = [1] * t.dim()
    shape[dim] = -1
    return (t.float() * s.to(t.device).reshape(shape)).to(t.dtype)


def smooth_norm_inputs(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: CalibStats,
                       scheme: QuantScheme, alphas=SMOOTHQUANT_ALPHAS, *, device=None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float],
                                  dict[str, torch.Tensor]]:
    """SmoothQuant: smooth the inputs of every layer's `wqkv` and `w_gate_up` into the RMSNorm
    gain that produces them, alpha chosen per linear from `alphas` (or none) on the quantized
    output error; returns (new weights, {linear name: chosen alpha}, {linear name: s [K]}, the
    input of that linear now being X / s: `CalibStats.scaled` maps the statistics). Search on
    `device` (default: where the weights are)."""
    out: dict[str, torch.Tensor] = dict(weights)
    chosen: dict[str, float] = {}
    scales: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        for norm, lin in (("attn_norm", "wqkv"), ("mlp_norm", "w_gate_up")):
            name, gain = f"layers.{i}.{lin}", f"layers.{i}.{norm}"
            w = weights[name]
            x_absmax, samples = _input_stats(stats, name)
            chosen[name], s, _ = search_alpha(x_absmax, w.to(device or w.device), samples,
                                              scheme, alphas)
            out[name] = _scale(w, s, 1)
            out[gain] = _scale(weights[gain], 1.0 / s, 0)
            scales[name] = s
    return out, chosen, scales


def smooth_linear(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: CalibStats,
                  scheme: QuantScheme, alphas=ALPHAS, *, device=None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float],
                             dict[str, torch.Tensor]]:
    """Smooth the inputs of every layer's `wo` and `w_down`, with the migration strength
    searched per linear; returns (new weights, {linear name: chosen alpha}, {linear name:
    s [K]}, the input of that linear now being X / s). The search runs on `device` (default:
    where the weights are); the returned weights stay where they were."""
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = hq // hkv
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    out = dict(weights)
    chosen: dict[str, float] = {}
    scales: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."

        # down_proj: X = silu(gate) * up, producer rows = up (second half of w_gate_up).
        name = p + "w_down"
        w_down, w_gu = weights[name], weights[p + "w_gate_up"]
        x_absmax, samples = _input_stats(stats, name)
        a, s, _ = search_alpha(x_absmax, w_down.to(device or w_down.device), samples, scheme,
                               alphas)
        chosen[name], scales[name] = a, s
        out[name] = _scale(w_down, s, 1)
        out[p + "w_gate_up"] = _scale(w_gu, torch.cat([s.new_ones(inter), 1.0 / s]), 0)

        # o_proj: X = attention output [Hq * D], producer = v; s tied per (kv head, channel).
        name = p + "wo"
        wo = weights[name]
        x_absmax, samples = _input_stats(stats, name)
        x_kv = x_absmax.float().reshape(hkv, group, d).amax(dim=1).reshape(-1)
        w_kv = wo.float().abs().amax(dim=0).reshape(hkv, group, d).amax(dim=1).reshape(-1)

        def expand(s_kv):  # [Hkv * D] -> [Hq * D]: query head h uses kv head h // group
            return s_kv.reshape(hkv, 1, d).expand(hkv, group, d).reshape(-1)

        dev = device or wo.device
        a, s_kv, _ = search_alpha(x_kv, wo.to(dev), samples, scheme, alphas,
                                  w_absmax=w_kv.to(dev), expand=expand)
        chosen[name], scales[name] = a, expand(s_kv)
        out[name] = _scale(wo, expand(s_kv), 1)
        row = torch.cat([s_kv.new_ones(q + kv), 1.0 / s_kv])  # v rows (and bias) / s
        for t in ("wqkv", "bqkv"):
            if p + t in weights:
                out[p + t] = _scale(weights[p + t], row, 0)
    return out, chosen, scales
