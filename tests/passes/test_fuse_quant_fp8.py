"""The fusion passes with the FP8 baseline's activation quantizer: `quant_fp8` after an RMSNorm
/ SiLU*Mul becomes `quant_fp8_ref` as ATen (bitwise the same numerics), and TorchInductor emits
producer + e4m3 quantization as one kernel. The int8 quantizer's cases are in
test_fuse_quant.py; these are the same rules, matched per quantizer of the scheme rows."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.capture import KVSpec, example_inputs
from qcompile.compiler.schemes import FP8, GEMM_OPS
from qcompile.models.decoder import rms_norm
from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fuse_rmsnorm_quant import fuse_rmsnorm_quant
from qcompile.passes.fuse_swiglu_quant import fuse_swiglu_quant
from qcompile.passes.swap_gemm import swap_gemm

aten = torch.ops.aten
QUANT_FP8 = torch.ops.qcompile.quant_fp8.default
QUANT_A8 = torch.ops.qcompile.quant_a8.default
LAYERS = 2  # the tiny model: 2 norms before GEMMs and 1 SwiGLU per layer, 4 linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_fusions(tiny_llama, decoder_lowering, dtype):
    inputs = example_inputs(KVSpec.of(tiny_llama.config, "fp16", 16, dtype))
    low = decoder_lowering(tiny_llama, dtype)
    run_pass(canonicalize, low)
    assert run_pass(swap_gemm, low, FP8).matches == 4 * LAYERS
    before = Counter(call_targets(low.gm))
    ref = low(*inputs)

    norms, swiglus = run_pass(fuse_rmsnorm_quant, low), run_pass(fuse_swiglu_quant, low)

    assert (norms.matches, swiglus.matches) == (2 * LAYERS, LAYERS)
    after = Counter(call_targets(low.gm))
    assert before[QUANT_FP8] == 4 * LAYERS and after[QUANT_FP8] == LAYERS  # o_proj inputs
    assert before[QUANT_A8] == after[QUANT_A8] == 0
    assert after[aten.amax.default] == 3 * LAYERS and after[aten.round.default] == 0
    # wqkv, w_gate_up and w_down read e4m3 codes computed inline after their producer
    inline = [g.args[0] for g in low.gm.graph.nodes if g.target == GEMM_OPS[FP8]
              and g.args[0].target == aten._to_copy.default]
    assert len(inline) == 3 * LAYERS
    assert all(xq.kwargs["dtype"] == torch.float8_e4m3fn for xq in inline)
    out = low(*inputs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


class _NormQuant(torch.nn.Module):
    def __init__(self, users: int = 1):
        super().__init__()
        self.users = users
        self.register_buffer("w", torch.rand(32, dtype=torch.float16) + 0.5)

    def forward(self, x):
        y = rms_norm(x, self.w, 1e-5)
        return QUANT_FP8(y) + ((y * 2,) if self.users > 1 else ())


class _SwiGLUQuant(torch.nn.Module):
    def forward(self, g, u):
        return QUANT_FP8(F.silu(g) * u)


def _small(module, *args) -> Lowering:
    low = Lowering.from_exported(torch.export.export(module, args))
    run_pass(canonicalize, low)
    return low


def test_norm_with_two_users_does_not_match():
    low = _small(_NormQuant(users=2), torch.randn(4, 32, dtype=torch.float16))
    code = low.gm.code
    assert run_pass(fuse_rmsnorm_quant, low).matches == 0 and low.gm.code == code


_KERNEL = re.compile(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?r'''(.*?)'''",
                     re.M | re.S)


@pytest.mark.parametrize("case", ["rmsnorm", "swiglu"])
def test_inductor_emits_one_kernel(case):
    """fp16 [4, 32]: one C++ kernel holds the producer and the e4m3 store; no qcompile op is
    left. Inductor keeps the producer in float32 where eager rounds to fp16 first, so a code
    may move by one e4m3 step."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float16)
    module, args, fuse, producer = ((_NormQuant(), (x,), fuse_rmsnorm_quant, "rsqrt")
                                    if case == "rmsnorm" else
                                    (_SwiGLUQuant(), (x, torch.randn_like(x)), fuse_swiglu_quant,
                                     "silu"))
    low = _small(module, *args)
    assert run_pass(fuse, low).matches == 1
    xq_ref, s_ref = low(*args)
    torch._dynamo.reset()
    fn = torch.compile(low.gm, backend="inductor", dynamic=False, fullgraph=True)
    (xq, s), (src,) = run_and_get_code(fn, *low.weights.values(), *args)
    kernels = _KERNEL.findall(src)
    assert len(kernels) == 1 and producer in kernels[0][0], [k for k, _ in kernels]
    assert "Float8_e4m3fn" in kernels[0][1] and "qcompile" not in src
    steps = xq.view(torch.uint8).int() - xq_ref.view(torch.uint8).int()  # same-sign codes
    assert steps.abs().max() <= 1
    torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=0)
