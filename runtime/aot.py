"""AOTInductor for the program's glue (`Engine.load(compile="aot")`, `--compile aot`).

`torch.compile` re-traces the program with Dynamo at every load: on the CPU a 16-layer program
spends ~12 of its 14 s of warm load there (Inductor's own cache is hit), and the H100's warm
load of the 1B shape took 36 s. But the artifact's program is already a traced graph with
symbolic batch dimensions, which is what AOTInductor compiles: once per (program, torch, device)
into a package (a shared library and its Triton / C++ kernels) under
`~/.cache/qcompile/aot/`; a later load maps it in milliseconds, and its steps launch from C++.
The qcompile ops stay calls through the dispatcher (AOTInductor's proxy executor), so the
kernel tables and the reference fallbacks work as under torch.compile. The same graph edit as
torch.compile's path: the activation quantizers left opaque are inlined as ATen
(`compiled.inline_act_quants`); fp16 is rounded where eager rounds (`emulate_precision_casts`).
(`compiled.fast_kv_rotation`, opt-in under torch.compile, is not applied here.)

The runner reads no tensor created in inference mode (its custom-op calls bump version
counters), so an engine on this path runs its device step under `torch.no_grad()`.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from qcompile.compiler.artifact import PROGRAM

VERSION = 3  # of the package recipe below; part of the cache key (3: no fast_kv_rotation)
INDUCTOR_CONFIGS = {"emulate_precision_casts": True}


def package_path(art, device: torch.device) -> Path:
    """The package's place in the cache: keyed by the program's sha256, torch, the device
    (GPU capability or "cpu") and this recipe."""
    from qcompile.models.default_model import cache_dir
    where = "cpu" if device.type == "cpu" else \
        "sm{}{}".format(*torch.cuda.get_device_capability(device))
    key = hashlib.sha256("|".join([
        art.manifest["files"][PROGRAM]["sha256"], torch.__version__, where,
        str(VERSION), repr(sorted(INDUCTOR_CONFIGS.items()))]).encode()).hexdigest()[:32]
    return cache_dir() / "aot" / f"{key}.pt2"


def load_or_compile(art, example_args: tuple, device: torch.device, progress: bool = False):
    """The program's AOTInductor runner (a callable over the program's inputs returning its
    outputs), compiled and cached on the first call for this program, torch and device.
    `example_args`: one call's inputs (shapes of any step; the batch dimensions stay
    symbolic)."""
    from .artifact import load_program
    from .compiled import inline_act_quants
    path = package_path(art, device)
    if not path.is_file():
        t = time.perf_counter()
        if progress:
            print(f"qcompile: compiling the program with AOTInductor for {device} (once; "
                  f"cached in {path.parent})", flush=True)
        ep = load_program(art.path)
        if device.type != "cpu":  # the program is recorded on the CPU (device-free weights):
            # AOTInductor checks its recorded inputs' device against the example inputs'
            from torch.export.passes import move_to_device_pass
            ep = move_to_device_pass(ep, device)
        inline_act_quants(ep.graph_module)
        ep.example_inputs = (tuple(example_args), {})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(tmp), inductor_configs=dict(INDUCTOR_CONFIGS))
        os.replace(tmp, path)  # atomic: a concurrent loader sees all of it or none
        if progress:
            print(f"qcompile: AOTInductor compile {time.perf_counter() - t:.0f} s", flush=True)
    index = _device_index(device)
    probe(path, index)
    runner = torch._inductor.aoti_load_package(
        str(path), **({"device_index": index} if index >= 0 else {}))

    def run(*args):
        return tuple(runner(*args))
    return run


# Loads a package the way load_or_compile does, in a process of its own.
_PROBE = ("import sys, torch, qcompile.runtime.ops; i = int(sys.argv[2]); "
          "torch._inductor.aoti_load_package(sys.argv[1], **({'device_index': i} if i >= 0 "
          "else {}))")


def _device_index(device: torch.device) -> int:
    """The CUDA device the package loads on (-1: the current one)."""
    return device.index if device.type == "cuda" and device.index is not None else -1


def probe(path: Path, device_index: int = -1) -> None:
    """Load the package once in a child process before this one does: on an H100 (torch
    2.11) AOTInductor's loader died of a segmentation fault on a package it had just
    compiled, which would take qserve or qbench down with it; a child that dies raises here,
    and Engine.load falls back to torch.compile with a warning. A probe that passed leaves
    `<package>.ok` beside the package, so a warm load pays it once (~3 s: the child imports
    torch)."""
    ok = path.with_suffix(".ok")
    if ok.is_file():
        return
    r = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(device_index)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no message"])[-1][:200]
        why = f"killed by signal {-r.returncode}" if r.returncode < 0 else tail
        raise RuntimeError(f"loading the AOTInductor package {path.name} in a test process "
                           f"failed ({why})")
    ok.touch()
