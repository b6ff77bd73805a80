"""Rotate keys and queries per head by an orthogonal matrix before the KV cache encodes keys.

Matches: every `qcompile::kv_encode_<fmt>(k, v)` (any format) and the
`paged_attention_<fmt>(q, records, ...)` nodes that read its records.
Emits: one weight placeholder `kv_rotation` H [D, D] (activation dtype; a randomized Hadamard
matrix of order head_dim from `compiler.rotate.rotation_matrix`, shared by every layer and
head), `k @ H` before each encode and `q @ H` before each attention (view, mm, view).
`(q H) . (k H)^T = q . k^T` for an orthogonal H, so the float model is unchanged (to rounding);
the cache stores rotated keys.

Why: keys have a few large channels, fixed per head and layer (both members of a RoPE pair),
and the int4 cache quantizes each (token, head) over the head dim, so those channels set the
step for all D. H spreads every channel over all of them (QuaRot's online key rotation; QServe
only smooths keys offline with SmoothAttention). SmolLM2-135M, 24 x 512 pydoc tokens, float32,
perplexity with a float cache / int4 / int4 and this pass: fp16 weights 14.20 / 16.57 / 15.17,
W8A8 14.64 / 17.03 / 15.74, W4A8 g64 QoQ with GPTQ 15.04 / 17.38 / 16.53. Keys carry the
loss (fp16 weights, keys alone in int4: 16.38 -> 15.07 rotated; values alone: 14.30), and
rotating the values as well measured 15.17 again, so only keys are rotated. With the rotation,
SmoothAttention stops paying: the g64 recipe without it measured 16.26 at KV4. It must be
online: RoPE, a position-dependent rotation, lies between k_proj and the cache and does not
commute with H, so unlike the values' rotation (QoQ's `rotate` step folds one into v_proj /
o_proj) it cannot go into the weights.

Why explicit matmul nodes rather than a rotation inside the kv ops: the encode and attention
ops keep their signatures and the int4 record its meaning, so a fused KV4 paged-attention
kernel sees plain keys and queries and needs no [D, D] operand or Hadamard code per head_dim
(64, 80, 96, 128 need Sylvester and Paley factors). The rotation is a weight of the program:
the artifact carries it in weights.safetensors and the program says where it applies, so
artifacts compiled without it (no such nodes) run unchanged. On CUDA, an engine whose int4
attention kernels can rotate in registers (a Walsh-Hadamard transform, for the signed Sylvester
matrices of head dims 64 and 128) folds the two mms into the ops at load
(runtime/compiled.py `fold_kv_rotation`); the program stays as compiled.
Cost: one [tokens * heads, D] x [D, D] GEMM for q (once per query token) and one for k (once
per new token) per layer; SmolLM2 (D = 64, 9 + 3 heads) 0.1 MFLOP per token and layer against
4.4 for its projections. Node walking: the pass adds a weight placeholder, which a pattern
replacement cannot.
"""
from __future__ import annotations

import torch

from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS

from .base import Lowering

aten = torch.ops.aten
ROTATION = "kv_rotation"
_ENCODE = set(KV_ENCODE_OPS.values())
_ATTENTION = set(ATTENTION_OPS.values())


def kv_rotation_matrix(head_dim: int, seed: int = 0) -> torch.Tensor:
    """H [D, D] float32: `rotation_matrix` (randomized Hadamard, or a random orthogonal
    matrix where no Hadamard order is built) from a generator seeded with `seed`."""
    from qcompile.compiler.rotate import rotation_matrix
    return rotation_matrix(head_dim, torch.Generator().manual_seed(seed))


def rotate_kv(lowering: Lowering, seed: int = 0) -> int:
    """Returns the number of encodes whose keys are now rotated (one per layer); 0 for a graph
    without KV ops or one already rotated (it has a `kv_rotation` weight)."""
    graph = lowering.gm.graph
    encodes = [n for n in graph.nodes if n.target in _ENCODE]
    if not encodes or ROTATION in lowering.weights:
        return 0
    attns = [n for n in graph.nodes if n.target in _ATTENTION]
    if any(a.args[1] not in encodes for a in attns):
        # Its cache would hold rotated keys from some encode but its q would not be rotated.
        raise ValueError("rotate_kv: an attention op reads records that no kv_encode op of "
                         "this graph made")
    k0 = encodes[0].args[0].meta["val"]  # [T, Hkv, D]
    h = lowering.add_weight(ROTATION, kv_rotation_matrix(k0.shape[-1], seed).to(k0.dtype))
    for enc in encodes:
        with graph.inserting_before(enc):
            k = _rotate(lowering, enc.args[0], h)
        enc.args = (k, *enc.args[1:])
    for attn in attns:
        with graph.inserting_before(attn):
            q = _rotate(lowering, attn.args[0], h)
        attn.args = (q, *attn.args[1:])
    return len(encodes)


def _rotate(lowering: Lowering, x, h):
    """x [T, H, D] @ h as view [T*H, D] -> mm -> view [T, H, D]: core ATen ops only (the
    composite aten.matmul fails on symbolic token counts under torch 2.11's fake tensors, and
    is not in the core opset ONNX export expects). H and D must be static."""
    rest = list(x.meta["val"].shape[1:])
    if not all(isinstance(d, int) for d in rest):
        raise ValueError(f"rotate_kv: expected static head and head_dim sizes, got {rest}")
    flat = lowering.call(aten.view.default, (x, [-1, rest[-1]]))
    return lowering.call(aten.view.default, (lowering.call(aten.mm.default, (flat, h)), [-1, *rest]))
