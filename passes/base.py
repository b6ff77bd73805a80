"""What every pass works on and reports.

A `Lowering` is the exported graph with its weights lifted to placeholders: the GraphModule
takes (weights..., user inputs...) flat, and `weights` maps each weight placeholder's name to
its tensor. Passes rewrite the graph and may add or drop weights; the final program keeps
weights as inputs, so program.pt2 holds only the graph and weights.safetensors holds every
tensor once.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import fx

log = logging.getLogger("qcompile.passes")


@dataclass
class Lowering:
    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]  # placeholder name -> value
    inputs: tuple[str, ...]           # user-input placeholder names, in call order
    origin: dict[str, str] = field(default_factory=dict)  # placeholder -> exported module path

    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram) -> "Lowering":
        sig = ep.graph_signature
        values = {**ep.state_dict, **ep.constants}
        weights, inputs, origin = {}, [], {}
        for spec in sig.input_specs:
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
                inputs.append(spec.arg.name)
            else:
                # detached: packing must not record autograd history that pins float weights
                weights[spec.arg.name] = values[spec.target].detach()
                origin[spec.arg.name] = spec.target
        return cls(ep.graph_module, weights, tuple(inputs), origin)

    def placeholders(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}

    def weight_of(self, node) -> torch.Tensor | None:
        """The tensor behind a weight placeholder node, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.weights.get(node.name)
        return None

    def add_weight(self, name: str, value: torch.Tensor) -> fx.Node:
        """A new weight placeholder, placed before the user inputs."""
        if name in self.weights:
            raise ValueError(f"weight {name!r} already exists")
        first_input = self.placeholders()[self.inputs[0]]
        with self.gm.graph.inserting_before(first_input):
            node = self.gm.graph.placeholder(name)
        node.meta["val"] = self.fake_mode.from_tensor(value)
        self.weights[node.name] = value
        return node

    @property
    def fake_mode(self):
        vals = [n.meta["val"] for n in self.placeholders().values() if "val" in n.meta]
        return torch._guards.detect_fake_mode(vals)

    def call(self, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        """Insert `target(*args)` at the graph's current insertion point, with its
        meta["val"] computed from the fake values of its inputs."""
        node = self.gm.graph.call_function(target, args, kwargs or {})
        fake = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
        with self.fake_mode:
            node.meta["val"] = target(*fx.node.map_aggregate(args, fake),
                                      **fx.node.map_aggregate(kwargs or {}, fake))
        return node

    def drop_unused_weights(self) -> int:
        dropped = 0
        for name, node in self.placeholders().items():
            if name in self.weights and not node.users:
                self.gm.graph.erase_node(node)
                del self.weights[name]
                dropped += 1
        return dropped

    def finish(self) -> None:
        self.gm.graph.eliminate_dead_code()
        self.drop_unused_weights()
        self.gm.graph.lint()
        self.gm.recompile()

    def __call__(self, *inputs):
        return self.gm(*self.weights.values(), *inputs)


@dataclass(frozen=True)
class PassResult:
    name: str
    matches: int
    seconds: float


def run_pass(fn: Callable[..., int], lowering: Lowering, *args) -> PassResult:
    """Time one pass, clean up after it, and dump the graph before and after when
    QCOMPILE_DUMP_PASSES=DIR is set."""
    name = getattr(fn, "pass_name", None) or fn.__name__
    dump = os.environ.get("QCOMPILE_DUMP_PASSES")
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        (Path(dump) / f"{name}.before.py").write_text(lowering.gm.code)
    t0 = time.perf_counter()
    matches = fn(lowering, *args)
    lowering.finish()
    result = PassResult(name, matches, time.perf_counter() - t0)
    if dump:
        (Path(dump) / f"{name}.after.py").write_text(lowering.gm.code)
    log.info("pass %s: %d matches in %.2fs", name, matches, result.seconds)
    return result


def call_targets(gm: fx.GraphModule) -> list:
    """Targets of all call_function nodes (for tests and reports)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]
