"""Mixed precision for the W4A8 family (`--int8-linears F`): keep the decoder linears where 4
bits cost the most at 8 bits (W8A8: per-channel int8 weights, the same per-token int8
activations, so the fused RMSNorm / SwiGLU quantizers serve both), up to the share F of the
decoder linears' weights.

Why: on SmolLM2-135M the QoQ recipe's per-channel W4A8 loses +25% perplexity on held-out
READMEs and no calibration text, dampening, clipping objective or step ablation moved that
beyond a point (bench/results/accuracy-heldout-2026-12-07.md): the loss is in the 4-bit
weights themselves. A few linears carry most of it, and both GEMM kinds exist on every target,
so a graph can mix them per linear (`swap_gemm`'s `linear_schemes`); the cost is bytes: a
linear kept at 8 bits reads twice the weight bytes in a memory-bound decode step.

Which linears: the cost of each linear's final 4-bit weights (after rotation, smoothing,
clipping and GPTQ) is measured on the calibration text, as the layer's output error relative
to its output, tr(dW H dW^T) / tr(W H W^T) with GPTQ's Hessian H = 2 X^T X / n (no extra
forward pass). The linears are taken in decreasing order of that error per weight byte saved
until the share is spent.
"""
from __future__ import annotations

import torch

from .gptq import LINEARS, output_error


def linear_costs(cfg, weights: dict[str, torch.Tensor], quantized_floats: dict[str, torch.Tensor],
                 stats) -> dict[str, float]:
    """{linear: tr(dW H dW^T) / tr(W H W^T)} of every decoder linear: dW the difference of its
    float weights and the 4-bit ones (dequantized) the compile will pack."""
    costs = {}
    for i in range(cfg.num_layers):
        for lin in LINEARS:
            name = f"layers.{i}.{lin}"
            h = stats.hessian(name)
            w = weights[name]
            costs[name] = output_error(w, quantized_floats[name], h) / max(
                output_error(w, torch.zeros_like(w), h), 1e-30)
    return costs


def choose_int8(costs: dict[str, float], sizes: dict[str, int], share: float) -> list[str]:
    """The linears kept at 8 bits: by decreasing cost (relative output error; each linear's
    share of the bytes is its share of the weights, so this is also cost per byte up to the
    layer's size), while the kept weights stay within `share` of all of them. Sorted names."""
    budget, kept, used = share * sum(sizes.values()), [], 0
    for name in sorted(costs, key=costs.get, reverse=True):
        if used + sizes[name] <= budget:
            kept.append(name)
            used += sizes[name]
    return sorted(kept)
