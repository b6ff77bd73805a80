"""rotate_blocks: a linear's input rotated in blocks at run time, the rotation's transpose
already folded into its weight (compiler/fmpq.py's `down_rotation`: w_down's input, the SwiGLU
output, which no offline rotation reaches).

Matches: `aten.linear(x, W)` whose weight is one of `rotations` (canonical name -> H [b, b],
orthonormal). Emits: per distinct H one weight placeholder `fmpq_rotation_<b>` (the
activation dtype) and, before each such linear, x -> view [-1, b] -> mm H -> view [.., K]
(core ATen ops, as passes/rotate_kv.py: Inductor runs the mm on cuBLAS, ONNX export takes it
as a MatMul). Runs before swap_gemm, so the quantizer it inserts reads the rotated input.
Exact in float when W already holds W B (B = diag(H, H, ..)): x B (W B)^T = x W^T.
Invariants: every name in `rotations` is a linear of the graph (else ValueError: the weights
and the graph would disagree); K a multiple of b; returns the number of linears rotated."""
from __future__ import annotations

import torch

from qcompile.compiler.calibrate import canonical_name

from .base import Lowering

aten = torch.ops.aten


def rotate_blocks(lowering: Lowering, rotations: dict[str, torch.Tensor] | None = None) -> int:
    if not rotations:
        return 0
    graph, done = lowering.gm.graph, set()
    for node in list(graph.nodes):
        if node.target != aten.linear.default:
            continue
        name = canonical_name(lowering.origin.get(node.args[1].name, node.args[1].name))
        if name not in rotations:
            continue
        h = rotations[name]
        x = node.args[0]
        val = x.meta["val"]
        k, b = val.shape[-1], h.shape[0]
        if not isinstance(k, int) or k % b:
            raise ValueError(f"rotate_blocks: {name}'s input width {k} is not a multiple of "
                             f"the rotation's {b}")
        rest = list(val.shape[1:])
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(f"rotate_blocks: {name}'s input has symbolic sizes {rest} past "
                             "the token dimension")
        wname = f"fmpq_rotation_{b}"
        if wname in lowering.weights:
            if not torch.equal(lowering.weights[wname].float(), h.to(val.dtype).float()):
                raise ValueError(f"rotate_blocks: two different {b}-channel rotations")
        else:
            lowering.add_weight(wname, h.to(val.dtype))
        hnode = lowering.placeholders()[wname]
        with graph.inserting_before(node):
            flat = lowering.call(aten.view.default, (x, [-1, b]))
            rot = lowering.call(aten.mm.default, (flat, hnode))
            node.args = (lowering.call(aten.view.default, (rot, [-1, *rest])), *node.args[1:])
        done.add(name)
    missing = set(rotations) - done
    if missing:
        raise ValueError(f"rotate_blocks: no linear of the graph reads {sorted(missing)}")
    return len(done)
