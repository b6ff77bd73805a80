"""QoQ (QServe): the weight transforms that make W4A8KV4 accurate, run before rounding.

Order: rotate (fold norms, randomized Hadamard on the residual stream and per head on v/o),
SmoothAttention (key outliers into the queries), SmoothQuant's smoothing of the q/k/v and
gate/up inputs into the RMSNorm gains (`smoothquant`, the W8A8 recipe), smoothing of the
o_proj / down_proj inputs (alpha searched per layer), COMET's FMPQ permutations and 8-bit
activation blocks (`fmpq`, w4a4 only: compiler/fmpq.py), channel reordering (group schemes),
clipping (ratio searched per row), and GPTQ (codes chosen with error feedback on the grid
clipping defined), then with `--int8-linears` the linears whose 4-bit weights cost the
calibration loss the most stay at 8 bits (compiler/sensitivity.py). Which steps run is
`CompileConfig.qoq_steps` (per precision, `config.QOQ_RECIPES`); SmoothAttention is in no
recipe: with `--kv int4`'s per-head key rotation it raises KV4 perplexity (bench/accuracy.py).

One calibration. Statistics (input absmax, sampled input rows, X^T X for GPTQ, the mean and
absmax of the keys) come from ONE forward of the calibration text through the float graph,
after the rotation. Every later step keeps the float model's function by scaling channels
(smoothing: an input channel of a linear divided by s; SmoothAttention: key channel i divided
by lambda_i) or permuting them (reordering), so the statistics of the transformed model are
those of the first pass scaled or permuted (`CalibStats.scaled`, `reorder.permute_stats`),
equal to a new forward's up to float rounding (tested), with no second forward. That forward
is the bulk of QoQ's time (bench/results/qoq-speed-2026-12-06.md has the profile).

Clipping and GPTQ are the rounding; every other step is exact in float. The compiler then
quantizes the transformed weights by round-to-nearest exactly as without QoQ, except the
linears GPTQ rounded: their integer weights are handed to the compiler as they are
(`swap_gemm`'s `quantized`), since RTN of their dequantized values would recompute the scales
and need not give the same codes back.

GPTQ is not sequential: its Hessians come from the same calibration as clipping's samples,
through the float model (rotated, smoothed, reordered, unclipped), not through the
already-quantized earlier layers as in the paper's sequential mode.

`--kv int4` centers keys (passes/center_keys.py) by the mean post-RoPE key of the transformed
float model, which `apply_qoq` returns from the same calibration.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .calibrate import FloatGraph, calibration_sequences
from .config import CompileConfig

# the steps that read calibration statistics
CALIBRATED = frozenset(("smooth_attention", "smoothquant", "smooth", "reorder", "clip", "gptq"))


def apply_qoq(ckpt, ccfg: CompileConfig, progress: bool = True
              ) -> tuple[dict, dict, torch.Tensor | None, dict]:
    """(weights, quantized, key_mean, report): transformed float32 weights (canonical names,
    head untied; the GPTQ-rounded linears hold their dequantized values), the integer weights
    GPTQ chose ({canonical name: W4Weights | ...}; empty without the `gptq` step), which the
    compiler must pack as they are, the mean post-RoPE key [L, Hkv * D] of the transformed
    float model (None when no step calibrates: `--kv int4`'s key centering then calibrates on
    its own), and a report of the choices made, for the manifest and the ablation table."""
    from .clip import clip_weights
    from .gptq import gptq_weights
    t0, cfg, steps, scheme = time.perf_counter(), ckpt.config, ccfg.steps, ccfg.scheme
    w = {k: v.float() for k, v in ckpt.weights.items()}
    w.setdefault("lm_head", w["embed"].clone())  # untied: rotation moves them differently
    report, gptq = {"steps": list(steps)}, "gptq" in steps
    lap = _Laps(report)
    if "rotate" in steps:
        from .rotate import rotate
        w = rotate(cfg, w)
        lap("rotate")
    if not set(steps) & CALIBRATED:
        return _result(w, {}, None, report, t0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seqs = calibration_sequences(ckpt.tokenizer, ccfg.calib_samples, ccfg.calib_seq_len,
                                 ccfg.calib_text, ccfg.calib_source)
    st = FloatGraph(cfg, device).stats(w, seqs, progress, hessian=gptq)
    lap("calibrate")
    w, st, keys = _smooth(cfg, w, st, steps, scheme, report)
    lap("smooth")
    if "fmpq" in steps:  # w4a4: permutations and 8-bit blocks (compiler/fmpq.py)
        from .fmpq import apply_fmpq
        w, st, keys, report["fmpq"] = apply_fmpq(cfg, w, st, keys, ccfg.fmpq_int8_fraction,
                                                 ccfg.fmpq_down_rotation == "hadamard",
                                                 ccfg.fmpq_a4_clip,
                                                 ccfg.fmpq_permute == "absmax")
        lap("fmpq")
    if "reorder" in steps and scheme.group_size:
        from .reorder import permute_stats, reorder_channels
        w, perms = reorder_channels(cfg, w, st, scheme)
        st = permute_stats(st, perms)
        report["reordered"] = sorted(perms)  # the others' order lost on calibration error
        lap("reorder")
    quantized, clipped = {}, w
    if "clip" in steps:
        clipped, report["clip_ratio"] = clip_weights(cfg, w, st, scheme)
        lap("clip")
    if gptq:  # the unclipped weights are the target; the clipped ones define the grid
        quantized, floats, report["gptq"] = gptq_weights(
            cfg, w, st, scheme, clipped, act_order=ccfg.gptq_order == "act", progress=progress)
        clipped = {**clipped, **floats}
        lap("gptq")
        if ccfg.int8_linears:  # mixed precision: these stay at 8 bits (compiler/sensitivity.py)
            from .sensitivity import SEQUENCES, choose_int8, loss_costs
            costs = loss_costs(cfg, clipped, w, seqs[:SEQUENCES], progress=progress)
            sizes = {n: w[n].numel() for n in costs}
            keep = choose_int8({n: c / sizes[n] for n, c in costs.items()}, sizes,
                               ccfg.int8_linears)
            for name in keep:  # RTN at 8 bits of the transformed, unclipped float weights
                del quantized[name]
                clipped[name] = w[name]
            report["int8_linears"] = keep
            report["int4_loss"] = costs
            lap("int8_linears")
    return _result(clipped, quantized, keys, report, t0)


class _Laps:
    """Seconds of each QoQ phase, into report["step_seconds"] (the manifest's profile)."""

    def __init__(self, report: dict):
        self.t, self.laps = time.perf_counter(), report.setdefault("step_seconds", {})

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = round(now - self.t, 1), now


def _smooth(cfg, w, st, steps, scheme, report):
    """SmoothAttention, SmoothQuant and smoothing on the one calibration `st`: (weights, the
    statistics of the smoothed model, its mean key). Each scales channels exactly in float,
    so the new statistics are the old ones scaled (`CalibStats.scaled`), and the keys of
    SmoothAttention are divided by its lambdas."""
    from .smooth import attention_lambdas, smooth_attention, smooth_linear, smooth_norm_inputs
    keys = st.key_mean
    if "smooth_attention" in steps:
        w = smooth_attention(cfg, w, st.key_absmax)
        lam = torch.stack([attention_lambdas(cfg, a).reshape(-1) for a in st.key_absmax])
        keys = keys / lam
    scales = {}
    if "smoothquant" in steps:
        w, report["smoothquant_alpha"], scales = smooth_norm_inputs(cfg, w, st, scheme)
    if "smooth" in steps:  # reads only the wo / w_down inputs, which smoothquant keeps
        w, report["smooth_alpha"], more = smooth_linear(cfg, w, st, scheme)
        scales.update(more)
    return w, st.scaled(scales), keys


def _result(w, quantized, keys, report, t0):
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return ({k: v.cpu() for k, v in w.items()},
            {k: _to_cpu(q) for k, q in quantized.items()}, keys, report)


def _to_cpu(qw):
    return dataclasses.replace(qw, **{f.name: getattr(qw, f.name).cpu()
                                      for f in dataclasses.fields(qw)
                                      if torch.is_tensor(getattr(qw, f.name))})
