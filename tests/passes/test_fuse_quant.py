"""passes/fuse_rmsnorm_quant.py and passes/fuse_swiglu_quant.py: the opaque `quant_a8` after
an RMSNorm / SiLU*Mul becomes `quant_a8_ref` as ATen, and TorchInductor emits producer +
quantization as one kernel.

The fusions move no arithmetic (the op's reference is what gets inlined), so eager numerics
are bit-identical to the unfused graph.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.capture import KVSpec, example_inputs
from qcompile.compiler.config import W4A8, W4A8_G128, W8A8
from qcompile.models.decoder import rms_norm
from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.fuse_rmsnorm_quant import fuse_rmsnorm_quant
from qcompile.passes.fuse_swiglu_quant import fuse_swiglu_quant
from qcompile.passes.swap_gemm import swap_gemm
from qcompile.compiler.schemes import GEMM_OPS

aten = torch.ops.aten
QUANT_A8 = torch.ops.qcompile.quant_a8.default
LAYERS = 2
NORMS_BEFORE_GEMM = 2 * LAYERS   # attn_norm -> wqkv, mlp_norm -> w_gate_up (final norm: LM head)
SWIGLUS = LAYERS                 # silu(gate) * up -> w_down
QUANTS = 4 * LAYERS              # one per swapped linear: wqkv, wo, w_gate_up, w_down
# W8A8 and the group schemes never read the per-token sum (2-output pattern); per-channel
# W4A8 does (3-output pattern).
SCHEMES = {"w8a8": W8A8, "w4a8": W4A8, "w4a8-g128": W4A8_G128}


def _quantized(ckpt, decoder_lowering, dtype, scheme) -> Lowering:
    low = decoder_lowering(ckpt, dtype)
    run_pass(canonicalize, low)
    run_pass(swap_gemm, low, scheme)
    return low


def _ops(low) -> Counter:
    return Counter(call_targets(low.gm))


def _producer_ops(node, depth: int = 12) -> set:
    """Targets of the nodes `depth` steps upstream of node (through all inputs)."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        seen |= {n.target for n in frontier}
    return seen


