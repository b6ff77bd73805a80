"""Fixtures for the loader's security tests (helpers in hostile.py).

* `served_artifact` (session): a tiny llama compiled to an fp16 artifact (fp16 KV, no kernels),
  never modified; tests change a copy (`artifact_copy`).
* `tiny_program` (session): program.pt2 bytes of a small exported program (a symbolic batch
  dimension, so its JSON holds sympy expressions), saved by torch.export.save as qcompile does.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qcompile.compiler.config import CompileConfig

SERVED_CFG = CompileConfig(precision="fp16", kv="fp16", dtype="float32", kernels="skip")


@pytest.fixture(scope="session")
def served_artifact(tiny_artifact) -> Path:
    return tiny_artifact(SERVED_CFG)


@pytest.fixture
def artifact_copy(served_artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(served_artifact, dst)
    return dst


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return (x * 2 + 1).sum(0)


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory) -> bytes:
    ep = torch.export.export(_Tiny(), (torch.ones(3, 4),),
                             dynamic_shapes=({0: torch.export.Dim("T", min=2)},))
    ep.example_inputs = None
    path = tmp_path_factory.mktemp("tiny_program") / "program.pt2"
    torch.export.save(ep, path)
    return path.read_bytes()
