"""Sweep the GEMM tile configs: for each kind, Llama-3-8B linear shape and M, time every
candidate config (the table's bases and a few variants, each with split-K 1/2/4/8 where it
fits, split-K with each reduction the GPU has; on sm_90 the Hopper templates' tiles too) and
report the fastest, to tune `cutlass_templates/configs.py` (SELECTION, TARGET_ROWS) from data.

    python bench/tune_gemm.py --out DIR     (on the GPU; builds its kernels first)
    python bench/tune_gemm.py --kinds w4a4x --a4x-share 0.25   (COMET's W4Ax: no split-K, one
                                            128-channel block a K tile; A4X_BASES' tiles)

Every candidate is checked against the reference once (a wrong config is reported, never
picked). Timing is bench/gemm.py's: CUDA graphs over rotated weight copies, median.
"""
from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gemm as bg  # noqa: E402  (bench/gemm.py: timing, shapes, import_qcompile)

bg.import_qcompile()

from qcompile.compiler.schemes import WITH_KERNELS  # noqa: E402
from qcompile.cutlass_templates import configs as C  # noqa: E402
from qcompile.cutlass_templates.build import build_kernels, write_kernel_table  # noqa: E402
from qcompile.runtime import gemm_kernels  # noqa: E402

# kernel kind -> its scheme row; g64 runs the g128 tiles (the default sweep leaves it out);
# w4a4x_s4 (packed activations, s4 MMAs) is sm80 code that a Hopper emulates
KINDS = {kind: s for s in WITH_KERNELS for kind in (s.kernel.kind, s.kernel.s4) if kind}
DEFAULT_KINDS = "w4a8,w4a8_g128,w8a8"
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
BASES = (C.DECODE, C.SMALL, C.MID, C.BIG, C.MEDIUM, C.LARGE, C.HUGE,
         C.TileConfig(32, 64, 128, 1, 2, 4),
         # 8-warp tiles with 64x64 warp tiles (fewer L2 bytes per MMA) and a deeper 128x128
         C.TileConfig(128, 256, 128, 2, 4, 3), C.TileConfig(256, 128, 128, 4, 2, 3),
         C.TileConfig(128, 128, 128, 2, 4, 4), C.BIG4,
         # decode: more bytes in flight per SM (deeper pipeline, longer K tiles, 1-warp CTAs)
         C.TileConfig(16, 64, 128, 1, 2, 8), C.TileConfig(16, 64, 256, 1, 2, 4),
         C.TileConfig(16, 32, 128, 1, 1, 8), C.TileConfig(16, 128, 128, 1, 4, 6))


# W4Ax (per-block activation scales: BK = 128, no split-K, <= 64 accumulators a thread): the
# selected tiles and neighbours; decode takes its CTAs from N (one- and two-warp tiles, deeper
# pipelines, 64-column tiles)
A4X_BASES = (C.A4X_DECODE, C.A4X_THIN, C.A4X_WIDE, C.TileConfig(16, 32, 128, 1, 1, 10),
             C.TileConfig(16, 64, 128, 1, 2, 8), C.TileConfig(16, 64, 128, 1, 1, 8),
             C.TileConfig(32, 64, 128, 1, 2, 6), C.TileConfig(32, 64, 128, 2, 1, 6),
             C.TileConfig(32, 128, 128, 1, 4, 4), C.TileConfig(64, 128, 128, 2, 2, 3), C.MID)

CLUSTERS = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
T = C.TileConfig
# Hopper templates (sm_90): wgmma W8A8 (warpgroups along M) and register-A W4A8 (bm tokens x
# bn weight rows, a warpgroup per 128), with deeper / shallower pipelines and one-warpgroup
# tiles (two or three CTAs per SM) for the mid-M range
SM90_BASES = {  # by the Hopper template
    "w8a8_sm90.cu": (C.WGMMA, C.WGMMA_WIDE, T(128, 128, 128, 8, 1, 3), T(64, 128, 128, 4, 1, 4),
                  T(64, 256, 128, 4, 1, 4)),
    C.RS_TEMPLATE: (C.WGMMA_RS, T(128, 256, 128, 1, 8, 3), T(128, 256, 128, 1, 8, 5), C.WGMMA_RS_1WG,
           T(128, 128, 128, 1, 4, 6), T(64, 256, 128, 1, 8, 4), T(64, 128, 128, 1, 4, 4),
           T(256, 128, 128, 1, 4, 3)),
}




