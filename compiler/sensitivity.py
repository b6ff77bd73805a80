"""Mixed precision for the W4A8 family (`--int8-linears F`): keep the decoder linears where 4
bits cost the most at 8 bits (W8A8: per-channel int8 weights, the same per-token int8
activations, so the fused RMSNorm / SwiGLU quantizers serve both), up to the share F of the
decoder linears' weights.

Why: on SmolLM2-135M the QoQ recipe's per-channel W4A8 loses +26% perplexity on held-out
READMEs and no calibration text, dampening, clipping objective or step ablation moved that
beyond a point (bench/results/accuracy-heldout-2026-12-07.md); the 4-bit weights alone cost
+20.4% of it (float activations, 16-bit cache; int8 activations add under a point). Both
GEMM kinds exist on every target, so a graph can mix them per linear (`swap_gemm`'s
`linear_schemes`); the price is bytes: a linear kept at 8 bits reads twice the weight bytes
in a memory-bound decode step.

Which linears: those whose 4-bit weights (after rotation, smoothing, clipping and GPTQ) cost
the calibration text's next-token loss the most per weight, to first order: <dL/dW, W4 - W>
at the 4-bit model, every linear's from one backward pass per batch (`loss_costs`, SEQUENCES
calibration sequences), while the kept weights fit the share. On SmolLM2 this estimate ranks
the linears as leave-one-in does (restoring each alone to float and scoring the loss: rank
correlation 0.90 on pydoc and on READMEs, 1,024 tokens each), where the layer-local measures
do not (the added output error tr(dW H dW^T) 0.22 against READMEs' leave-one-in gains, the
same relative to the output -0.01). Per-channel KV4, pydoc calibration, held-out READMEs /
prose (bench/results/accuracy-int8-linears-2026-12-07.md): all 4-bit +26.0% / +17.2%; 10% at
8 bits +17.7% / +14.4% (by output error: +21.2% / +14.4%); 20% +14.7% / +12.3%.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

from .calibrate import FloatGraph, _prefill_inputs, causal_attention
from .gptq import LINEARS

SEQUENCES = 8  # calibration sequences of the ranking (~25 s of SmolLM2's compile, 2 cores)


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


class _DifferentiableKV(TorchFunctionMode):
    """The float decoder's fp16 KV ops as differentiable float ops, for a prefill over empty
    caches: the encode keeps k and v as they are (its records are an integer view, which
    carries no gradient) and the attention is calibration's causal SDPA per sequence."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is KV_ENCODE_OPS["fp16"]:
            return torch.stack(args[:2])  # [2, T, Hkv, D]
        if func is ATTENTION_OPS["fp16"]:
            q, kv, _, _, _, query_start, _, scale = args
            return causal_attention(q, kv[0], kv[1], query_start, scale)
        return func(*args, **(kwargs or {}))


def loss_costs(cfg, weights4: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], seqs,
               batch: int = 2, progress: bool = False) -> dict[str, float]:
    """{linear: the next-token loss its 4-bit weights cost, to first order}: <dL/dW, W4 - W>
    at the 4-bit model `weights4` (the float model `weights` for the rest), over `seqs`; the
    gain of restoring that linear alone to float, estimated for every linear from one backward
    pass per batch instead of a forward per linear."""
    from qcompile.models.decoder import Decoder
    names = [f"layers.{i}.{lin}" for i in range(cfg.num_layers) for lin in LINEARS]
    w = {k: v.detach().float().clone() for k, v in {**weights, **weights4}.items()}
    for name in names:
        w[name].requires_grad_(True)
    kv_shape = FloatGraph(cfg).kv_shape
    dec, count = Decoder(cfg, w, torch.float32), sum(len(s) - 1 for s in seqs)
    bar = tqdm(range(0, len(seqs), batch), desc="int8-linears", unit="batch",
               disable=not progress)
    for i in bar:
        part = seqs[i:i + batch]
        args = list(_prefill_inputs(kv_shape, part, "cpu"))
        args[-1] = torch.arange(sum(len(s) for s in part))  # every token's logits
        with torch.enable_grad(), _DifferentiableKV():
            logits, _ = dec(*args)
            ids, lo, nll = args[0], 0, 0.0
            for s in part:
                nll = nll + F.cross_entropy(logits[lo:lo + len(s) - 1],
                                            ids[lo + 1:lo + len(s)], reduction="sum")
                lo += len(s)
            (nll / count).backward()
    return {n: float((w[n].grad * (w[n].detach() - weights[n].float())).sum()) for n in names}
