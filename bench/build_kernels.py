"""Build every GEMM and attention kernel that the GPU tests and the benchmarks use, for one
target, into a kernel-table directory (kernels.json + binaries) to carry to the GPU machine.

    python bench/build_kernels.py --target sm90 --out build/kernels_sm90
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qcompile.compiler.kernels import kernel_requests
from qcompile.cutlass_templates.attention_configs import ATTN_KINDS, HEAD_DIMS, AttnConfig
from qcompile.cutlass_templates.build import build_kernels, write_kernel_table
from qcompile.cutlass_templates.configs import KINDS

# (N, K): the GPU tests' edge shapes and the Llama-3-8B / Llama-2-7B linears of the benchmark.
TEST_SHAPES = [(n, k) for n in (192, 1536, 4096, 11008) for k in (576, 4096, 14336)]
BENCH_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (12288, 4096),
                (22016, 4096), (4096, 11008)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="sm90", choices=("sm80", "sm90"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int)
    p.add_argument("--only", choices=("gemm", "attention"), help="one family (default: both)")
    args = p.parse_args(argv)
    shapes = [(kind, n, k) for kind in KINDS for n, k in TEST_SHAPES + BENCH_SHAPES]
    gemm = kernel_requests(shapes, args.target) if args.only != "attention" else []
    attention = ([(kind, AttnConfig(d)) for kind in ATTN_KINDS for d in HEAD_DIMS]
                 if args.only != "gemm" else [])
    binaries = build_kernels(gemm + attention, args.target, jobs=args.jobs)
    print(f"{len(binaries)} kernels -> {write_kernel_table(binaries, args.out)}")


if __name__ == "__main__":
    main()
