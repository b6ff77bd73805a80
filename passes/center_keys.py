"""Subtract a calibrated mean from the keys before the KV cache encodes them.

Matches: every `qcompile::kv_encode_<fmt>(k, v)` (any format), in graph order (= layer order).
Emits: one weight placeholder `kv_key_mean` mu [L, Hkv, D] (activation dtype; the mean
post-RoPE key of each layer and kv head over the calibration text, `CalibStats.key_mean`)
and `k - mu[i]` (select + sub) before layer i's encode.
Exact in float: a query's logits q . (k_j - mu) = q . k_j - q . mu all move by the same
q . mu, and softmax ignores a per-query constant, so attention outputs are unchanged (to
rounding); the cache stores centered keys, and no query or output needs a correction.

Why: the int4 cache quantizes each (token, kv head) over the head dim with its own min and
max, so a channel whose keys sit far from zero on most tokens widens the range of every token
alike (a uniform offset costs nothing: the zero point absorbs it). The mean carries the
offset; subtracting it leaves the part that varies. SmolLM2-135M, 24 x 512 pydoc tokens,
float32, KV4 perplexity without / with centering (float cache: fp16 weights 14.20): fp16
weights with the key rotation 15.17 / 14.77, without it 16.57 / 15.13; W4A8 QoQ per-channel
16.81 / 16.39, g64 16.26 / 15.73 (the default recipes of 9cfc422, rotation on).

Runs before `rotate_kv`, which then rotates the centered keys, (k - mu) H: the mean stays in
the unrotated basis where it was measured.

Node walking, not a pattern: the pass adds a weight placeholder, which a replacement cannot.
"""
from __future__ import annotations

import torch

from qcompile.runtime.ops import KV_ENCODE_OPS

from .base import Lowering

aten = torch.ops.aten
KEY_MEAN = "kv_key_mean"
_ENCODE = set(KV_ENCODE_OPS.values())


def center_keys(lowering: Lowering, key_mean: torch.Tensor) -> int:
    """key_mean [L, Hkv * D] or [L, Hkv, D], one row per encode in graph order. Returns the
    number of encodes whose keys are now centered; 0 for a graph without KV ops or one already
    centered (it has a `kv_key_mean` weight)."""
    graph = lowering.gm.graph
    encodes = [n for n in graph.nodes if n.target in _ENCODE]
    if not encodes or KEY_MEAN in lowering.weights:
        return 0
    k0 = encodes[0].args[0].meta["val"]  # [T, Hkv, D]
    heads, dim = k0.shape[1:]
    if len(key_mean) != len(encodes) or key_mean[0].numel() != heads * dim:
        raise ValueError(f"center_keys: key_mean {tuple(key_mean.shape)} does not fit "
                         f"{len(encodes)} encodes of keys [T, {heads}, {dim}]")
    mu = lowering.add_weight(KEY_MEAN, key_mean.reshape(len(encodes), heads, dim).to(k0.dtype))
    for i, enc in enumerate(encodes):
        with graph.inserting_before(enc):
            layer_mu = lowering.call(aten.select.int, (mu, 0, i))
            k = lowering.call(aten.sub.Tensor, (enc.args[0], layer_mu))
        enc.args = (k, *enc.args[1:])
    return len(encodes)
