"""The weight-only W4A16 g128 baseline end to end on a tiny checkpoint: the CLI compiles it
(with the default --kernels build, which must ask for no kernel), the program holds the
reference-only `gemm_w4a16` and no activation quantization, the engine serves it, and QoQ's
weight steps run for it."""
import json

import pytest
import torch

from qcompile.compiler.cli import main
from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import perplexity


def _program_ops(art) -> set[str]:
    ep = torch.export.load(art / "program.pt2")
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_cli_compiles_and_engine_serves(make_tiny_checkpoint, tmp_path):
    src, out = make_tiny_checkpoint("llama"), tmp_path / "art"
    assert main([str(src), "--precision", "w4a16-g128", "--kv", "int4", "--dtype", "float32",
                 "-o", str(out), "-q"]) == 0  # --kernels build (default): nothing to build
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compile"]["precision"] == "w4a16-g128" and manifest["kernels"] == []
    assert json.loads((out / "kernels" / "sm80" / "kernels.json").read_text()) == []
    ops = _program_ops(out)
    assert "qcompile.gemm_w4a16.default" in ops
    assert not any("quant_a8" in op or "gemm_w4a8" in op for op in ops)
    engine = Engine.load(out)
    assert engine.generate(["the quick brown fox"], max_new_tokens=4)[0].token_ids

    ref = compile_model(src, CompileConfig(precision="fp16", kv="int4", dtype="float32",
                                           kernels="skip"), tmp_path / "fp", progress=False)
    ppl, ppl_fp = (perplexity(Engine.load(a), 2, 64, progress=False).perplexity
                   for a in (out, ref))
    assert abs(ppl / ppl_fp - 1) < 0.25, (ppl, ppl_fp)  # 4-bit weights, float activations


def test_qoq_weight_steps(make_tiny_checkpoint, tmp_path):
    """QoQ's steps are defined for weight-only schemes too: smoothing's search then sees float
    activations (AWQ's objective), clipping searches the float16-scale grid."""
    cfg = CompileConfig(precision="w4a16-g128", kv="int4", dtype="float32", quantizer="qoq",
                        qoq_steps="rotate,smooth_attention,smooth,reorder,clip",
                        calib_samples=4, calib_seq_len=64, kernels="skip")
    art = compile_model(make_tiny_checkpoint("llama", tie=True), cfg, tmp_path / "art",
                        progress=False)
    report = json.loads((art / "manifest.json").read_text())["qoq"]
    assert len(report["smooth_alpha"]) == 2 * 2
    assert all(0.5 <= r <= 1.0 for r in report["clip_ratio"].values())
    assert Engine.load(art).generate(["the quick brown fox"], max_new_tokens=4)[0].token_ids
