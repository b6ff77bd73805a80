"""Run one GEMM kernel a few times, for a profiler to look at (Nsight Compute):

    ncu --clock-control none --set full -k regex:qc_w4a8 -s 2 -c 1 \\
        python bench/profile_gemm.py --kind w4a8 --n 6144 --k 4096 --m 4096 [--config NAME]

The kernel is the one `select_kernel` picks for this GPU, or --config (a kernel name in the
table). It checks the result against the reference first, so a profile is never of a wrong
kernel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gemm as bg  # noqa: E402  (bench/gemm.py: timing, shapes, import_qcompile)

bg.import_qcompile()

from qcompile.cutlass_templates import configs as C  # noqa: E402
from qcompile.runtime import gemm_kernels  # noqa: E402
from tune_gemm import KINDS as SCHEMES  # noqa: E402  (kernel kind -> its scheme row)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="w4a8", choices=sorted(SCHEMES))
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--config", help="kernel name (default: the selected config)")
    p.add_argument("--kernel-dir", type=Path)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--a4x-share", type=float, default=0.25,
                   help="W4Ax kinds: the share of 8-bit activation blocks")
    args = p.parse_args(argv)
    kind, spec, n, k, m = args.kind, SCHEMES[args.kind], args.n, args.k, args.m
    table = gemm_kernels.enable(args.kernel_dir)
    target = gemm_kernels.device_target(torch.device("cuda"))
    kkind, cfg = (C.parse_name(args.config) if args.config
                  else C.select_kernel(kind, m, n, k, target))
    kern = table.kernels[cfg.name(kkind)]
    g = torch.Generator().manual_seed(0)
    packed = [t.cuda() for t in spec.pack_weight(torch.randn(n, k, generator=g)).values()]
    x = (torch.randn(m, k, generator=g) * 3).half().cuda()
    xq, sx, rest, tail, run_kw = bg.operands(spec, kind, x, n, args.a4x_share)
    kp = spec.layout.packed_k(packed[0])
    ops = (*rest, *packed, None)
    out = gemm_kernels._run(kkind, (cfg, kern), xq, sx, ops, n, kp, **run_kw)
    want = spec.reference(xq, sx, *rest, *packed, None, *tail, torch.float16)
    err = (out.float() - want.float()).abs().max().item()
    assert err <= 1e-2 * want.float().abs().max().item() + 1e-3, f"wrong result: {err}"
    for _ in range(args.iters):
        gemm_kernels._run(kkind, (cfg, kern), xq, sx, ops, n, kp, out, **run_kw)
    torch.cuda.synchronize()
    print(f"{cfg.label(kkind)} M={m} N={n} K={k}: ok (max err {err:.2e})")


if __name__ == "__main__":
    main()
