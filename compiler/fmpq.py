"""COMET's FMPQ, the compiler's side (issue 15): which input channels of each linear get 8-bit
activation blocks, and the channel permutations that put them first, folded into the weights.

FMPQ quantizes a linear's input per token in blocks of `block` channels: the first n8 blocks
in int8, the rest in int4 (`qcompile::quant_a4x`). Outlier channels must therefore sit
together at the front. This module chooses the order and n8 from calibration statistics and
folds the permutations into the canonical weights (`qcompile.models.loaders`), so nothing is
gathered at run time:

* the residual stream (the input of `wqkv` and `w_gate_up`): one permutation P for every layer,
  an orthogonal change of basis of the stream like QoQ's rotation, folded the same way
  (`rotate.rotate_residual(cfg, w, P)`: after QoQ's rotation R, the stream is x R P);
* the SwiGLU output (the input of `w_down`): per layer, folded into w_gate_up's gate and up
  rows and w_down's columns (`permute_intermediate`);
* the attention output (the input of `wo`): whole heads move (RoPE pairs a head's q / k
  channels, so channels stay in their head): kv heads with their groups of q heads, and q heads
  within a group, folded into the q / k / v rows of `wqkv` (and `bqkv`) and `wo`'s columns
  (`head_order`, `permute_heads`). With blocks of head_dim channels (or a multiple), this
  brings the loudest heads into the leading blocks.

How n8 is chosen (the paper fixes a fraction and does not say how): a global budget of 8-bit
blocks (`fraction` of all blocks of the chosen linears) is spent greedily on the blocks whose
int4 -> int8 switch removes the most output error on the calibration tokens, each linear's
error relative to its output's energy (`block_errors(..., weight, relative=True)`,
`allocate_blocks`). Sorted channels put the costly blocks first, so each linear's share is a
prefix: its n8. Simulated on SmolLM2 (bench/results/fmpq-sim-2026-12-07b.md), the relative
rule beats the paper's uniform fraction on the worst held-out source (25% int8 blocks: 1.324x
against 1.359x of W4A8's perplexity); absolute output error loses to both.

* the SwiGLU output again, rotated (`down_rotation`, on by default): after the permutation
  every block of w_down's input is multiplied by one randomized Hadamard matrix H of the
  block's order, at run time (the graph's `fmpq_down_rotation` weight, passes/rotate_blocks.py:
  one [T * K / block, block] x [block, block] mm a layer) since no offline rotation crosses
  the SiLU, and H is folded into w_down's columns (x B (W B)^T = x W^T with B = diag(H, H, ..)).
  The permutation gathers the loud channels into the leading blocks and H spreads what is
  left of each block's outliers over the block, so its 4-bit scale serves every channel.
  Simulated on SmolLM2 (bench/results/fmpq-sim-2026-12-08.md), worst held-out source at 25%
  int8 blocks: 1.282x W4A8's perplexity without, 1.176x with; all blocks int4: 1.608x, 1.410x.
  The block errors that spend the budget are measured on the rotated input.
* the 4-bit blocks' scales clipped (`clip`, "search" by default): per linear, the share of
  the block max that sets the int4 scale (`quant_a4x`'s clip, per mille) is chosen from
  CLIP_CANDIDATES on the calibration rows by the same weighted error that spends the budget
  (`choose_clip`): a few values saturate, the rest get finer steps. Simulated on SmolLM2 with
  the rotation, 25% int8 blocks: a fixed 0.9 takes the worst source from 1.176x to 1.133x.

Every function returns new dicts / tensors and leaves its inputs unchanged.
"""
from __future__ import annotations

import dataclasses

import torch

from qcompile.models.config import ModelConfig

from .rotate import fold_norms, rotate_residual

__all__ = ["channel_order", "block_errors", "allocate_blocks", "permutation_matrix",
           "permute_residual", "permute_intermediate", "head_order", "permute_heads",
           "model_block", "block_rotation", "rotate_blocks", "rotate_block_stats",
           "choose_clip", "apply_fmpq", "linear_args", "input_rotations"]

BLOCKS = (128, 64)  # COMET's 128 channels; 64 where a model's widths are not multiples of 128
KINDS = ("wqkv", "wo", "w_gate_up", "w_down")
DOWN_ROTATION_SEED = 1
CLIP_CANDIDATES = (1000, 950, 900, 850, 800, 750, 700)  # per mille of the 4-bit block max


