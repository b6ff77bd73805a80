"""Which GEMM kernels a lowered graph needs: its (kind, N, K) shapes and the tile configs
selection can pick for them at any M."""
import pytest
import torch

from qcompile.compiler.config import PRECISIONS
from qcompile.compiler.kernels import gemm_shapes, kernel_requests
from qcompile.compiler.pipeline import run_pipeline
from qcompile.compiler.config import CompileConfig
from qcompile.cutlass_templates.configs import select_config
from qcompile.models.loaders import load_checkpoint


@pytest.fixture(scope="module")
def ckpt(make_tiny_checkpoint):
    return load_checkpoint(make_tiny_checkpoint("llama"))


@pytest.mark.parametrize("precision,kind", [("w8a8", "w8a8"), ("w4a8", "w4a8"),
                                            ("w4a8-g64", "w4a8_g64")])
def test_graph_gemm_shapes_and_requests(ckpt, decoder_lowering, precision, kind):
    cfg = CompileConfig(precision=precision, kv="int4", dtype="float16", kernels="skip",
                        kv_key_centering="none")  # no calibration: GEMMs are the point
    low = decoder_lowering(ckpt, torch.float16)
    run_pipeline(low, cfg)
    c = ckpt.config
    want = sorted({(kind, c.q_size + 2 * c.kv_size, c.hidden_size), (kind, c.hidden_size, c.q_size),
                   (kind, 2 * c.intermediate_size, c.hidden_size),
                   (kind, c.hidden_size, c.intermediate_size),
                   ("w8a8", c.vocab_size, c.hidden_size)})  # the LM head (--lm-head auto)
    assert gemm_shapes(low.gm) == want
    names = {cfg.name(k) for k, cfg in kernel_requests(want)}
    for k, n, kk in want:  # every M the runtime may see is served by a shipped kernel
        for m in (1, 7, 16, 100, 4096):
            assert select_config(k, m, n, kk).name(k) in names
    # an sm90 artifact also ships what the target's own rows select (wgmma), and still every
    # portable kernel (the runtime falls back to them)
    from qcompile.cutlass_templates.configs import select_kernel
    sm90 = {cfg.name(k) for k, cfg in kernel_requests(want, "sm90")}
    assert names <= sm90
    for k, n, kk in want:
        for m in (1, 7, 16, 100, 600, 4096):
            kkind, c = select_kernel(k, m, n, kk, "sm90")
            assert c.name(kkind) in sm90
    if kind == "w8a8":
        assert any("_sm90_" in name for name in sm90)


def test_weight_only_graph_needs_no_kernels(ckpt, decoder_lowering):
    """gemm_w4a16 has no kernel (its reference runs everywhere): no shape, no request."""
    low = decoder_lowering(ckpt, torch.float32)
    run_pipeline(low, CompileConfig(precision="w4a16-g128", kv="fp16", kernels="skip"))
    assert any(n.target == torch.ops.qcompile.gemm_w4a16.default for n in low.gm.graph.nodes)
    assert gemm_shapes(low.gm) == [] and kernel_requests(gemm_shapes(low.gm)) == []


def test_float_graph_needs_no_kernels(ckpt, decoder_lowering):
    low = decoder_lowering(ckpt, torch.float32)
    run_pipeline(low, CompileConfig(precision="fp16", kv="fp16", kernels="skip"))
    assert gemm_shapes(low.gm) == [] and PRECISIONS["fp16"] is None


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc on PATH")
def test_artifact_ships_the_graphs_kernels(make_tiny_checkpoint, tmp_path):
    import json

    from qcompile.compiler.compile import compile_model
    from qcompile.cutlass_templates.build import read_kernel_table
    cfg = CompileConfig(target="sm80", precision="w4a8", kv="int4", quantizer="rtn")  # build
    art = compile_model(make_tiny_checkpoint("llama"), cfg, tmp_path / "art", progress=False)
    table = read_kernel_table(art / "kernels" / "sm80")
    manifest = json.loads((art / "manifest.json").read_text())
    assert table and sorted(e["name"] for e in table) == sorted(manifest["kernels"])
    assert {e["kind"] for e in table} == {"w4a8", "w8a8"}  # the linears', the head's
    assert all(e["target"] == "sm80" for e in table)


@pytest.mark.parametrize("target,kind", [("sm80", "w4a4x_s4"), ("sm90", "w4a4x")])
def test_w4a4_graph_asks_for_its_target_kind_with_the_channel_count(
        make_tiny_checkpoint, decoder_lowering, target, kind):
    """sm80 w4a4 graphs carry packed activations (4-bit blocks two codes a byte): they need
    the s4 kind, at K = the input channels, not x_q's bytes a row."""
    from qcompile.compiler.fmpq import linear_args
    ckpt = load_checkpoint(make_tiny_checkpoint("llama", intermediate_size=128))  # FMPQ's 64s
    cfg = CompileConfig(precision="w4a4", kv="fp16", dtype="float32", kernels="skip",
                        quantizer="rtn", target=target)
    low = decoder_lowering(ckpt, torch.float32)
    c = ckpt.config
    args = linear_args(c, {"fmpq": {"n8": {"layers.0.wo": 1}}}, target)
    run_pipeline(low, cfg, linear_args=args)
    shapes = gemm_shapes(low.gm)
    assert {k for k, _, _ in shapes} == {kind}
    assert {(n, k) for kk, n, k in shapes if kk == kind} == {
        (c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
        (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)}
