"""The QoQ driver end to end on a tiny checkpoint: every step runs, the choices are reported
in the manifest, and the artifact serves."""
import json

import pytest

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import QOQ_FALLBACK_STEPS, CompileConfig
from qcompile.runtime.engine import Engine


@pytest.mark.parametrize("precision", ["w4a8", "w4a8-g64"])
def test_qoq_compiles_and_serves(make_tiny_checkpoint, tmp_path, precision):
    cfg = CompileConfig(precision=precision, kv="int4", dtype="float32", quantizer="qoq",
                        calib_samples=4, calib_seq_len=64, kernels="skip")
    art = compile_model(make_tiny_checkpoint("llama", tie=True), cfg, tmp_path / "art",
                        progress=False)
    report = json.loads((art / "manifest.json").read_text())["qoq"]
    assert report["steps"] == list(cfg.steps)
    assert len(report["smooth_alpha"]) == 2 * 2  # wo and w_down of 2 layers
    assert all(0.5 <= r <= 1.0 for r in report["clip_ratio"].values())
    assert set(report["step_seconds"]) >= {"rotate", "calibrate", "smooth", "clip", "gptq"}
    out = Engine.load(art).generate(["the quick brown fox"], max_new_tokens=4)[0]
    assert out.token_ids


def test_smoothquant_step_compiles(make_tiny_checkpoint, tmp_path):
    """The W8A8 baseline's `smoothquant` step: one alpha per wqkv and w_gate_up."""
    cfg = CompileConfig(precision="w8a8", kv="fp16", dtype="float32", quantizer="qoq",
                        qoq_steps="smoothquant", calib_samples=4, calib_seq_len=64,
                        kernels="skip")
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    report = json.loads((art / "manifest.json").read_text())["qoq"]
    assert sorted(report["smoothquant_alpha"]) == [f"layers.{i}.{n}" for i in range(2)
                                                   for n in ("w_gate_up", "wqkv")]
    assert "smooth_alpha" not in report
    assert Engine.load(art).generate(["the quick brown fox"], max_new_tokens=4)[0].token_ids


def test_qoq_needs_a_quantized_precision():
    with pytest.raises(ValueError, match="quantized --precision"):
        CompileConfig(precision="fp16", quantizer="qoq")
    with pytest.raises(ValueError, match="unknown steps"):
        CompileConfig(quantizer="qoq", qoq_steps="rotate,magic")


@pytest.mark.parametrize("precision, quantizer, steps", [
    ("fp16", "rtn", ""),
    ("w8a8", "qoq", "smoothquant"),
    ("w4a8", "qoq", "rotate,smooth,clip,gptq"),
    ("w4a8-g128", "qoq", "rotate,smooth,reorder,clip,gptq"),
    ("w4a8-g64", "qoq", "rotate,smooth,reorder,clip,gptq"),
    ("w4a16-g128", "rtn", ""),  # no measured QoQ recipe for weight-only (config.QOQ_RECIPES)
])
def test_default_quantizer_resolves_to_the_best_recipe(precision, quantizer, steps):
    """--quantizer auto (the default) is resolved when the config is made, so the manifest's
    config says what ran; an explicit choice is kept; qoq without steps takes the recipe."""
    cfg = CompileConfig(precision=precision)
    assert (cfg.quantizer, cfg.qoq_steps) == (quantizer, steps)
    assert CompileConfig.from_json(cfg.to_json()) == cfg
    assert CompileConfig(precision=precision, quantizer="rtn").steps == ()
    if quantizer == "qoq":
        assert CompileConfig(precision=precision, quantizer="qoq").qoq_steps == steps
        mine = CompileConfig(precision=precision, qoq_steps="rotate,clip")
        assert (mine.quantizer, mine.steps) == ("qoq", ("rotate", "clip"))


def test_qoq_without_a_recipe_takes_the_fallback_steps():
    cfg = CompileConfig(precision="w4a16-g128", quantizer="qoq")
    assert cfg.qoq_steps == QOQ_FALLBACK_STEPS
    with pytest.raises(ValueError, match="quantized --precision"):
        CompileConfig(precision="fp16", quantizer="qoq")