@pytest.mark.parametrize("precision", list(SCHEMES))
def test_rmsnorm_quant(tiny_llama, decoder_lowering, precision):
    cfg = tiny_llama.config
    inputs = example_inputs(KVSpec.of(cfg, "fp16", 16, torch.float32))
    low = _quantized(tiny_llama, decoder_lowering, torch.float32, SCHEMES[precision])
    before = _ops(low)
    ref = low(*inputs)

    res = run_pass(fuse_rmsnorm_quant, low)

    assert res.matches == NORMS_BEFORE_GEMM
    after = _ops(low)
    assert before[QUANT_A8] == QUANTS and after[QUANT_A8] == QUANTS - NORMS_BEFORE_GEMM
    assert after[aten.rsqrt.default] == before[aten.rsqrt.default] == 2 * LAYERS + 1
    assert after[aten.amax.default] == after[aten.round.default] == NORMS_BEFORE_GEMM
    # The per-token sum is emitted only where the GEMM reads it.
    assert after[aten.sum.dim_IntList] == (NORMS_BEFORE_GEMM if precision == "w4a8" else 0)
    # wqkv and w_gate_up now read int8 codes computed inline right after the norm.
    inline = [g.args[0] for g in low.gm.graph.nodes if g.target == GEMM_OPS[SCHEMES[precision]]
              and g.args[0].target == aten._to_copy.default]
    assert len(inline) == NORMS_BEFORE_GEMM
    assert all(xq.kwargs["dtype"] == torch.int8 and aten.rsqrt.default in _producer_ops(xq)
               for xq in inline)
    out = low(*inputs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("precision", list(SCHEMES))
def test_swiglu_quant(tiny_llama, decoder_lowering, precision):
    cfg = tiny_llama.config
    inputs = example_inputs(KVSpec.of(cfg, "fp16", 16, torch.float32))
    low = _quantized(tiny_llama, decoder_lowering, torch.float32, SCHEMES[precision])
    before = _ops(low)
    ref = low(*inputs)

    res = run_pass(fuse_swiglu_quant, low)

    assert res.matches == SWIGLUS
    after = _ops(low)
    assert before[QUANT_A8] == QUANTS and after[QUANT_A8] == QUANTS - SWIGLUS
    assert after[aten.silu.default] == SWIGLUS
    assert after[aten.amax.default] == after[aten.round.default] == SWIGLUS
    assert after[aten.sum.dim_IntList] == (SWIGLUS if precision == "w4a8" else 0)
    for silu in [n for n in low.gm.graph.nodes if n.target == aten.silu.default]:
        (mul,) = silu.users
        assert QUANT_A8 not in {u.target for u in mul.users}
        assert aten.abs.default in {u.target for u in mul.users}
    out = low(*inputs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_graphs(tiny_llama, decoder_lowering, dtype):
    """fp16/bf16: the norm carries its casts to float32 and back (the pattern's cast-to-x.dtype
    is checked against the matched x); both fusions run in sequence as in the pipeline and
    leave only the o_proj inputs' quant_a8. Eager numerics stay bit-identical."""
    inputs = example_inputs(KVSpec.of(tiny_llama.config, "fp16", 16, dtype))
    low = _quantized(tiny_llama, decoder_lowering, dtype, W4A8)
    ref = low(*inputs)

    norms, swiglus = run_pass(fuse_rmsnorm_quant, low), run_pass(fuse_swiglu_quant, low)

    assert (norms.matches, swiglus.matches) == (NORMS_BEFORE_GEMM, SWIGLUS)
    ops = _ops(low)
    assert ops[QUANT_A8] == LAYERS
    assert all(n.args[0].target == aten.reshape.default  # attention output -> wo
               for n in low.gm.graph.nodes if n.target == QUANT_A8)
    out = low(*inputs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_float_graph_does_not_match(tiny_llama, decoder_lowering):
    """Negative case: --precision fp16 (no swap_gemm) has RMSNorms and SiLU*Muls but no
    quant_a8 after them."""
    low = decoder_lowering(tiny_llama, torch.float32)
    run_pass(canonicalize, low)
    code = low.gm.code
    assert run_pass(fuse_rmsnorm_quant, low).matches == 0
    assert run_pass(fuse_swiglu_quant, low).matches == 0
    assert low.gm.code == code


class _NormQuant(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("w", torch.rand(32, dtype=dtype) + 0.5)

    def forward(self, x):
        return QUANT_A8(rms_norm(x, self.w, 1e-5))[:2]


class _NormTwoUsers(_NormQuant):
    def forward(self, x):
        y = rms_norm(x, self.w, 1e-5)
        xq, s, _ = QUANT_A8(y)
        return xq, s, y * 2  # y also feeds a residual-like user


class _NormInFloat64(_NormQuant):
    """RMSNorm computed in float64 rather than float32: not the canonical norm (the
    replacement would compute it in float32)."""

    def forward(self, x):
        xf = x.to(torch.float64)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return QUANT_A8(self.w * xf.to(x.dtype))[:2]


class _SwiGLUTwoUsers(torch.nn.Module):
    def forward(self, g, u):
        h = F.silu(g) * u
        return QUANT_A8(h)[:2] + (h.sum(),)


class _GeluQuant(torch.nn.Module):
    def forward(self, g, u):
        return QUANT_A8(F.gelu(g) * u)[:2]


def _small(module, *args) -> Lowering:
    low = Lowering.from_exported(torch.export.export(module, args))
    run_pass(canonicalize, low)
    return low


@pytest.mark.parametrize("case", ["norm_two_users", "norm_in_float64", "swiglu_two_users",
                                  "gelu"])
def test_must_not_match(case):
    """Negative cases: a norm whose output has another user (the norm would be computed twice),
    a norm computed in the wrong dtype (float64 instead of float32; the pattern ignores dtype
    arguments while matching, the matcher's re-trace check rejects it), a SiLU*Mul product with
    another user, and GELU instead of SiLU."""
    x = torch.randn(4, 32)
    low, fuse = {
        "norm_two_users": lambda: (_small(_NormTwoUsers(torch.float32), x), fuse_rmsnorm_quant),
        "norm_in_float64": lambda: (_small(_NormInFloat64(torch.float32), x),
                                    fuse_rmsnorm_quant),
        "swiglu_two_users": lambda: (_small(_SwiGLUTwoUsers(), x, x + 1), fuse_swiglu_quant),
        "gelu": lambda: (_small(_GeluQuant(), x, x + 1), fuse_swiglu_quant),
    }[case]()
    code = low.gm.code
    assert run_pass(fuse, low).matches == 0
    assert low.gm.code == code and _ops(low)[QUANT_A8] == 1


def test_small_norm_control():
    """Control for the negative cases: the canonical norm + quant_a8 in the same small graph
    does match, with identical numerics."""
    x = torch.randn(4, 32)
    low = _small(_NormQuant(torch.float32), x)
    ref = low(x)
    assert run_pass(fuse_rmsnorm_quant, low).matches == 1
    assert _ops(low)[QUANT_A8] == 0
    assert all(torch.equal(a, b) for a, b in zip(low(x), ref))


# ----------------------------------------------------------------------------- Inductor

class _SwiGLUQuant(torch.nn.Module):
    def forward(self, g, u):
        return QUANT_A8(F.silu(g) * u)[:2]


_KERNEL = re.compile(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?r'''(.*?)'''",
                     re.M | re.S)


def _inductor_kernels(low: Lowering, *args) -> tuple[list[tuple[str, str]], str, tuple]:
    """Compile the graph with Inductor on CPU; (kernel name, C++ body) pairs, the wrapper, and
    the outputs."""
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    fn = torch.compile(low.gm, backend="inductor", dynamic=False, fullgraph=True)
    out, (src,) = run_and_get_code(fn, *low.weights.values(), *args)
    return _KERNEL.findall(src), src, out


def _is_int8_store(body: str) -> bool:
    """The kernel converts to int8 (vectorized `at::vec::convert<int8_t, ...>` or scalar
    `static_cast<int8_t>`)."""
    return re.search(r"convert<int8_t\b|static_cast<int8_t>", body) is not None


@pytest.mark.parametrize("case", ["rmsnorm", "swiglu"])
def test_inductor_emits_one_kernel(case):
    """fp16 activations [4, 32]: after the fusion Inductor writes exactly one C++ kernel and it
    holds the producer (rsqrt / silu in the kernel's op list) and the int8 store; no call to the
    opaque qcompile op is left. Without the fusion (control) quant_a8 stays an extern call and
    no kernel writes int8."""
    torch.manual_seed(0)
    dt = torch.float16
    if case == "rmsnorm":
        module, args, fuse, producer = _NormQuant(dt), (torch.randn(4, 32, dtype=dt),), \
            fuse_rmsnorm_quant, "rsqrt"
    else:
        module, args, fuse, producer = _SwiGLUQuant(), (torch.randn(4, 32, dtype=dt),
                                                        torch.randn(4, 32, dtype=dt)), \
            fuse_swiglu_quant, "silu"
    unfused = _small(module, *args)
    low = _small(module, *args)
    assert run_pass(fuse, low).matches == 1
    xq_ref, s_ref = low(*args)

    kernels, src, (xq, s) = _inductor_kernels(low, *args)

    assert len(kernels) == 1, [k for k, _ in kernels]
    name, body = kernels[0]
    assert producer in name and _is_int8_store(body), name
    assert "qcompile" not in src
    # Inductor keeps the norm/product in float32 where eager rounds it to fp16 first, so a
    # code may move by one step; the scale is the row max over 127 either way.
    assert (xq.int() - xq_ref.int()).abs().max() <= 1
    torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=0)

    kernels, src, _ = _inductor_kernels(unfused, *args)
    assert "torch.ops.qcompile.quant_a8" in src
    assert not any(_is_int8_store(body) for _, body in kernels)
