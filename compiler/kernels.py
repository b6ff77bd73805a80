"""The kernels a lowered graph needs, built for the artifact's target.

Every quantized GEMM node whose scheme row has kernels gives (kind, N, K); each needs the kernels that selection can pick
for it at any M on the target (`kernels_for`), because M (tokens per step) is only known at
run time. Every paged attention node with float16 activations needs the attention binary of
its KV format and head dim (decode, prefill, merge and the KV encode).
The binaries and their table go to the artifact's `kernels/<target>/`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import fx

import qcompile.runtime.ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.compiler.schemes import WITH_KERNELS, spec_of_call
from qcompile.cutlass_templates.attention_configs import HEAD_DIMS, KIND_OF_FORMAT, AttnConfig
from qcompile.cutlass_templates.configs import kernels_for
from qcompile.runtime.ops import ATTENTION_OPS


def _named_args(node: fx.Node) -> dict:
    names = [arg.name for arg in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


_GEMM_OPS = {s.op for s in WITH_KERNELS}


def gemm_shapes(gm: fx.GraphModule) -> list[tuple[str, int, int]]:
    """(kind, N, K) of every GEMM in the graph that has kernels (its scheme row's kernel kind;
    a row without kernels, such as the weight-only W4A16 baseline, runs its reference on every
    device and asks for nothing here), sorted, without repeats."""
    shapes = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _GEMM_OPS:
            args = _named_args(node)
            spec = spec_of_call(node.target, args)
            if spec is not None and spec.kernel is not None:
                width = args["xq"].meta["val"].shape[-1]
                shapes.add((spec.kernel_kind(args), args["n"], spec.gemm_k(width, args)))
    return sorted(shapes)


def kernel_requests(shapes, target: str = "sm80") -> list[tuple[str, object]]:
    """(kernel kind, config) of every kernel the runtime may launch for these (kind, N, K) on
    `target` (sm90 adds its wgmma templates)."""
    reqs = {req for kind, n, k in shapes for req in kernels_for(kind, n, k, target)}
    return sorted(reqs, key=lambda r: r[1].name(r[0]))


_ATTENTION = {op: fmt for fmt, op in ATTENTION_OPS.items()}


def attention_requests(gm: fx.GraphModule) -> list[tuple[str, AttnConfig]]:
    """(kind, config) of the attention binaries the graph's paged attention nodes use; none
    for activations other than float16 (they run the reference)."""
    reqs = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION:
            q = node.args[0].meta["val"]
            if q.dtype == torch.float16 and q.shape[-1] in HEAD_DIMS:
                reqs.add((KIND_OF_FORMAT[_ATTENTION[node.target]], AttnConfig(q.shape[-1])))
    return sorted(reqs, key=lambda r: r[1].name(r[0]))


def graph_kernel_requests(gm: fx.GraphModule, target: str) -> list[tuple[str, object]]:
    """Every kernel the lowered graph may launch on `target`: GEMMs and attention."""
    return kernel_requests(gemm_shapes(gm), target) + attention_requests(gm)


def write_kernels(requests, target: str, dest: Path, progress: bool) -> list[dict]:
    """Build the requested kernels into dest (kernels.json + binaries); their table entries."""
    from qcompile.cutlass_templates.build import build_kernels, read_kernel_table, write_kernel_table
    dest.mkdir(parents=True, exist_ok=True)
    if not requests:
        (dest / "kernels.json").write_text("[]\n")
        return []
    write_kernel_table(build_kernels(requests, target, progress=progress), dest)
    return read_kernel_table(dest)
