"""One eager launch of a paged attention kernel on a synthetic cache, for Nsight Compute:

    ncu --set full -k regex:qc_attn python bench/profile_attention.py --fmt int4 --batch 64 \
        --context 4096 --new 1
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from attention import HEADS, ours_fns


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fmt", default="int4", choices=("int4", "fp16"))
    p.add_argument("--heads", default="8B", choices=tuple(HEADS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--new", type=int, default=1, help="new tokens per sequence")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--entry", choices=("kt", "decode", "prefill", "prefill2"), help="default: the plan's")
    args = p.parse_args(argv)
    from qcompile.runtime import attention_kernels, gemm_kernels
    major = torch.cuda.get_device_capability()[0]
    kdir = Path(os.environ.get("QCOMPILE_KERNEL_DIR", f"build/kernels_sm{major}0"))
    attention_kernels.enable(gemm_kernels.enable(kdir))
    hq, hkv, d = HEADS[args.heads]
    gen = torch.Generator(device="cuda").manual_seed(0)
    fns, _ = ours_fns(args.fmt, args.batch, args.context, args.new, hq, hkv, d, gen,
                      attention_kernels.launch_attention, entry=args.entry)
    for _ in range(args.iters):
        fns[0]()
    torch.cuda.synchronize()
    print(dict(attention_kernels.STATS.launches))


if __name__ == "__main__":
    main()
