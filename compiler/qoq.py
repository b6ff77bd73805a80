"""QoQ (QServe): the weight transforms that make W4A8KV4 accurate, run before rounding.

Order: rotate (fold norms, randomized Hadamard on the residual stream and per head on v/o),
SmoothAttention (key outliers into the queries), SmoothQuant's smoothing of the q/k/v and
gate/up inputs into the RMSNorm gains (`smoothquant`, the W8A8 baseline, not in the default
steps), smoothing of the o_proj / down_proj inputs (alpha searched per layer), channel
reordering (group schemes), clipping (ratio searched per layer), and GPTQ (codes chosen with
error feedback on the grid clipping defined).
The default steps (`CompileConfig.qoq_steps`) leave SmoothAttention out: since `--kv int4`
rotates keys and queries per head by a Hadamard matrix, it raises KV4 perplexity on SmolLM2
(w4a8 16.81 -> 17.18, g128 16.75 -> 17.16, g64 16.26 -> 16.53 when added; bench/accuracy.py).
Statistics come from calibration text run through the float graph, recollected after the
steps that change what a later step measures. Every step keeps the float model's outputs
(but clipping and GPTQ, which are part of the rounding). The compiler then quantizes the
transformed weights by round-to-nearest exactly as without QoQ, except the linears GPTQ
rounded: their integer weights are handed to the compiler as they are (`swap_gemm`'s
`quantized`), since RTN of their dequantized values would recompute the scales and need not
give the same codes back.

GPTQ is not sequential: its Hessians come from the same calibration pass as clipping's samples,
through the float model after the earlier steps (rotated, smoothed, reordered, unclipped), not
through the already-quantized earlier layers as in the paper's sequential mode. It costs one
K x K GEMM per linear input per batch in that pass plus the GPTQ loop itself: on SmolLM2-135M
(32 x 512 calibration tokens, one CPU thread) the pass takes 88 s instead of 54 s and GPTQ 17 s
for its 120 linears; the whole w4a8 compile with every step goes from 167 s to 218 s. The
default `qcompile smollm2 --quantizer qoq` (gptq included, OMP_NUM_THREADS=1, 2-core machine
shared at load ~2) measured 251 s (manifest), 276 s wall with loading and kernel build; without
smooth_attention (the default since 9cfc422), 224 s (QoQ 199 s), 245 s wall. With GPTQ
act-order and the key centering (5e84d37; the means come from the clip/GPTQ calibration, no
extra pass): 245 s (QoQ 211 s), 269 s wall, beside another checkout's pip install and pytest.

`--kv int4` centers keys (passes/center_keys.py) by the mean post-RoPE key of the float model;
`apply_qoq` returns the means its last calibration measured when no step after it changes
keys (SmoothAttention does; then the compiler runs a keys-only calibration).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .calibrate import FloatGraph, calibration_sequences
from .config import CompileConfig


def apply_qoq(ckpt, ccfg: CompileConfig, progress: bool = True
              ) -> tuple[dict, dict, torch.Tensor | None, dict]:
    """(weights, quantized, key_mean, report): transformed float32 weights (canonical names,
    head untied; the GPTQ-rounded linears hold their dequantized values), the integer weights
    GPTQ chose ({canonical name: W4Weights | ...}; empty without the `gptq` step), which the
    compiler must pack as they are, the mean post-RoPE key [L, Hkv * D] of the transformed
    float model when a calibration after the last step that changes keys (SmoothAttention)
    measured it (else None: `--kv int4`'s key centering calibrates on its own), and a report
    of the choices made, for the manifest and the ablation table."""
    from .clip import clip_weights
    from .gptq import gptq_weights
    from .reorder import reorder_channels
    from .rotate import rotate
    from .smooth import smooth_attention, smooth_linear, smooth_norm_inputs
    t0, cfg, steps, scheme = time.perf_counter(), ckpt.config, ccfg.steps, ccfg.scheme
    w = {k: v.float() for k, v in ckpt.weights.items()}
    w.setdefault("lm_head", w["embed"].clone())  # untied: rotation moves them differently
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seqs = calibration_sequences(ckpt.tokenizer, ccfg.calib_samples, ccfg.calib_seq_len,
                                 ccfg.calib_text)
    graph, report, keys = FloatGraph(cfg, w, device), {"steps": list(steps)}, None
    if "rotate" in steps:
        w = rotate(cfg, w)
    if {"smooth_attention", "smoothquant", "smooth"} & set(steps):
        # one calibration: no step below changes an input or key another one measures
        st = graph.stats(w, seqs, progress)
        if "smooth_attention" in steps:
            w = smooth_attention(cfg, w, st.key_absmax)
        else:  # the other steps keep every key (rotate, smoothing: exact in float)
            keys = st.key_mean
        if "smoothquant" in steps:
            w, report["smoothquant_alpha"] = smooth_norm_inputs(cfg, w, st, scheme)
        if "smooth" in steps:
            w, report["smooth_alpha"] = smooth_linear(cfg, w, st, scheme)
    if "reorder" in steps and scheme.group_size:
        st = graph.stats(w, seqs, progress)
        keys = st.key_mean
        w, perms = reorder_channels(cfg, w, st, scheme)
        report["reordered"] = sorted(perms)  # the others' order lost on calibration error
    quantized, gptq = {}, "gptq" in steps
    if "clip" in steps or gptq:
        st = graph.stats(w, seqs, progress, hessian=gptq)
        keys, clipped = st.key_mean, w
        if "clip" in steps:
            clipped, report["clip_ratio"] = clip_weights(cfg, w, st, scheme)
        if gptq:  # the unclipped weights are the target; the clipped ones define the grid
            quantized, floats, report["gptq"] = gptq_weights(
                cfg, w, st, scheme, clipped, act_order=ccfg.gptq_order == "act",
                progress=progress)
            clipped = {**clipped, **floats}
        w = clipped
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return ({k: v.cpu() for k, v in w.items()},
            {k: _to_cpu(q) for k, q in quantized.items()}, keys, report)


def _to_cpu(qw):
    return dataclasses.replace(qw, **{f.name: getattr(qw, f.name).cpu()
                                      for f in dataclasses.fields(qw)
                                      if torch.is_tensor(getattr(qw, f.name))})
