"""passes/swap_gemm.py: every linear with a weight placeholder (LM head excluded) becomes
`quant_a8(x)` + the scheme's GEMM op on packed weights; the bias is carried. The weight-only
W4A16 scheme gets no `quant_a8`: its GEMM reads x itself (`test_swap_weight_only`).

Numerics, three ways:
* per GEMM (exact up to float32 rounding): run the swapped graph, and for every GEMM node check
  its output against `(s_x x_q) @ dequant(W)^T + b` computed in float64 from the same x_q, s_x.
  This is the DESIGN.md contract, independent of the packed layout the op reads.
* end to end against a fake-quant graph: the unswapped graph with every swapped linear's input
  replaced by `s_x x_q` (per-token A8) and its weight by dequant(W). It computes the same math in
  another order, so only rare rounding flips of an activation code separate the two.
* loosely against the float graph (quantization error itself).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from qcompile.compiler.capture import KVSpec, example_inputs
from qcompile.compiler.config import PRECISIONS, W4A16_G128, W8A8
from qcompile.compiler.quantize import dequantize, quantize_weight
from qcompile.models.loaders import load_checkpoint
from qcompile.passes.base import Lowering, call_targets, run_pass
from qcompile.passes.canonicalize import canonicalize
from qcompile.passes.swap_gemm import swap_gemm
from qcompile.compiler.schemes import GEMM_OPS, spec_of
from qcompile.runtime.ops import quant_a8_ref
from qcompile.runtime.ops.quant import quant_fp8_ref

aten = torch.ops.aten
QUANT_A8 = torch.ops.qcompile.quant_a8.default
# w4a4's per-linear block arguments need widths of 64 / 128 channels (tests/compiler/test_w4a4.py)
SCHEMES = {name: s for name, s in PRECISIONS.items()
           if s is not None and s.act_bits < 16 and not spec_of(s).linear_args}
LINEARS = 8  # 4 per layer (wqkv, wo, w_gate_up, w_down) x 2 layers; the LM head stays float

# Per GEMM, max |y - y_ref| relative to the largest |y_ref| of that GEMM: float32 rounding only
# (the W4A8 per-channel epilogue subtracts two terms larger than y). Measured <= 3e-7.
GEMM_RTOL = 1e-5
# Logits against the fake-quant graph: equal math, different float order; a flipped activation
# code changes one input by one step (1/127 of its row max). Measured <= 4e-7; bound 1e-4.
FAKE_QUANT_RTOL = 1e-4
# Logits against the float graph (relative L2). W8A8: measured 1.9-2.1% on the tiny models,
# bound 5%. 4-bit: round-to-nearest over K = 64/96 puts ~9% error on each weight (DESIGN.md
# numerics, no QoQ transforms here); 8 GEMMs compound to 20-31% measured; bound 40%. FP8:
# e4m3 keeps 3 significand bits (up to 2^-4 relative error per operand, where INT8's step is
# 1/127 of the row max for every value); measured 9.7%, bound 15%.
FLOAT_RTOL = {"w8a8": 0.05, "w4a8": 0.40, "w4a8-g128": 0.40, "w4a8-g64": 0.40,
              "w4a16-g128": 0.40, "fp8": 0.15}


def _dequant(w: torch.Tensor, scheme) -> torch.Tensor:
    """Float weight [N, K] the scheme's integer weights stand for (logical order, no layout)."""
    return dequantize(quantize_weight(w, scheme))


def _fake_a8(x: torch.Tensor) -> torch.Tensor:
    xq, s, _ = quant_a8_ref(x)
    return (xq.float() * s).to(x.dtype)


def _fake_fp8(x: torch.Tensor) -> torch.Tensor:
    xq, s = quant_fp8_ref(x)
    return (xq.float() * s).to(x.dtype)


FAKE_ACT = {torch.ops.qcompile.quant_a8.default: _fake_a8,
            torch.ops.qcompile.quant_fp8.default: _fake_fp8}


def _linears(low: Lowering) -> dict[str, torch.fx.Node]:
    """weight name -> linear node, for linears whose weight is a weight placeholder."""
    return {n.args[1].name: n for n in low.gm.graph.nodes
            if n.target == aten.linear.default and n.args[1].name in low.weights}


