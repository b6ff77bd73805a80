"""Mixed precision for the W4A8 family (`--int8-linears F`): keep the decoder linears where 4
bits cost the most at 8 bits (W8A8: per-channel int8 weights, the same per-token int8
activations, so the fused RMSNorm / SwiGLU quantizers serve both), up to the share F of the
decoder linears' weights.

Why: on SmolLM2-135M the QoQ recipe's per-channel W4A8 loses +25% perplexity on held-out
READMEs and no calibration text, dampening, clipping objective or step ablation moved that
beyond a point (bench/results/accuracy-heldout-2026-12-07.md); with float activations and a
16-bit cache the 4-bit weights alone cost READMEs +12.3% (pydoc, the calibration's text,
+3.1%). Both GEMM kinds exist on every target, so a graph can mix them per linear
(`swap_gemm`'s `linear_schemes`); the price is bytes: a linear kept at 8 bits reads twice the
weight bytes in a memory-bound decode step.

Which linears: those whose final 4-bit weights (after rotation, smoothing, clipping and GPTQ)
add the most squared output error on the calibration text, tr(dW H dW^T) with GPTQ's Hessian
H = 2 X^T X / n (no extra forward pass), while the kept weights fit the share. On SmolLM2
(KV4, pydoc calibration; bench/results/accuracy-int8-linears-2026-12-07.md) this absolute
error beat the error relative to the layer's output, tr(dW H dW^T) / tr(W H W^T): at 10% of
the weights, held-out READMEs +21.2% against +23.6% (all 4-bit: +26.0%). Neither predicts a
linear's measured cost well: restoring each linear alone to float and scoring the loss
(1,024 tokens), the absolute error's rank correlation with the gain on READMEs was 0.22, the
relative error's -0.01, and the gain measured on the calibration text itself only 0.18: a
4-bit linear's cost here is small, spread over all 120 and depends on the text.
"""
from __future__ import annotations

import torch

from .gptq import LINEARS, output_error


def linear_costs(cfg, weights: dict[str, torch.Tensor], quantized_floats: dict[str, torch.Tensor],
                 stats) -> dict[str, float]:
    """{linear: tr(dW H dW^T)} of every decoder linear: dW the difference of its float weights
    and the 4-bit ones (dequantized) the compile will pack."""
    costs = {}
    for i in range(cfg.num_layers):
        for lin in LINEARS:
            name = f"layers.{i}.{lin}"
            h = stats.hessian(name)
            w = weights[name]
            costs[name] = output_error(w, quantized_floats[name], h)
    return costs


def choose_int8(costs: dict[str, float], sizes: dict[str, int], share: float) -> list[str]:
    """The linears kept at 8 bits: by decreasing cost while the kept weights (`sizes`) stay
    within `share` of all of them; a linear that does not fit is passed over for smaller
    ones. Sorted names."""
    budget, kept, used = share * sum(sizes.values()), [], 0
    for name in sorted(costs, key=costs.get, reverse=True):
        if used + sizes[name] <= budget:
            kept.append(name)
            used += sizes[name]
    return sorted(kept)