def candidates(kind: str, k: int, m: int) -> list[tuple[str, C.TileConfig]]:
    """(kernel kind, config) pairs: the mma.sync bases with their splits and reductions, and
    on sm_90 the Hopper template's tiles."""
    out = []
    for base in (A4X_BASES if kind in C.A4X_KINDS else BASES):
        for split in (1, 2, 4, 8):
            cfg = base.with_split(split)
            if cfg.fits(kind, k) and (split == 1 or m <= 256) and base.bm <= max(16, 2 * m):
                out.append((kind, cfg))
                if split > 1:  # every reduction: one binary, a launch choice
                    for mode in ("fixup", "cluster")[:1 + CLUSTERS]:
                        if base.with_split(split, mode).fits(kind, k):
                            out.append((kind, base.with_split(split, mode)))
    if CLUSTERS and KINDS[kind].kernel.kind == kind and KINDS[kind].kernel.sm90:
        kk, template = KINDS[kind].kernel.sm90
        for cfg in SM90_BASES[template]:
            if cfg.fits(kk, k) and cfg.bm <= max(64, 2 * m):
                out.append((kk, cfg))
    return out


def _write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("out/tune"))
    p.add_argument("--m", default="1,16,32,64,128,256,512,1024,4096")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--kinds", default=DEFAULT_KINDS)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--hopper-only", action="store_true",
                   help="only the Hopper templates' tiles (and the selected config)")
    p.add_argument("--a4x-share", type=float, default=0.25,
                   help="W4Ax kinds: the share of 8-bit activation blocks")
    args = p.parse_args(argv)
    ms = [int(x) for x in args.m.split(",")]
    kinds = {kd: KINDS[kd] for kd in args.kinds.split(",")}
    shapes = {sh: SHAPES[sh] for sh in args.shapes.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    target = f"sm{torch.cuda.get_device_capability()[0]}0"
    def cands(kind: str, n: int, k: int, m: int) -> list:
        out = candidates(kind, k, m)
        if args.hopper_only:
            sel = C.select_kernel(kind, m, n, k, target)
            out = [c for c in out if c[0] != kind or c[1].label(kind) == sel[1].label(sel[0])]
        return out

    reqs = {pair for kind in kinds for n, k in shapes.values() for m in ms
            for pair in cands(kind, n, k, m)}
    kdir = ROOT / "build" / f"tune_{target}"
    write_kernel_table(build_kernels(sorted(reqs, key=lambda r: r[1].name(r[0])), target), kdir)
    table = gemm_kernels.enable(kdir)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    cyc = bg.sleep_cycles_per_us()
    rows = []
    for kind, spec in kinds.items():
        for shape, (n, k) in shapes.items():
            g = torch.Generator().manual_seed(n + k)
            packed = [t.cuda() for t in spec.pack_weight(torch.randn(n, k, generator=g)).values()]
            for m in ms:
                x = (torch.randn(m, k, generator=g) * 3).half().cuda()
                xq, sx, rest, tail, run_kw = bg.operands(spec, kind, x, n, args.a4x_share)
                want = spec.reference(xq, sx, *rest, *packed, None, *tail, torch.float16)
                # weight copies rotated as bench/gemm.py does, so that no call finds its
                # weights in L2 (decode reads them cold: an L2-hot sweep picks other splits)
                copies = [(*rest, *packed, None)] + [
                    (*rest, *(t.clone() for t in packed), None)
                    for _ in range(bg.n_copies(sum(t.nbytes for t in packed), l2) - 1)]
                sel_kind, sel = C.select_kernel(kind, m, n, k, target)
                for kk, cfg in cands(kind, n, k, m):
                    kern = table.kernels[cfg.name(kk)]
                    kp = spec.layout.packed_k(packed[0])
                    calls = [functools.partial(gemm_kernels._run, kk, (cfg, kern), xq, sx, ops,
                                               n, kp, **run_kw) for ops in copies]
                    ok = bool((calls[0]().float() - want.float()).abs().max() <= 1e-2 *
                              want.float().abs().max() + 1e-3)
                    us, _ = bg.time_calls(calls, args.iters, cyc)
                    rows.append(dict(kind=kind, shape=shape, N=n, K=k, M=m,
                                     config=cfg.label(kk), us=round(us, 2),
                                     tops=round(bg.tops(m, n, k, us), 1), ok=ok,
                                     selected=sel.label(sel_kind) == cfg.label(kk)))
            _write_csv(rows, args.out / "tune.csv")  # after every shape: a crash keeps data
            print(f"{kind} {shape} done", flush=True)
    lines = ["| kind | shape | M | best config | us | selected config | us | best/selected |",
             "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["kind"], r["shape"], r["M"]) for r in rows):
        group = [r for r in rows if (r["kind"], r["shape"], r["M"]) == key and r["ok"]]
        best = min(group, key=lambda r: r["us"])
        sel = next((r for r in rows if (r["kind"], r["shape"], r["M"]) == key and r["selected"]),
                   None)
        tail = (f"{sel['config']} | {sel['us']} | {sel['us'] / best['us']:.2f}x |" if sel else
                "(not swept) | | |")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {best['config']} | {best['us']} | "
                     + tail)
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"\n{len(bad)} wrong candidates: {sorted({r['config'] for r in bad})}")
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
