"""Paged attention kernels against SDPA (flash, bf16, contiguous cache of the same shape) and
the reference op, in one process, timed by CUDA-graph replay with the caches rotated so that
every call reads its KV from DRAM (L2-cold).

    python bench/attention.py --out bench/results [--quick]

Decode: batch x context x heads (Llama-3-8B 32/8 x 128, Llama-3.2-1B 32/8 x 64), one new
token per sequence; prints time, bandwidth on the KV bytes each reads (ours: the int4 or fp16
pages; SDPA: its bf16 cache) and its fraction of the measured copy bandwidth, and ours/SDPA.
Prefill: a chunk of new tokens over a cached prefix (causal, bottom-right aligned), TFLOP/s
against SDPA. Writes attention-<gpu>-<date>.{md,json,png} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qcompile.cutlass_templates.attention_configs import (KIND_OF_FORMAT, PREFILL_ENTRIES,
                                                         AttnConfig, plan)
from qcompile.runtime.ops import kv_record_bytes

HEADS = {"8B": (32, 8, 128), "1B": (32, 8, 64)}
BS = 16
COLD_BYTES = 256 << 20  # rotate caches until each replay round reads this much
SMS = 132  # replaced by the GPU's SM count in main()


def graph_us(fns, iters: int = 3) -> float:
    """Microseconds per call of fns (a list rotated through), from CUDA-graph replay."""
    fns[0]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    reps = max(len(fns), 8)
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, read + write counted (issue 12's baseline)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)])
    return 2 * src.numel() / us / 1e3


def read_bandwidth() -> float:
    """GB/s of a read-only pass over 1 GiB (a float32 sum): what a kernel that only reads, as
    decode attention does, can reach. A copy's read + write rate is lower on HBM (H200:
    SDPA's decode read its cache at 4,426 GB/s against a copy of 2,771). (An int32 sum into
    int64 measured 587 GB/s on an H100: that reduction is compute-bound, not a baseline.)"""
    src = torch.zeros(1 << 28, dtype=torch.float32, device="cuda")
    out = torch.empty((), dtype=torch.float32, device="cuda")
    us = graph_us([lambda: torch.sum(src, dim=0, out=out)])
    return 4 * src.numel() / us / 1e3


def _cache(fmt, hkv, d, pages, gen):
    """[2, pages, BS, R] uint8 pages of valid records (fp16 values / int4 codes with sane
    params)."""
    r = kv_record_bytes(fmt, hkv, d, torch.float16)
    if fmt == "fp16":
        x = torch.randn(2, pages, BS, r // 2, device="cuda", dtype=torch.float16, generator=gen)
        return x.view(torch.uint8)
    cache = torch.randint(0, 256, (2, pages, BS, r), dtype=torch.uint8, device="cuda",
                          generator=gen)
    params = torch.tensor([0.25, -1.875], dtype=torch.float16, device="cuda").view(torch.uint8)
    pages_flat = cache.view(2, pages, BS * r)  # head-major pages (PageLayout): params after codes
    p0 = hkv * BS * d // 2
    pages_flat[..., p0: p0 + 4 * hkv * BS] = params.repeat(hkv * BS)
    return cache


def _records(fmt, hkv, d, gen):
    """[2, 1, R] one token's K and V records (token-major: codes, then params)."""
    r = kv_record_bytes(fmt, hkv, d, torch.float16)
    if fmt == "fp16":
        x = torch.randn(2, 1, r // 2, device="cuda", dtype=torch.float16, generator=gen)
        return x.view(torch.uint8)
    rec = torch.randint(0, 256, (2, 1, r), dtype=torch.uint8, device="cuda", generator=gen)
    params = torch.tensor([0.25, -1.875], dtype=torch.float16, device="cuda").view(torch.uint8)
    rec[..., hkv * d // 2: hkv * d // 2 + 4 * hkv] = params.repeat(hkv)
    return rec


def _batch(fmt, b, ctx, new, hq, hkv, d, gen):
    """Inputs of our op: b sequences of ctx cached + new tokens, pages in random order."""
    per = math.ceil(ctx / BS)
    cache = _cache(fmt, hkv, d, b * per, gen)
    tables = torch.randperm(b * per, device="cuda", generator=gen).int().reshape(b, per)
    t = b * new
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.float16, generator=gen)
    kv_new = _records(fmt, hkv, d, gen).expand(2, t, -1).contiguous()
    ctx_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    starts = torch.arange(0, t + 1, new, dtype=torch.int32, device="cuda")
    return q, kv_new, cache, tables, ctx_lens, starts


def ours_fns(fmt, b, ctx, new, hq, hkv, d, gen, launch, **kw):
    cfg, kind = AttnConfig(d), KIND_OF_FORMAT[fmt]
    one = _batch(fmt, b, ctx, new, hq, hkv, d, gen)
    copies = max(1, min(8, COLD_BYTES // max(one[2].nbytes, 1)))
    batches = [one] + [_batch(fmt, b, ctx, new, hq, hkv, d, gen) for _ in range(copies - 1)]
    outs = [torch.empty_like(x[0]) for x in batches]
    return [lambda x=x, o=o: launch(cfg, kind, *x, hkv, d ** -0.5, out=o, **kw)
            for x, o in zip(batches, outs)], batches


def sdpa_fns(b, ctx, new, hq, hkv, d, gen):
    def make():
        q = torch.randn(b, hq, new, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, hkv, ctx + new, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        return q, k, torch.randn_like(k)
    one = make()
    copies = max(1, min(8, COLD_BYTES // (2 * one[1].nbytes)))
    sets = [one] + [make() for _ in range(copies - 1)]
    mask = None
    if new > 1:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(new, ctx + new)
    return [lambda s=s: F.scaled_dot_product_attention(*s, attn_mask=mask, enable_gqa=True)
            for s in sets]


def kv_bytes(fmt, b, keys, hkv, d) -> int:
    per_head = d // 2 + 4 if fmt == "int4" else 2 * d
    return 2 * b * keys * hkv * per_head


def decode_rows(args, launch, bw_copy, gen, bw_read=None):
    rows = []
    for name, (hq, hkv, d) in HEADS.items():
        for b in args.batches:
            for ctx in args.contexts:
                if kv_bytes("fp16", b, ctx, hkv, d) * 2 > args.max_gib * 2**30:
                    continue
                row = {"heads": name, "batch": b, "context": ctx}
                for fmt in ("int4", "fp16"):
                    fns, batches = ours_fns(fmt, b, ctx - 1, 1, hq, hkv, d, gen, launch)
                    us = graph_us(fns)
                    gbs = kv_bytes(fmt, b, ctx, hkv, d) / us / 1e3
                    row[fmt] = {"us": us, "GB/s": gbs, "of_copy": gbs / bw_copy,
                                "of_read": gbs / bw_read if bw_read else None}
                    if fmt == "int4" and b <= 16 and ctx <= 1024 and args.reference:
                        row["ref_us"] = reference_us(fmt, batches[0], hkv, d)
                    del fns, batches
                    for entry in args.also:  # the other decode entries, same shape
                        fns, _ = ours_fns(fmt, b, ctx - 1, 1, hq, hkv, d, gen, launch,
                                          entry=entry)
                        row[f"{fmt}_{entry}_us"] = graph_us(fns)
                        del fns
                    row[f"{fmt}_splits"] = plan(b, b, hq, hkv, ctx, SMS).splits
                    for sp in args.sweep_splits:  # the plan's entry, other key splits
                        fns, _ = ours_fns(fmt, b, ctx - 1, 1, hq, hkv, d, gen, launch,
                                          splits=sp)
                        row[f"{fmt}_split{sp}_us"] = graph_us(fns)
                        del fns
                us = graph_us(sdpa_fns(b, ctx - 1, 1, hq, hkv, d, gen))
                gbs = 2 * b * ctx * hkv * d * 2 / us / 1e3
                row["sdpa"] = {"us": us, "GB/s": gbs, "of_copy": gbs / bw_copy,
                               "of_read": gbs / bw_read if bw_read else None}
                torch.cuda.empty_cache()
                rows.append(row)
                print(_decode_line(row), flush=True)
    return rows


def reference_us(fmt, batch, hkv, d) -> float:
    from qcompile.runtime.ops.attention import paged_attention_ref
    args = (fmt, *batch, hkv, d ** -0.5)
    paged_attention_ref(*args)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    paged_attention_ref(*args)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3


def prefill_rows(args, launch, gen):
    rows = []
    for heads, (b, prefix, new) in itertools.product(("8B", "1B"), args.prefill):
        hq, hkv, d = HEADS[heads]
        flops = 4 * hq * d * b * sum(prefix + i + 1 for i in range(new))
        row = {"heads": heads, "batch": b, "prefix": prefix, "new": new}
        for fmt in ("int4", "fp16"):
            fns, _ = ours_fns(fmt, b, prefix, new, hq, hkv, d, gen, launch)
            us = graph_us(fns)
            row[fmt] = {"us": us, "TFLOP/s": flops / us / 1e6}
            planned = plan(new * b, b, hq, hkv, prefix + new, SMS).entry
            row[f"{fmt}_{planned}_us"] = us
            for entry in PREFILL_ENTRIES:  # each prefill entry, planned and at other splits
                for sp in (None, *args.sweep_splits):
                    if entry == planned and sp is None:
                        continue  # timed above
                    fns, _ = ours_fns(fmt, b, prefix, new, hq, hkv, d, gen, launch,
                                      entry=entry, splits=sp)
                    tag = f"_split{sp}" if sp else ""
                    row[f"{fmt}_{entry}{tag}_us"] = graph_us(fns)
        us = graph_us(sdpa_fns(b, prefix, new, hq, hkv, d, gen))
        row["sdpa"] = {"us": us, "TFLOP/s": flops / us / 1e6}
        rows.append(row)
        print(_prefill_line(row), flush=True)
    return rows


def _decode_line(r):
    i, f, s = r["int4"], r["fp16"], r["sdpa"]
    ref = f" | {r['ref_us'] / 1e3:.1f}" if "ref_us" in r else " | "
    also = sorted(k for k in r if k.endswith("_us") and k != "ref_us")
    ref += " | " + ", ".join(f"{k[:-3]} {r[k]:.1f}" for k in also)
    ref += "".join(f"; {f} plan splits {r[f + '_splits']}" for f in ("int4", "fp16")
                   if f + "_splits" in r)
    def frac(x):  # of copy / of read
        read = f" / {x['of_read']:.0%}" if x.get("of_read") else ""
        return f"{x['GB/s']:.0f} ({x['of_copy']:.0%}{read})"
    return (f"| {r['heads']} | {r['batch']} | {r['context']} | {i['us']:.1f} | {frac(i)} | "
            f"{f['us']:.1f} | {frac(f)} | {s['us']:.1f} | {frac(s)} | {i['us'] / s['us']:.2f} | "
            f"{f['us'] / s['us']:.2f}{ref} |")


def _prefill_line(r):
    i, f, s = r["int4"], r["fp16"], r["sdpa"]
    return (f"| {r['heads']} | {r['batch']} | {r['prefix']} | {r['new']} | {i['us']:.0f} | "
            f"{i['TFLOP/s']:.0f} | {f['us']:.0f} | {f['TFLOP/s']:.0f} | {s['us']:.0f} | "
            f"{s['TFLOP/s']:.0f} | {i['TFLOP/s'] / s['TFLOP/s']:.2f} | "
            f"{f['TFLOP/s'] / s['TFLOP/s']:.2f} | "
            + ", ".join(f"{k[:-3]} {r[k]:.0f}" for k in sorted(r) if k.endswith("_us")) + " |")


DECODE_HEAD = ("| heads | batch | context | int4 us | int4 GB/s (of copy / read) | fp16 us | "
               "fp16 GB/s (of copy / read) | SDPA bf16 us | SDPA GB/s (of copy / read) | "
               "int4/SDPA | fp16/SDPA | "
               "reference ms | other decode entries, us |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
PREFILL_HEAD = ("| heads | batch | prefix | new | int4 us | int4 TFLOP/s | fp16 us | "
                "fp16 TFLOP/s | SDPA us | SDPA TFLOP/s | int4/SDPA | fp16/SDPA | "
                "prefill entries (planned, other splits), us |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    heads = sorted({r["heads"] for r in rows})
    fig, axes = plt.subplots(1, len(heads), figsize=(6 * len(heads), 4.5), squeeze=False)
    for ax, h in zip(axes[0], heads):
        for b in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["heads"] == h and r["batch"] == b]
            if not sel:
                continue
            ctx = [r["context"] for r in sel]
            for impl, style in (("int4", "-o"), ("fp16", "-s"), ("sdpa", ":^")):
                ax.plot(ctx, [r[impl]["us"] for r in sel], style, label=f"{impl} B={b}")
        ax.set(xscale="log", yscale="log", xlabel="context", ylabel="us per decode step",
               title=f"paged attention decode, {h} heads")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true", help="a few shapes")
    p.add_argument("--max-gib", type=float, default=24, help="skip shapes whose caches exceed")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--sweep-splits", type=lambda v: [int(x) for x in v.split(",") if x],
                   default=[], help="also time decode with these key splits (e.g. 1,2,4,8), "
                   "to tune the plan's choice")
    p.add_argument("--also", nargs="*", default=["decode"], choices=("kt", "decode"),
                   help="decode entries also timed beside the planned one (default: decode)")
    args = p.parse_args(argv)
    args.batches = (1, 64) if args.quick else (1, 16, 64, 256)
    args.contexts = (1024, 4096) if args.quick else (128, 1024, 4096, 16384)
    args.prefill = ([(1, 0, 1024), (1, 1024, 512)] if args.quick else
                    [(1, 0, 1024), (1, 0, 4096), (1, 1024, 512), (4, 2048, 512), (1, 8192, 1024)])
    from qcompile.runtime import attention_kernels, gemm_kernels
    major = torch.cuda.get_device_capability()[0]
    kdir = Path(os.environ.get("QCOMPILE_KERNEL_DIR", f"build/kernels_sm{major}0"))
    attention_kernels.enable(gemm_kernels.enable(kdir))
    global SMS
    SMS = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    gpu = torch.cuda.get_device_name()
    bw, bw_read = copy_bandwidth(), read_bandwidth()
    print(f"{gpu}, torch {torch.__version__}; copy bandwidth {bw:.0f} GB/s (read + write), "
          f"read bandwidth {bw_read:.0f} GB/s")
    print(DECODE_HEAD)
    dec = decode_rows(args, attention_kernels.launch_attention, bw, gen, bw_read)
    print(PREFILL_HEAD)
    pre = prefill_rows(args, attention_kernels.launch_attention, gen)
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    stem = args.out / f"attention-{tag}-{datetime.date.today()}"
    args.out.mkdir(parents=True, exist_ok=True)
    head = (f"# Paged attention, {gpu}, torch {torch.__version__}\n\nCUDA-graph replay, "
            f"L2-cold (caches rotated); copy bandwidth {bw:.0f} GB/s, read bandwidth "
            f"{bw_read:.0f} GB/s (an int32 sum). Decode: one new token per "
            "sequence, GB/s on the KV bytes each reads (ours int4/fp16 pages, SDPA its bf16 "
            "cache).\n\n")
    stem.with_suffix(".md").write_text(
        head + DECODE_HEAD + "\n" + "\n".join(map(_decode_line, dec)) + "\n\n" + PREFILL_HEAD
        + "\n" + "\n".join(map(_prefill_line, pre)) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"gpu": gpu, "copy_GBps": bw, "read_GBps": bw_read, "decode": dec, "prefill": pre,
         "stats": dict(attention_kernels.STATS.launches)}, indent=1))
    plot(dec, stem.with_suffix(".png"))
    print(f"wrote {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
