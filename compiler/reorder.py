"""QoQ channel reordering for group quantization: salient input channels share groups.

Group quantization gives every `group_size` consecutive input channels of a weight row their
own scale. Sorting the input channels of a linear by activation salience (calibration absmax,
descending) puts the channels that carry large activations into the same groups, so their
weights do not share a scale with the many ordinary ones (QServe).

A permutation of a linear's input channels is a permutation of its producer's output channels,
so the float model is unchanged when both are applied:

* down_proj input (intermediate channels): perm = argsort(absmax of the `w_down` input,
  descending). Applied to the gate rows and the up rows of `w_gate_up` (the same perm to both
  halves: SiLU(gate) * up is channel-wise) and to the columns of `w_down`.
* o_proj input (attention output channels): the channels of a query head come from the v rows
  of its kv head, and attention mixes tokens, not channels, so they may be permuted within
  each head's D channels, the same perm for every query head of one kv head (GQA). The
  salience of channel d of kv head j is the max over its query heads h of absmax_wo[h*D + d];
  perm_j = argsort(descending). Applied to the v rows (and v bias) of `wqkv` and to the columns
  of `wo`. The per-(token, head) KV4 quantization of v only sees a head's min/max, which a
  permutation within the head keeps. This only changes group membership where
  `group_size < head_dim` (e.g. g64 with head_dim 128); for head_dim 64 and g64/g128 every
  group is already one or two whole heads.
* Residual-stream channels are left alone: permuting them is an orthogonal transform of the
  stream and belongs with the rotation.

Kept only where it helps. Clustering the salient channels also puts the few massive ones of a
layer into one group; when their weights in a row have opposite signs the group's
(zero-including) range, and so the UINT4 step of exactly the channels with the largest
activations, grows by up to 2x. Measured on SmolLM2-135M-Instruct W4A8 g128 after
smooth_attention + smooth (quantized output error of each w_down on 512 calibration rows,
reordered / natural order): most layers 0.97..1.06, but layers 2, 9, 11, 28, 29 1.4, 1.4, 3.7,
4.1, 1.7 (mean 1.25); ordering by act absmax x weight absmax or x weight norm, or by weight
absmax, does the same (mean 1.27, 1.25, 1.25); ascending and descending give the same groups
when g divides K. Perplexity (KV4, no clipping) went 22.46 -> 24.54 with reordering. So with a
`scheme`, a linear is reordered only if that lowers its quantized output error on the
calibration rows (`quantized_output_error`, as smoothing's search), else left alone: then
(KV4 with its key rotation) smooth_attention + smooth 21.55 -> + reorder 21.50 (5 of 30
w_down reordered); the whole g128 recipe with clip and gptq 17.32 without reorder, 17.16 with.

`perms[name]` is keyed by the consumer linear (`layers.{i}.w_down`, `layers.{i}.wo`): new input
channel c of that linear is old channel perm[c]. `permute_stats` applies the perms to
calibration statistics collected before the reordering.
"""
from __future__ import annotations

import dataclasses

import torch

from .calibrate import CalibStats
from .config import QuantScheme
from .smooth import quantized_output_error


def _desc(a: torch.Tensor) -> torch.Tensor:
    return torch.argsort(a, dim=-1, descending=True, stable=True)


def head_perm(cfg, absmax_wo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm of the o_proj input [Hq * D], perm of the v rows [Hkv * D]) sorting the channels
    of every head by salience, tied across the query heads of a kv head."""
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    grp = cfg.num_heads // hkv
    sal = absmax_wo.float().reshape(hkv, grp, d).amax(dim=1)        # [Hkv, D]
    p = _desc(sal)                                                 # [Hkv, D], within head
    v_perm = (p + torch.arange(hkv)[:, None] * d).reshape(-1)
    heads = torch.arange(cfg.num_heads)
    o_perm = (p[heads // grp] + heads[:, None] * d).reshape(-1)    # q head h reads kv h // G
    return o_perm, v_perm


@torch.no_grad()
def reorder_channels(cfg, weights: dict[str, torch.Tensor], stats: CalibStats,
                     scheme: QuantScheme | None = None, *, heads: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Permute the down_proj input channels (and, with `heads`, the o_proj input channels
    within each head) of every layer by salience; with a `scheme`, only those of the linears
    whose quantized output error on `stats.samples` the permutation lowers. Returns (weights,
    perms): a new dict (tensors not touched are shared with the input) and the perm of each
    reordered linear's input."""
    out, perms = dict(weights), {}
    i_sz, q_sz, kv_sz = cfg.intermediate_size, cfg.q_size, cfg.kv_size

    def helps(name, perm):
        if scheme is None:
            return True
        w, x = weights[name], stats.samples[name]
        ones = torch.ones(w.shape[1])
        return (quantized_output_error(x[:, perm.to(x.device)], w[:, perm.to(w.device)], ones,
                                       scheme) < quantized_output_error(x, w, ones, scheme))

    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        perm = _desc(stats.absmax[pre + "w_down"].float().cpu())
        if helps(pre + "w_down", perm):
            gu, down = weights[pre + "w_gate_up"], weights[pre + "w_down"]
            p = perm.to(gu.device)
            out[pre + "w_gate_up"] = torch.cat([gu[:i_sz][p], gu[i_sz:][p]])
            out[pre + "w_down"] = down[:, perm.to(down.device)]
            perms[pre + "w_down"] = perm
        if not heads:
            continue
        o_perm, v_perm = head_perm(cfg, stats.absmax[pre + "wo"].cpu())
        if not helps(pre + "wo", o_perm):
            continue
        rows = torch.cat([torch.arange(q_sz + kv_sz), q_sz + kv_sz + v_perm])
        for name in ("wqkv", "bqkv"):
            if pre + name in weights:
                t = weights[pre + name]
                out[pre + name] = t[rows.to(t.device)]
        out[pre + "wo"] = weights[pre + "wo"][:, o_perm.to(weights[pre + "wo"].device)]
        perms[pre + "wo"] = o_perm
    return out, perms


def permute_stats(stats: CalibStats, perms: dict[str, torch.Tensor]) -> CalibStats:
    """The statistics the reordered model would give: absmax, samples and X^T X of each
    permuted linear's input, in the new channel order (keys are unchanged)."""
    new = dataclasses.replace(stats, absmax=dict(stats.absmax), samples=dict(stats.samples),
                              xtx=dict(stats.xtx))
    for name, perm in perms.items():
        if name in new.absmax:
            new.absmax[name] = new.absmax[name][perm.to(new.absmax[name].device)]
        if name in new.samples:
            new.samples[name] = new.samples[name][:, perm.to(new.samples[name].device)]
        if name in new.xtx:
            p = perm.to(new.xtx[name].device)
            new.xtx[name] = new.xtx[name][p][:, p]
    return new