def _fake_quant_reference(low: Lowering, scheme, head: str) -> Lowering:
    """`low` (canonical, float) with every non-head linear computing on fake-quantized inputs
    and dequantized weights."""
    ref = Lowering(low.gm, dict(low.weights), low.inputs)
    for name, node in _linears(ref).items():
        if name == head:
            continue
        with ref.gm.graph.inserting_before(node):
            xq = ref.gm.graph.call_function(FAKE_ACT[spec_of(scheme).act.op], (node.args[0],))
        node.args = (xq, *node.args[1:])
        ref.weights[name] = _dequant(ref.weights[name], scheme)
    ref.gm.recompile()
    return ref


class _GemmRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps the argument values and output of every GEMM node."""

    def __init__(self, gm, op):
        super().__init__(gm)
        self.op, self.seen = op, {}

    def run_node(self, n):
        args = self.fetch_args_kwargs_from_env(n)[0] if n.target == self.op else None
        out = super().run_node(n)
        if args is not None:
            self.seen[n] = (args, out)
        return out


def _gemm_weight_name(gemm: torch.fx.Node, low: Lowering) -> str:
    """The original weight behind a GEMM: its packed codes are the placeholder `<W>_q`."""
    (name,) = [a.name for a in gemm.args if isinstance(a, torch.fx.Node)
               and a.name in low.weights and a.name.endswith("_q")]
    return name[:-2]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def qwen2_canonical(tiny_qwen2, decoder_lowering):
    def fresh() -> Lowering:
        low = decoder_lowering(tiny_qwen2, torch.float32)
        run_pass(canonicalize, low)
        return low
    return fresh


def _check_wiring(low: Lowering, op, origin: dict, quant_op=QUANT_A8) -> None:
    """Each GEMM reads quant_op (quant_a8) of its linear's input, gets the linear's bias
    placeholder (or None), and the float weight is gone."""
    for gemm in [n for n in low.gm.graph.nodes if n.target == op]:
        name = _gemm_weight_name(gemm, low)
        x_name, bias = origin[name]
        quant = gemm.args[0].args[0]
        assert quant.target == quant_op and quant.args[0].name == x_name, gemm.format_node()
        others = [a.name for a in gemm.args if isinstance(a, torch.fx.Node)
                  and a.name in low.weights and not a.name.startswith(f"{name}_")]
        assert others == ([bias] if bias else []) and (bias or None in gemm.args)
        assert name not in low.weights


def _check_gemm_numerics(low: Lowering, op, inputs, origin, float_weights, scheme):
    """Every GEMM's output against (s_x x_q) @ dequant(W)^T + b in float64, on the x_q, s_x the
    graph ran with. Returns the graph's outputs."""
    rec = _GemmRecorder(low.gm, op)
    out = rec.run(*low.weights.values(), *inputs)
    assert len(rec.seen) == LINEARS
    for gemm, (args, y) in rec.seen.items():
        name = _gemm_weight_name(gemm, low)
        bias = origin[name][1]
        y_ref = (args[0].double() * args[1].double()) @ \
            _dequant(float_weights[name], scheme).double().t()
        if bias is not None:
            y_ref = y_ref + float_weights[bias].double()
        err = (y.double() - y_ref).abs().max() / y_ref.abs().max()
        assert y.dtype == torch.float32 and err < GEMM_RTOL, f"{gemm.name} ({name}): {err:.2e}"
    return out


