"""The engines tests/runtime/test_server.py serves, built by functions of a module of their
own: an engine process unpickles its factory by importing the factory's module, and this one
imports only the engine (test_server's HTTP server and clients cost each spawned child
~0.8 s of its ~4.4 s start on 2 cores).

* `DEVICE`: $QCOMPILE_SERVE_DEVICE, else cpu.
* `load_engine(artifact, **load)`: Engine.load on DEVICE with the module's KV budget.
* `failing_engine(artifact)`: an engine whose steps fail as a GPU out of memory does.
"""
from __future__ import annotations

import os

from qcompile.runtime.engine import Engine

DEVICE = os.environ.get("QCOMPILE_SERVE_DEVICE", "cpu")
# On the GPU each engine's KV cache is sized (Engine.load's default takes 85% of the free
# memory, so the module's second live engine would find none: its H100 run OOMed in session 15)
KV = {"kv_cache_bytes": 256 << 20} if DEVICE != "cpu" else {}


def load_engine(artifact, **load):
    """Engine.load on DEVICE with this module's KV budget (`load` may set its own)."""
    return Engine.load(artifact, device=DEVICE, **{**KV, **load})


def failing_engine(artifact):
    """An engine (built in the engine process) whose steps fail as a GPU out of memory does."""
    engine = load_engine(artifact, max_seqs=4)

    def broken():
        raise RuntimeError("CUDA error: out of memory (simulated)")
    engine.step = broken
    return engine
