"""The W4A8 default on a GPU: QoQ keeps a share of the decoder linears at W8A8
(`--int8-linears`, compiler/sensitivity.py), so one program runs both GEMM kinds. A tiny Llama
(head dim 64) compiled the default way with its kernels built for this GPU serves on CUDA with
both kinds of kernel launched, none falling back to the reference, and logits bitwise equal to
the same artifact's reference GEMMs (test_smollm2_gpu.py's check, on a model CI can build).
Needs a GPU and nvcc."""
import json

import pytest
import torch

from qcompile.compiler.compile import compile_model
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.engine import Engine

pytestmark = pytest.mark.gpu

HEAD_DIM_64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64)


def test_default_w4a8_with_w8a8_linears_runs_both_kernels(make_tiny_checkpoint, tmp_path):
    major, _ = torch.cuda.get_device_capability()
    cfg = CompileConfig(target=f"sm{major}0", precision="w4a8", kv="int4", dtype="float16",
                        kernels="build", calib_samples=4, calib_seq_len=64, int8_linears=0.3)
    assert cfg.quantizer == "qoq" and CompileConfig().int8_linears > 0  # the default mixes
    art = compile_model(make_tiny_checkpoint("llama", **HEAD_DIM_64), cfg, tmp_path / "art",
                        progress=False)
    kept = json.loads((art / "manifest.json").read_text())["qoq"]["int8_linears"]
    assert kept, "no linear kept at W8A8: the test proves nothing"
    gpu = Engine.load(art, device="cuda", compile=False)
    stats = gpu.kernels.gemm
    ids = [[3, 40, 9, 100, 17, 5, 6, 7], [4, 47, 2]]
    logits = gpu.score(ids)
    got = [c.token_ids for c in gpu.generate(ids, max_new_tokens=8, stop_on_eos=False)]
    assert not stats.fallbacks, f"GEMMs ran the PyTorch reference: {stats.fallbacks}"
    kinds = {label.split("_")[0] for label in stats.launches}
    assert {"w4a8", "w8a8"} <= kinds, stats.launches
    gpu.kernels.gemm_on = False
    graphs, gpu.graphs = gpu.graphs, None
    try:
        ref_logits = gpu.score(ids)
        want = [c.token_ids for c in gpu.generate(ids, max_new_tokens=8, stop_on_eos=False)]
    finally:
        gpu.kernels.gemm_on, gpu.graphs = True, graphs
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    assert got == want