@pytest.mark.parametrize("precision", list(SCHEMES))
def test_swap(tiny_qwen2, qwen2_canonical, precision):
    """qwen2 tiny model (bias on q/k/v), fp32."""
    scheme, op = SCHEMES[precision], GEMM_OPS[SCHEMES[precision]]
    quant_op = spec_of(scheme).act.op  # quant_a8, or quant_fp8 for fp8
    inputs = example_inputs(KVSpec.of(tiny_qwen2.config, "fp16", 16, torch.float32))
    head = "b_top_lm_head"
    low = qwen2_canonical()
    float_logits = low(*inputs)[0]
    origin = {name: (n.args[0].name, n.args[2].name if len(n.args) > 2 else None)
              for name, n in _linears(low).items()}
    assert sum(b is not None for _, b in origin.values()) == 2  # wqkv of each layer
    float_weights = dict(low.weights)
    fq_logits = _fake_quant_reference(qwen2_canonical(), scheme, head)(*inputs)[0]

    res = run_pass(swap_gemm, low, scheme)

    assert res.matches == LINEARS
    # Ops: only the LM head's linear is left; one GEMM per swapped linear and one quant_a8 per
    # distinct input (every linear of the canonical decoder reads its own input).
    ops = Counter(call_targets(low.gm))
    assert ops[aten.linear.default] == 1 and set(_linears(low)) == {head}
    assert ops[op] == LINEARS and ops[quant_op] == LINEARS
    _check_wiring(low, op, origin, quant_op)
    out = _check_gemm_numerics(low, op, inputs, origin, float_weights, scheme)
    assert _rel(out[0], fq_logits) < FAKE_QUANT_RTOL
    assert _rel(out[0], float_logits) < FLOAT_RTOL[precision]


def test_swap_weight_only(tiny_qwen2, qwen2_canonical):
    """w4a16-g128: no quant_a8 anywhere; each GEMM reads its linear's input x and computes
    x @ dequant(W)^T + b; the logits equal the graph with dequantized weights."""
    scheme, op = W4A16_G128, GEMM_OPS[W4A16_G128]
    inputs = example_inputs(KVSpec.of(tiny_qwen2.config, "fp16", 16, torch.float32))
    low = qwen2_canonical()
    float_logits = low(*inputs)[0]
    origin = {name: (n.args[0].name, n.args[2].name if len(n.args) > 2 else None)
              for name, n in _linears(low).items()}
    float_weights = dict(low.weights)
    ref = qwen2_canonical()
    for name in origin:
        if name != "b_top_lm_head":
            ref.weights[name] = _dequant(ref.weights[name], scheme)
    dequant_logits = ref(*inputs)[0]

    res = run_pass(swap_gemm, low, scheme)

    assert res.matches == LINEARS
    ops = Counter(call_targets(low.gm))
    assert ops[op] == LINEARS and ops[QUANT_A8] == 0 and ops[aten.linear.default] == 1
    rec = _GemmRecorder(low.gm, op)
    out = rec.run(*low.weights.values(), *inputs)
    assert len(rec.seen) == LINEARS
    for gemm, (args, y) in rec.seen.items():
        name = _gemm_weight_name(gemm, low)
        x_name, bias = origin[name]
        assert gemm.args[0].name == x_name and name not in low.weights
        y_ref = args[0].double() @ _dequant(float_weights[name], scheme).double().t()
        if bias is not None:
            y_ref = y_ref + float_weights[bias].double()
        err = (y.double() - y_ref).abs().max() / y_ref.abs().max()
        assert y.dtype == torch.float32 and err < GEMM_RTOL, f"{gemm.name} ({name}): {err:.2e}"
    assert _rel(out[0], dequant_logits) < FAKE_QUANT_RTOL
    assert _rel(out[0], float_logits) < FLOAT_RTOL["w4a16-g128"]


def test_float16_graph_matches(tiny_qwen2, decoder_lowering):
    """fp16 activations (matching only): same count, and the GEMMs return fp16."""
    low = decoder_lowering(tiny_qwen2, torch.float16)
    run_pass(canonicalize, low)
    assert run_pass(swap_gemm, low, W8A8).matches == LINEARS
    gemms = [n for n in low.gm.graph.nodes if n.target == GEMM_OPS[W8A8]]
    assert len(gemms) == LINEARS
    assert all(n.args[-1] == torch.float16 and n.meta["val"].dtype == torch.float16
               for n in gemms)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lm_head_only_when_asked(make_tiny_checkpoint, decoder_lowering, tie):
    """The LM head (its result reaches the output through casts only) stays float by default
    and is swapped with include_head=True; a tied head packs the embedding, which the embedding
    lookup keeps using."""
    ckpt = load_checkpoint(make_tiny_checkpoint("llama", tie=tie))
    head = "b_top_embed" if tie else "b_top_lm_head"
    inputs = example_inputs(KVSpec.of(ckpt.config, "fp16", 16, torch.float32))
    low = decoder_lowering(ckpt, torch.float32)
    run_pass(canonicalize, low)
    float_logits = low(*inputs)[0]
    default = Lowering(copy.deepcopy(low.gm), dict(low.weights), low.inputs)

    assert run_pass(swap_gemm, default, W8A8).matches == LINEARS
    assert set(_linears(default)) == {head}

    res = run_pass(swap_gemm, low, W8A8, True)

    assert res.matches == LINEARS + 1
    assert Counter(call_targets(low.gm))[aten.linear.default] == 0
    assert f"{head}_q" in low.weights and (head in low.weights) == tie
    logits = low(*inputs)[0]
    assert logits.dtype == torch.float32 and _rel(logits, float_logits) < FLOAT_RTOL["w8a8"]


