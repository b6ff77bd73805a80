"""`--precision fp8` end to end on CPU: the config accepts it only for sm90 (one-line error
otherwise) and without QoQ; a tiny checkpoint compiles to an artifact of e4m3 weights, the
e4m3 activation quantizers fused into RMSNorm / SwiGLU and no kernels, and serves on CPU with
the perplexity of its fp16 twin."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import safetensors.torch
import torch

from qcompile.compiler.cli import main
from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.artifact import load_program
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import perplexity

BASE = dict(kv="fp16", dtype="float32", kernels="build", quantizer="rtn")


def test_fp8_needs_sm90_and_rtn(tmp_path, capsys):
    assert CompileConfig(precision="fp8", target="sm90").quantizer == "rtn"  # auto: no recipe
    with pytest.raises(ValueError, match="--precision fp8 needs --target sm90, got --target "
                                         "sm80"):
        CompileConfig(precision="fp8")
    with pytest.raises(ValueError, match="--quantizer qoq does not support --precision fp8"):
        CompileConfig(precision="fp8", target="sm90", quantizer="qoq")
    assert main(["x.gguf", "--precision", "fp8", "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --target sm90" in err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def artifacts(make_tiny_checkpoint, tmp_path_factory):
    src, out = make_tiny_checkpoint("llama"), tmp_path_factory.mktemp("fp8")
    return {p: compile_model(src, CompileConfig(precision=p, target="sm90", **BASE),
                             out / p, progress=False) for p in ("fp16", "fp8")}


def test_artifact(artifacts):
    art = artifacts["fp8"]
    m = json.loads((art / "manifest.json").read_text())
    assert {p["name"]: p["matches"] for p in m["passes"]} == {
        "canonicalize": 28, "swap_gemm": 8, "fuse_rmsnorm_quant": 4, "fuse_swiglu_quant": 2}
    assert m["kernels"] == [] and m["compile"]["target"] == "sm90"  # torch._scaled_mm on GPU
    weights = safetensors.torch.load_file(art / "weights.safetensors")
    codes = [n for n, t in weights.items() if t.dtype == torch.float8_e4m3fn]
    assert len(codes) == 8 and all(weights[n].shape[0] % 16 == 0 for n in codes)
    ops = Counter(n.target for n in load_program(art).graph_module.graph.nodes
                  if n.op == "call_function")
    assert ops[torch.ops.qcompile.gemm_fp8.default] == 8
    # the fused quantizers are inline ATen now; o_proj's input stays the opaque op
    assert ops[torch.ops.qcompile.quant_fp8.default] == 2


def test_serves_with_fp16_perplexity(artifacts):
    ppl = {p: perplexity(Engine.load(art), num_seqs=4, seq_len=128, progress=False).perplexity
           for p, art in artifacts.items()}
    assert all(math.isfinite(v) for v in ppl.values())
    # measured 0.6% apart on this fixture: e4m3 keeps ~2^-4 relative per operand
    assert abs(math.log(ppl["fp8"] / ppl["fp16"])) < 0.02, ppl
    engine = Engine.load(artifacts["fp8"])
    done = engine.generate(["the quick brown fox"], max_new_tokens=5)[0]
    assert len(done.token_ids) == 5
