"""Bring an exported graph to the form the other passes' patterns are written in.

Matches: `aten._assert_tensor_metadata` (dropped: it pins the export device), `aten.to.dtype`
and dtype-only `aten._to_copy` (a cast to the value's own dtype is dropped; others become
`aten._to_copy(x, dtype=...)`, the form pattern tracing produces).
"""
from __future__ import annotations

import torch

from .base import Lowering

aten = torch.ops.aten


def _cast_target(node):
    if node.target == aten.to.dtype and len(node.args) == 2 and not node.kwargs:
        return node.args[1]
    if node.target == aten._to_copy.default and set(node.kwargs) == {"dtype"}:
        return node.kwargs["dtype"]
    return None


def canonicalize(lowering: Lowering) -> int:
    graph, changed = lowering.gm.graph, 0
    for node in list(graph.nodes):
        if node.target == aten._assert_tensor_metadata.default:
            graph.erase_node(node)
            changed += 1
            continue
        dtype = _cast_target(node)
        if dtype is None:
            continue
        src = node.args[0]
        if src.meta["val"].dtype == dtype:
            node.replace_all_uses_with(src)
        elif node.target == aten._to_copy.default:
            continue  # already canonical
        else:
            with graph.inserting_before(node):
                cast = graph.call_function(aten._to_copy.default, (src,), {"dtype": dtype})
            cast.meta = dict(node.meta)
            node.replace_all_uses_with(cast)
        graph.erase_node(node)
        changed += 1
    return changed