def test_lm_head_in_its_own_scheme(make_tiny_checkpoint, decoder_lowering):
    """head_scheme: a W4A8 model with a W8A8 head (`--lm-head w8a8`): the head alone takes the
    W8A8 GEMM and its own int8 quantization, the decoder linears W4A8; logits stay close."""
    from qcompile.compiler.config import W4A8
    ckpt = load_checkpoint(make_tiny_checkpoint("llama", tie=True))
    inputs = example_inputs(KVSpec.of(ckpt.config, "fp16", 16, torch.float32))
    low = decoder_lowering(ckpt, torch.float32)
    run_pass(canonicalize, low)
    float_logits = low(*inputs)[0]
    assert run_pass(swap_gemm, low, W4A8, False, None, None, W8A8).matches == LINEARS + 1
    ops = Counter(call_targets(low.gm))
    assert ops[GEMM_OPS[W4A8]] == LINEARS and ops[GEMM_OPS[W8A8]] == 1
    assert ops[aten.linear.default] == 0 and "b_top_embed" in low.weights  # the lookup's
    assert _rel(low(*inputs)[0], float_logits) < FLOAT_RTOL["w4a8"]


def test_lm_head_option():
    from qcompile.compiler.config import W4A8, CompileConfig
    # auto: W8A8 where the linears run integer GEMMs, else float
    assert CompileConfig().lm_head == "w8a8" and CompileConfig().head_scheme == W8A8
    assert CompileConfig(precision="w8a8").lm_head == "w8a8"
    for precision in ("fp16", "fp8", "w4a16-g128", "w4a4"):
        assert CompileConfig(precision=precision, target="sm90").head_scheme is None
    assert CompileConfig(lm_head="float").head_scheme is None
    assert CompileConfig(lm_head="w8a8").head_scheme == W8A8
    assert CompileConfig(lm_head="same").head_scheme == W4A8
    with pytest.raises(ValueError, match="needs a quantized --precision"):
        CompileConfig(precision="fp16", lm_head="w8a8")
    # artifacts of before the option stored a bool
    old = {k: v for k, v in CompileConfig().to_json().items() if k != "lm_head"}
    assert CompileConfig.from_json({**old, "quantize_lm_head": True}).lm_head == "same"
    assert CompileConfig.from_json({**old, "quantize_lm_head": False}).lm_head == "float"
    assert CompileConfig.from_json(old).lm_head == "float"  # before auto: float


class _TwoLinears(torch.nn.Module):
    """One linear on a weight buffer (swapped) and one on a weight passed at run time (not a
    weight placeholder: must not match)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(32, 64) / 8)

    def forward(self, x, w_runtime):
        return F.linear(F.linear(x, self.w), w_runtime) + 1


def test_runtime_weight_does_not_match():
    x, w_rt = torch.randn(3, 64), torch.randn(16, 32) / 6
    low = Lowering.from_exported(torch.export.export(_TwoLinears(), (x, w_rt)))
    run_pass(canonicalize, low)
    ref = low(x, w_rt)[0]

    res = run_pass(swap_gemm, low, W8A8)

    assert res.matches == 1
    (linear,) = [n for n in low.gm.graph.nodes if n.target == aten.linear.default]
    assert linear.args[1].name == "w_runtime"
    assert Counter(call_targets(low.gm))[GEMM_OPS[W8A8]] == 1
    assert _rel(low(x, w_rt)[0], ref) < FLOAT_RTOL["w8a8"]