def block_rotation(block: int, seed: int = DOWN_ROTATION_SEED) -> torch.Tensor:
    """H [block, block] float32, orthonormal: a randomized Hadamard matrix of the block's
    order (compiler/rotate.py), from a generator seeded with `seed`."""
    from .rotate import hadamard
    return hadamard(block, torch.Generator().manual_seed(seed)).float()


def rotate_blocks(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [..., K] with every block of h's order (consecutive channels) multiplied by h: x B
    for B = diag(h, h, ..). Rows of a weight [N, K] rotate the same way (its columns: W B).
    float32 math, x's dtype back."""
    b = h.shape[0]
    if x.shape[-1] % b:
        raise ValueError(f"rotate_blocks: K = {x.shape[-1]} is not a multiple of {b}")
    y = x.float().reshape(*x.shape[:-1], -1, b) @ h.float().to(x.device)
    return y.reshape(x.shape).to(x.dtype)


def rotate_block_stats(stats, rotations: dict[str, torch.Tensor]):
    """The statistics of the model whose linear `name` reads its input rotated in blocks by
    rotations[name] (exact from the old ones, no forward): samples x B and X^T X -> B^T X^T X B;
    absmax, which no statistic of the old input gives, becomes the samples' (a subset of the
    calibration tokens: what the later steps read is samples and X^T X)."""
    new = dataclasses.replace(stats, absmax=dict(stats.absmax), samples=dict(stats.samples),
                              xtx=dict(stats.xtx))
    for name, h in rotations.items():
        if name in new.samples:
            new.samples[name] = rotate_blocks(new.samples[name], h)
            if name in new.absmax:
                new.absmax[name] = new.samples[name].abs().amax(dim=0).to(new.absmax[name])
        if name in new.xtx:
            xtx = new.xtx[name]
            k, b = xtx.shape[0], h.shape[0]
            hd = h.to(xtx)
            left = (hd.t() @ xtx.reshape(k // b, b, k)).reshape(k, k)  # B^T X^T X
            new.xtx[name] = rotate_blocks(left, hd)                    # ... B
    return new


def channel_order(magnitude: torch.Tensor) -> torch.Tensor:
    """Channels by decreasing calibrated magnitude (e.g. max |x| over tokens): the
    permutation `perm` with x[..., perm] the reordered input (stable among ties)."""
    return torch.argsort(magnitude.float(), descending=True, stable=True)


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row fake quantization to [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    q = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / q
    return (x / s).round().clamp(-q, q) * s


def block_errors(x: torch.Tensor, block: int, weight: torch.Tensor | None = None,
                 relative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of quantizing each block of `block` channels of x [tokens, K] (channels
    already in their order) per token in int4 and in int8: two [K / block] tensors, summed over
    tokens. `weight` [N, K] (the linear's, columns in the same order): each channel's error
    scaled by its column's squared norm, the error it puts into the output when channel errors
    are uncorrelated, so that blocks of different linears compare. `relative` (with `weight`):
    divided by the output's energy sum ||x W^T||^2, so that linears compete on their relative
    output noise (a noise-to-signal ratio) rather than its absolute size."""
    t, k = x.shape
    if k % block:
        raise ValueError(f"FMPQ blocks of {block} channels do not divide K = {k}")
    xb = x.float().reshape(t, k // block, block)
    scale = 1.0 if weight is None else weight.float().pow(2).sum(0).reshape(k // block, block)
    err4 = ((_fake_quant(xb, 4) - xb).pow(2) * scale).sum(dim=(0, 2))
    err8 = ((_fake_quant(xb, 8) - xb).pow(2) * scale).sum(dim=(0, 2))
    if relative:
        if weight is None:
            raise ValueError("relative block errors need the linear's weight")
        energy = (x.float() @ weight.float().T).pow(2).sum().clamp_min(1e-30)
        err4, err8 = err4 / energy, err8 / energy
    return err4, err8


def choose_clip(x: torch.Tensor, weight: torch.Tensor, n8: int, block: int,
                candidates=CLIP_CANDIDATES) -> int:
    """The clip (per mille) of a linear's 4-bit blocks with the least output error on its
    calibration rows x [tokens, K] (channels in their order, rotated where the graph rotates
    them): each channel's squared quantization error weighted by its weight column's squared
    norm, as `block_errors` weighs blocks. The quantization is `quant_a4x_ref`'s; 1000 when
    every block is 8-bit."""
    from qcompile.runtime.ops.quant import quant_a4x_ref
    t, k = x.shape
    if n8 * block >= k:
        return 1000
    x4 = x.float()[:, n8 * block:]
    col = weight.float()[:, n8 * block:].pow(2).sum(0)
    best, best_err = 1000, None
    for clip in candidates:
        xq, s, _ = quant_a4x_ref(x4, 0, block, clip)
        deq = (xq.float().reshape(t, -1, block) * s[..., None]).reshape(t, -1)
        err = ((deq - x4).pow(2) * col).sum().item()
        if best_err is None or err < best_err:
            best, best_err = clip, err
    return best


def allocate_blocks(errors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    fraction: float) -> dict[str, int]:
    """n8 per linear from a global budget: round(fraction * all blocks) 8-bit blocks, each
    given to the block whose int4 -> int8 switch saves the most squared error (blocks of one
    linear compete with every other's). A linear's blocks are taken in order, so its n8 is the
    length of its chosen prefix: a block is chosen only once every block before it is."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction of 8-bit blocks must be in [0, 1], got {fraction}")
    total = sum(e4.numel() for e4, _ in errors.values())
    budget = round(fraction * total)
    n8 = {name: 0 for name in errors}
    gains = {name: (e4 - e8).tolist() for name, (e4, e8) in errors.items()}
    for _ in range(budget):
        # the next block of each linear is a candidate; take the costliest
        best = max((g[n8[name]], name) for name, g in gains.items() if n8[name] < len(g))
        n8[best[1]] += 1
    return n8


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """P [K, K] with x P == x[..., perm] (orthogonal: P^T = P^-1)."""
    k = perm.numel()
    p = torch.zeros(k, k)
    p[perm, torch.arange(k)] = 1.0
    return p


def permute_residual(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                     perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual stream reordered, x -> x[..., perm], in every layer at once (needs
    folded RMSNorm gains, as `rotate.rotate_residual`, which does the folding)."""
    return rotate_residual(cfg, weights, permutation_matrix(perm))


def permute_intermediate(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                         perms: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SwiGLU output of layer i reordered by perms[i] (x -> x[..., perm]): the gate and
    up rows of `w_gate_up` and the columns of `w_down`. Exact: SiLU(g) * u is elementwise."""
    out = dict(weights)
    inter = cfg.intermediate_size
    for i, perm in perms.items():
        if perm.numel() != inter or not torch.equal(perm.sort().values, torch.arange(inter)):
            raise ValueError(f"layer {i}: not a permutation of the {inter} intermediate "
                             "channels")
        rows = torch.cat([perm, perm + inter])
        gate_up = out[f"layers.{i}.w_gate_up"]
        out[f"layers.{i}.w_gate_up"] = gate_up[rows.to(gate_up.device)].clone()
        down = out[f"layers.{i}.w_down"]
        out[f"layers.{i}.w_down"] = down[:, perm.to(down.device)].clone()
    return out


def head_order(cfg: ModelConfig, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best head order the attention allows for wo's input, from its calibrated channel
    magnitudes [num_heads * head_dim]: kv groups by their loudest channel, and within each
    group its q heads likewise (all decreasing). Returns (kv_perm [num_kv_heads], q_perm
    [num_heads]); q_perm keeps each group's heads together, in kv_perm's group order."""
    group = cfg.num_heads // cfg.num_kv_heads
    per_head = magnitude.float().reshape(cfg.num_heads, cfg.head_dim).amax(dim=1)
    per_group = per_head.reshape(cfg.num_kv_heads, group).amax(dim=1)
    kv_perm = channel_order(per_group)
    q_perm = torch.cat([g * group + channel_order(per_head[g * group:(g + 1) * group])
                        for g in kv_perm.tolist()])
    return kv_perm, q_perm


def permute_heads(cfg: ModelConfig, weights: dict[str, torch.Tensor],
                  perms: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Layer i's heads reordered by perms[i] = (kv_perm, q_perm) as `head_order` returns them:
    q heads (rows of wq, columns of wo), kv heads (rows of wk and wv); q head j of the new
    order must belong to the new kv head j // group, which head_order guarantees. Exact: the
    same heads attend over the same keys, in another order."""
    out = dict(weights)
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = hq // hkv
    for i, (kv_perm, q_perm) in perms.items():
        owners = q_perm.reshape(hkv, group) // group  # the kv head of each new q head
        if not torch.equal(owners, kv_perm[:, None].expand(hkv, group)):
            raise ValueError(f"layer {i}: q_perm does not keep each q head with its kv head "
                             "in kv_perm's order")

        def rows(perm, base):  # the rows of heads `perm` in a block of heads starting at base
            return (base + perm[:, None] * d + torch.arange(d)).reshape(-1)
        order = torch.cat([rows(q_perm, 0), rows(kv_perm, hq * d), rows(kv_perm, (hq + hkv) * d)])
        for name in (f"layers.{i}.wqkv", f"layers.{i}.bqkv"):
            if name in out:
                out[name] = out[name][order.to(out[name].device)].clone()
        wo = out[f"layers.{i}.wo"]
        out[f"layers.{i}.wo"] = wo[:, rows(q_perm, 0).to(wo.device)].clone()
    return out


def model_block(cfg: ModelConfig) -> int:
    """The activation block of a model: COMET's 128 channels when every decoder linear's input
    width is a multiple of it, else 64 (SmolLM2-135M: hidden 576 = 9 x 64); one block size for
    the whole model, so that the 8-bit budget counts equal blocks."""
    widths = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size)
    for block in BLOCKS:
        if all(k % block == 0 for k in widths):
            return block
    raise ValueError(f"w4a4: the decoder linears' input widths {widths} are not multiples of "
                     f"{' or '.join(map(str, BLOCKS))} channels (FMPQ's activation blocks)")


def linear_args(cfg: ModelConfig, report: dict | None, target: str = "sm90"
                ) -> dict[str, dict[str, int]]:
    """swap_gemm's per-linear arguments of w4a4: every decoder linear's block, its n8 from the
    `fmpq` step's report (0, every block int4, when the step did not run), its 4-bit clip
    where the step chose one (else the quantizer's default, none), and for an sm80 target
    `packed` (the 4-bit blocks two codes a byte, for the s4 MMAs)."""
    block = model_block(cfg)
    fm = (report or {}).get("fmpq") or {}
    n8, clip = fm.get("n8", {}), fm.get("clip", {})
    out = {}
    for i in range(cfg.num_layers):
        for kind in KINDS:
            name = f"layers.{i}.{kind}"
            out[name] = {"n8": int(n8.get(name, 0)), "block": block}
            if target == "sm80":
                out[name]["packed"] = 1
            if name in clip:
                out[name]["clip"] = int(clip[name])
    return out


def _head_rows(perm: torch.Tensor, d: int) -> torch.Tensor:
    return (perm[:, None] * d + torch.arange(d)).reshape(-1)


def apply_fmpq(cfg: ModelConfig, weights: dict[str, torch.Tensor], stats, keys: torch.Tensor | None,
               fraction: float, down_rotation: bool = False, clip: str = "none",
               permute: bool = True) -> tuple[dict, object, torch.Tensor | None, dict]:
    """QoQ's `fmpq` step (after smoothing, before clipping and GPTQ): permute channels so that
    every decoder linear's loud input channels lead, fold the permutations into the weights,
    and spend the 8-bit block budget. Returns (weights, the statistics of the permuted model,
    its mean keys, report with "block", "n8" {linear: count} and "int8_fraction").

    * residual stream (wqkv and w_gate_up inputs, one order for every layer): channels by their
      largest magnitude over those linears, each linear's absmax divided by its median so that
      every linear votes on the same scale (folded norms; `permute_residual`);
    * SwiGLU output (w_down input): per layer by its absmax (`permute_intermediate`);
    * attention output (wo input): whole heads per layer (`head_order`, `permute_heads`), and
      the kv heads' mean keys with them (key centering reads them per head);
    * with `down_rotation`, w_down's input rotated in blocks (`block_rotation`, folded into its
      columns; the graph rotates the input: report "down_rotation" {"block", "seed"}).
    Then each linear's block errors on its calibration rows, relative to its output energy,
    and `allocate_blocks` gives `fraction` of all blocks int8; `clip` "search" chooses each
    linear's 4-bit clip (`choose_clip`), a number ("0.9") gives every linear that share, "none"
    none (report "clip" {linear: per mille} unless none). Exact in float: the statistics
    are the old ones permuted (`reorder.permute_stats`), no second forward. permute False:
    every order the identity (the ablation: the int8 blocks are then whichever channels lead
    in the model's own order)."""
    from .reorder import permute_stats
    block, n_layers = model_block(cfg), cfg.num_layers
    w = fold_norms(cfg, weights)  # permute_residual needs unit gains (exact if already folded)
    readers = [f"layers.{i}.{k}" for i in range(n_layers) for k in ("wqkv", "w_gate_up")]
    votes = torch.stack([stats.absmax[n].float().cpu()
                         / stats.absmax[n].float().cpu().median().clamp_min(1e-12)
                         for n in readers])
    order = channel_order if permute else (lambda m: torch.arange(m.numel()))
    res = order(votes.amax(dim=0))
    w = permute_residual(cfg, w, res)
    inter = {i: order(stats.absmax[f"layers.{i}.w_down"].float().cpu())
             for i in range(n_layers)}
    w = permute_intermediate(cfg, w, inter)
    heads = {i: head_order(cfg, stats.absmax[f"layers.{i}.wo"].float().cpu()) if permute
             else (torch.arange(cfg.num_kv_heads), torch.arange(cfg.num_heads))
             for i in range(n_layers)}
    w = permute_heads(cfg, w, heads)
    perms = {n: res for n in readers}
    for i in range(n_layers):
        perms[f"layers.{i}.w_down"] = inter[i]
        perms[f"layers.{i}.wo"] = _head_rows(heads[i][1], cfg.head_dim)
    st = permute_stats(stats, perms)
    kv_rows = [_head_rows(heads[i][0], cfg.head_dim) for i in range(n_layers)]
    st.key_absmax = [a[r.to(a.device)] for a, r in zip(st.key_absmax, kv_rows)]
    st.key_sum = [a[r.to(a.device)] for a, r in zip(st.key_sum, kv_rows)]
    if keys is not None:
        keys = torch.stack([keys[i][kv_rows[i].to(keys.device)] for i in range(n_layers)])
    rotation = None
    if down_rotation:
        h = block_rotation(block)
        downs = [f"layers.{i}.w_down" for i in range(n_layers)]
        for name in downs:
            w[name] = rotate_blocks(w[name], h)
        st = rotate_block_stats(st, {name: h for name in downs})
        rotation = {"block": block, "seed": DOWN_ROTATION_SEED}
    errors = {}
    for i in range(n_layers):
        for kind in KINDS:
            name = f"layers.{i}.{kind}"
            errors[name] = block_errors(st.samples[name].float().cpu(), block,
                                        w[name].float().cpu(), relative=True)
    n8 = allocate_blocks(errors, fraction)
    total = sum(e4.numel() for e4, _ in errors.values())
    report = {"block": block, "int8_fraction": round(sum(n8.values()) / total, 4), "n8": n8}
    if clip == "search":
        report["clip"] = {name: choose_clip(st.samples[name].float().cpu(),
                                            w[name].float().cpu(), n8[name], block)
                          for name in errors}
    elif clip != "none":
        report["clip"] = {name: round(float(clip) * 1000) for name in errors}
    if rotation:
        report["down_rotation"] = rotation
    return w, st, keys, report


def input_rotations(cfg: ModelConfig, report: dict | None) -> dict[str, torch.Tensor]:
    """The run-time rotations the `fmpq` step's report asks for, {canonical linear name: H}:
    w_down's input in every layer when it rotated w_down's columns; else none."""
    rot = ((report or {}).get("fmpq") or {}).get("down_rotation")
    if not rot:
        return {}
    h = block_rotation(int(rot["block"]), int(rot["seed"]))
    return {f"layers.{i}.w_down": h for i in range(cfg.num_layers)}
