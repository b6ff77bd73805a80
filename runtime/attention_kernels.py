"""CUDA implementations of `qcompile::paged_attention_{fp16,int4}` and
`qcompile::kv_encode_{fp16,int4}`: the paged_attention.cu entries of the active kernel table
(`gemm_kernels.Kernels`: an Engine's own, else the process default), launched on PyTorch's
current stream (CUDA-graph capturable: the launch plan depends on shapes only, lengths and
block tables are read on the device).

`register()` routes CUDA calls of the ops here; `enable(table)` also makes `table` the process
default's (benchmarks, tests; its counts are `STATS`). A call the active kernels cannot serve
(float32 or bfloat16 activations, a head dim without a build, attention turned off) runs the
PyTorch reference, counted in their `attention.fallbacks` with the reason, so a benchmark can
say what it measured. `QCOMPILE_ATTENTION=reference` keeps the reference on CUDA too (to
compare, or to rule the kernels out when an answer looks wrong).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from qcompile.cutlass_templates.attention_configs import (ATTN_KINDS, KIND_OF_FORMAT, THREADS,
                                                         AttnConfig, Launch, plan,
                                                         plan_invariant)
from qcompile.runtime.ops.attention import paged_attention_ref
from qcompile.runtime.ops.kv import CODECS, _encode_pair, kv_record_bytes, rotate_heads

from .gemm_kernels import _DEFAULT, KernelTable, active, attention_by_default

STATS = _DEFAULT.attention  # the process default's counts (benchmarks, tests)
_LOG2E = 1.4426950408889634


def enable(table: KernelTable) -> None:
    """Make `table` the process default's and route CUDA calls of the attention and
    KV-encode ops to the active kernels (the default keeps the reference where
    $QCOMPILE_ATTENTION is "reference")."""
    _DEFAULT.table = table
    _DEFAULT.attention_on = attention_by_default()
    register()


def register() -> None:
    """Route CUDA calls of the attention and KV-encode ops to the active kernels (per
    process; registering again replaces the same implementations)."""
    for fmt in CODECS:
        torch.library.register_kernel(f"qcompile::paged_attention_{fmt}", "cuda",
                                      functools.partial(_attention, fmt))
        torch.library.register_kernel(f"qcompile::kv_encode_{fmt}", "cuda",
                                      functools.partial(_encode, fmt))


def _find(fmt: str, head_dim: int, dtype: torch.dtype, what: str):
    """(config, kind) whose binary is in the table, or None with the reason counted."""
    kind, kernels = KIND_OF_FORMAT[fmt], active()
    table, stats = kernels.table, kernels.attention
    if dtype != torch.float16:
        reason = f"{what} {fmt}: the kernels take float16 activations, not {dtype}"
    elif not kernels.attention_on:
        reason = f"{what} {fmt}: attention kernels turned off (QCOMPILE_ATTENTION=reference)"
    elif table is None:
        reason = f"{what} {fmt}: no kernel table enabled"
    else:
        try:
            cfg = AttnConfig(head_dim)
        except ValueError as e:
            cfg, reason = None, f"{what} {fmt}: {e}"
        if cfg is not None:
            if cfg.name(kind) in table.kernels:
                return cfg, kind
            reason = f"{what} {fmt}: {cfg.name(kind)} is not in {table.dir}"
    if not stats.fallbacks[reason]:
        warnings.warn(f"qcompile attention runs the PyTorch reference: {reason}")
    stats.fallbacks[reason] += 1
    return None


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _attention(fmt, q, kv_new, kv_cache, block_tables, ctx_lens, query_start, num_kv_heads,
               scale, rotation=None):
    found = _find(fmt, q.shape[-1], q.dtype, "attention")
    if found is None:
        return paged_attention_ref(fmt, q, kv_new, kv_cache, block_tables, ctx_lens,
                                   query_start, num_kv_heads, scale, rotation)
    if rotation is not None and not (rotation.dtype == q.dtype and
                                     rotates(active().table.kernels, *found)):
        q, rotation = rotate_heads(q, rotation), None
    return launch_attention(*found, q, kv_new, kv_cache, block_tables, ctx_lens, query_start,
                            num_kv_heads, scale, rotation=rotation)


def fixed_splits(table, cfg: AttnConfig, kind: str) -> bool:
    """Whether the binary of (cfg, kind) in `table` (a KernelTable's kernels) takes the split
    size and sequence selection of batch-invariant plans: its template version added them
    with `_encode_strided`; an older binary ignores the two arguments (correct attention,
    but the plan's cuts and selection are not its own)."""
    return f"{cfg.name(kind)}_encode_strided" in table


def rotates(table, cfg: AttnConfig, kind: str) -> bool:
    """Whether the binary of (cfg, kind) in `table` applies the key rotation itself (an int4
    binary with `_encode_rot`, whose attention entries take `rot` as their last argument: an
    older binary would ignore it)."""
    return ATTN_KINDS[kind][1] == "int4" and f"{cfg.name(kind)}_encode_rot" in table


def table_rotates(kernels, head_dim: int) -> bool:
    """Whether `kernels` (a gemm_kernels.Kernels, or None) apply the key rotation of an int4
    cache of this head dim themselves (`rotates`), attention kernels on."""
    if kernels is None or kernels.table is None or not kernels.attention_on:
        return False
    try:
        cfg = AttnConfig(head_dim)
    except ValueError:
        return False
    return rotates(kernels.table.kernels, cfg, "attn_int4")


def launch_attention(cfg: AttnConfig, kind: str, q, kv_new, kv_cache, block_tables, ctx_lens,
                     query_start, num_kv_heads: int, scale: float, *, out=None, splits=None,
                     entry=None, split_keys: int | None = None, rotation=None):
    """Launch into out ([T, Hq, D] fp16; allocated when None). `splits` / `entry` ("kt",
    "decode", "prefill") override the plan (tests and the benchmark). `split_keys` (default:
    the active kernels', 0 unless the engine is batch-invariant): > 0 launches
    `plan_invariant`'s fixed cuts, one launch per kind of sequence. `rotation`: H [D, D], a
    signed Sylvester Hadamard matrix the kernel applies to q (`rotates` must hold)."""
    q, kv_new = q.contiguous(), kv_new.contiguous()
    t, hq, _ = q.shape
    b, mb = block_tables.shape
    bs = kv_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if t == 0 or b == 0:
        return out
    name, kernels = cfg.name(kind), active()
    table = kernels.table.kernels
    if split_keys is None:
        split_keys = kernels.split_keys
    if split_keys and entry is None and splits is None:
        if not fixed_splits(table, cfg, kind):
            raise RuntimeError(f"batch-invariant attention needs a newer {name} than "
                               f"{kernels.table.dir} holds; rebuild the artifact's kernels "
                               "(qcompile again)")
        launches = plan_invariant(t, b, hq, num_kv_heads, mb * bs, split_keys)
    else:
        sms = _sm_count(q.device.index if q.device.index is not None
                        else torch.cuda.current_device())
        launches = [plan(t, b, hq, num_kv_heads, mb * bs, sms, entry=entry, splits=splits)]
    if rotation is not None:
        rotation = rotation.contiguous()
    for p in launches:
        _launch(cfg, kind, table, kernels.attention, p, q, kv_new, kv_cache, block_tables,
                ctx_lens, query_start, out, num_kv_heads, scale, rotation)
    return out


def _launch(cfg: AttnConfig, kind: str, table, stats, p: Launch, q, kv_new, kv_cache,
            block_tables, ctx_lens, query_start, out, num_kv_heads: int, scale: float,
            rotation=None) -> None:
    from .launcher import f32, i32, ptr
    t, hq, d = q.shape
    b, mb = block_tables.shape
    nb, bs, r = kv_cache.shape[1:]
    ws_o = ws_lse = None
    if p.splits > 1:
        ws_o = torch.empty((p.splits, t, hq, d), dtype=torch.float32, device=q.device)
        ws_lse = torch.empty((p.splits, t, hq), dtype=torch.float32, device=q.device)
    name = cfg.name(kind)
    kernel = table[name if p.entry == "decode" else f"{name}_{p.entry}"]  # KeyError: old build
    args = [ptr(q), ptr(kv_new), ptr(kv_cache), ptr(block_tables), ptr(ctx_lens),
            ptr(query_start), ptr(out), ptr(ws_o), ptr(ws_lse), i32(t), i32(b), i32(mb),
            i32(nb), i32(bs), i32(r), i32(hq), i32(num_kv_heads), f32(scale * _LOG2E),
            i32(p.split_keys), i32(p.select), ptr(rotation)]
    kernel.launch(p.grid, (cfg.threads(), 1, 1), cfg.smem_bytes(kind, p.entry), args)
    if p.splits > 1:
        table[f"{name}_merge"].launch(
            (math.ceil(t * hq / 4), 1, 1), (cfg.threads(), 1, 1), 0,
            [ptr(ws_o), ptr(ws_lse), ptr(out), i32(t), i32(hq), i32(p.splits),
             ptr(query_start), i32(b), i32(p.select)])
    stats.launches[f"{name}_{p.entry}" + (f"_split{p.splits}" if p.splits > 1 else "")
                   + ("", "_single", "_multi")[p.select]] += 1


def _encode(fmt, k, v, rotation=None):
    found = _find(fmt, k.shape[-1], k.dtype, "kv_encode")
    if found is None:
        return _encode_pair(fmt, k, v, rotation)
    if rotation is not None and not (rotation.dtype == k.dtype and
                                     rotates(active().table.kernels, *found)):
        k, rotation = rotate_heads(k, rotation), None
    return launch_encode(*found, k, v, rotation)


def store_pages(layout, cache: torch.Tensor, recs: torch.Tensor, slots: torch.Tensor) -> bool:
    """The step's records [..., T, R] into cache [..., NB, BS, R] at slots [T] (int64) with the
    active table's `_store` entry (one launch; any binary's serves any layout: it moves bytes).
    False, with nothing written, when no binary has one (the caller runs `to_pages`)."""
    kernels = active()
    table = kernels.table
    if table is None or not kernels.attention_on or not cache.is_cuda:
        return False
    entry = next((n for n in table.kernels if n.startswith("qc_attn") and n.endswith("_store")),
                 None)
    if entry is None:
        return False
    from .launcher import i32, i64, ptr
    *lead, nb, bs, r = cache.shape
    m, t = math.prod(lead), slots.shape[0]
    recs = recs.contiguous()
    if t:
        table.kernels[entry].launch(
            (math.ceil(m * t * layout.num_kv_heads / 4), 1, 1), (THREADS, 1, 1), 0,
            [ptr(recs), ptr(cache), ptr(slots), i32(m), i32(t), i32(layout.num_kv_heads),
             i32(layout.head_bytes), i32(layout.param_bytes), i32(bs), i32(r), i64(nb)])
        kernels.attention.launches[entry] += 1
    return True


def _rows_of_heads(x: torch.Tensor) -> bool:
    """[T, H, D] with each token's heads contiguous (tokens any stride apart): what the
    strided encode reads in place, e.g. v as a column slice of the fused QKV output."""
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and x.stride(0) > 0


def launch_encode(cfg: AttnConfig, kind: str, k, v, rotation=None):
    """k, v [T, Hkv, D] fp16 -> records [2, T, R] uint8 (bitwise the reference codec). A k or
    v whose tokens are rows of heads is read in place (`_encode_strided`; binaries built
    before it copy them first): the value slice of the fused QKV output was a copy kernel
    a layer, 41 us of the 1B shape's 2.0 ms batch-64 decode step on an H100
    (bench/results/profile-step-1b-w4a8-inductor-h100-2026-12-07d.json). `rotation`: the
    keys are rotated first (`_encode_rot`; `rotates` must hold): k @ H to fp16, then the
    codec, as the reference."""
    from .launcher import i32, i64, ptr
    name, kernels = cfg.name(kind), active()
    entry = f"{name}_encode_rot" if rotation is not None else f"{name}_encode_strided"
    strided = kernels.table.kernels.get(entry)
    if rotation is not None and strided is None:
        raise ValueError(f"{kernels.table.dir} has no {entry}: rotate the keys before the encode")
    if strided is None or not (_rows_of_heads(k) and _rows_of_heads(v)):
        k, v = k.contiguous(), v.contiguous()
    t, hkv, d = k.shape
    r = kv_record_bytes(ATTN_KINDS[kind][1], hkv, d, k.dtype)
    out = torch.empty((2, t, r), dtype=torch.uint8, device=k.device)
    if t:
        grid, block = (math.ceil(2 * t * hkv / 4), 1, 1), (cfg.threads(), 1, 1)
        args = [ptr(k), ptr(v), ptr(out), i32(t), i32(hkv), i32(r)]
        if strided is not None:
            rot = [ptr(rotation.contiguous())] if rotation is not None else []
            strided.launch(grid, block, 0, args + [i64(k.stride(0)), i64(v.stride(0))] + rot)
            kernels.attention.launches[entry] += 1
        else:
            kernels.table.kernels[f"{name}_encode"].launch(grid, block, 0, args)
            kernels.attention.launches[f"{name}_encode"] += 1
    return out

