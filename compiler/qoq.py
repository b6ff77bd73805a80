"""QoQ (QServe): the weight transforms that make W4A8KV4 accurate, run before rounding.

Order: rotate (fold norms, randomized Hadamard on the residual stream and per head on v/o),
SmoothAttention (key outliers into the queries), smoothing of the o_proj / down_proj inputs
(alpha searched per layer), channel reordering (group schemes), clipping (ratio searched per
layer). Statistics come from calibration text run through the float graph, recollected after
the steps that change what a later step measures. Every step keeps the float model's outputs
(but clipping, which is part of the rounding). The compiler then quantizes the transformed
weights by round-to-nearest exactly as without QoQ.
"""
from __future__ import annotations

import time

import torch

from qcompile.models.decoder import Decoder
from qcompile.passes.base import Lowering, run_pass
from qcompile.passes.canonicalize import canonicalize

from .calibrate import calibrate, calibration_sequences, canonical_name
from .capture import KVSpec, capture
from .config import CompileConfig


class _FloatGraph:
    """One float32 capture of the decoder; its weights are swapped for each calibration."""

    def __init__(self, cfg, weights, device):
        dec = Decoder(cfg, weights, torch.float32).to(device)
        self.low = Lowering.from_exported(capture(dec, KVSpec.of(cfg, "fp16", 16, torch.float32)))
        run_pass(canonicalize, self.low)

    def stats(self, weights, seqs, progress):
        for ph, path in self.low.origin.items():
            name = canonical_name(path)
            if name in weights:
                self.low.weights[ph] = weights[name].to(self.low.weights[ph])
        return calibrate(self.low, seqs, progress=progress)


def apply_qoq(ckpt, ccfg: CompileConfig, progress: bool = True) -> tuple[dict, dict]:
    """Transformed float32 weights (canonical names, head untied) and a report of the
    choices made, for the manifest and the ablation table."""
    from .clip import clip_weights
    from .reorder import reorder_channels
    from .rotate import rotate
    from .smooth import smooth_attention, smooth_linear
    t0, cfg, steps, scheme = time.perf_counter(), ckpt.config, ccfg.steps, ccfg.scheme
    w = {k: v.float() for k, v in ckpt.weights.items()}
    w.setdefault("lm_head", w["embed"].clone())  # untied: rotation moves them differently
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seqs = calibration_sequences(ckpt.tokenizer, ccfg.calib_samples, ccfg.calib_seq_len,
                                 ccfg.calib_text)
    graph, report = _FloatGraph(cfg, w, device), {"steps": list(steps)}
    if "rotate" in steps:
        w = rotate(cfg, w)
    if {"smooth_attention", "smooth"} & set(steps):
        st = graph.stats(w, seqs, progress)
        if "smooth_attention" in steps:
            w = smooth_attention(cfg, w, st.key_absmax)
        if "smooth" in steps:
            w, report["smooth_alpha"] = smooth_linear(cfg, w, st, scheme)
    if "reorder" in steps and scheme.group_size:
        w, _ = reorder_channels(cfg, w, graph.stats(w, seqs, progress))
    if "clip" in steps:
        w, report["clip_ratio"] = clip_weights(cfg, w, graph.stats(w, seqs, progress), scheme)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return {k: v.cpu() for k, v in w.items()}, report
