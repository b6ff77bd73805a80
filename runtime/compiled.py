"""The program's glue under TorchInductor (Engine.load's `compile`): torch.compile with one
graph for every step shape (`torch_compile`), the graph edit both compile paths make
(`inline_act_quants`), and Inductor's cache in qcompile's cache folder (`persistent_cache`).
AOTInductor's packages are in runtime/aot.py."""
from __future__ import annotations

import os

import torch


def torch_compile(program):
    """The program under torch.compile, one graph for every step shape: dynamic shapes without
    duck sizing, which equated the step inputs' storage offsets in the staging buffer with
    unrelated sizes and recompiled per decode bucket (six ~30 s compiles of the 1B shape on an
    H100). A dimension of one would still specialise a graph of its own (0/1 specialisation),
    so compiled steps never have one (`Engine._layout` adds a padding row; decode buckets start
    at 2). Size-oblivious reasoning (`backed_size_oblivious`) avoids that too but made the
    compile itself over 5x slower on the CPU. Rounding to the activation dtype where eager does
    (before quantization), so that the compiled program produces the reference ops' int8
    codes."""
    from torch.fx.experimental import _config as fx_config
    inline_act_quants(program)
    compiled = torch.compile(program, dynamic=True, options={"emulate_precision_casts": True})

    def run(*args):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)
    return run


def inline_act_quants(gm: torch.fx.GraphModule) -> int:
    """Call each activation quantizer's ATen reference where the graph still calls its opaque
    op (the compiler's fusion passes inline it after RMSNorm and SiLU*Mul; the attention
    output, wo's input, keeps the op), so that Inductor fuses it into one kernel: eager, it is
    ~9 ATen kernels a layer (abs, max, div, round, clamp, casts, sum; ~0.25 ms of a 1B decode
    step on an H100). The same maths, so the same codes. Returns the number of calls inlined."""
    from qcompile.compiler.schemes import ACT_QUANTS
    refs = {act.op: act.reference for act in ACT_QUANTS}
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in refs:
            node.target = refs[node.target]
            n += 1
    if n:
        gm.recompile()
    return n


def persistent_cache() -> None:
    """Inductor's caches (compiled graphs, autotuning) under qcompile's cache folder unless
    TORCHINDUCTOR_CACHE_DIR is set: its default is under /tmp, which a reboot clears, and a
    warm load should find the compiled glue of its last run (issue 13: load to first token
    in seconds when warm)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from qcompile.models.default_model import cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
