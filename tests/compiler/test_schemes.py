"""compiler/schemes.py: every scheme row has all its parts and they fit together (quantize ->
pack -> activation quantizer -> op == reference, close to the float product), and the tables
derived from the rows equal the hand-written tables they replaced."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from qcompile.compiler.config import PRECISIONS
from qcompile.compiler.schemes import (ACT_QUANTS, FP8, GEMM_OPS, GEMM_REFERENCES, QUANTIZED,
                                       SCHEMES, SPECS, W4A4, W4A8, W4A8_G64, W4A8_G128,
                                       W4A16_G128,
                                       W8A8, WITH_KERNELS, spec_of, spec_of_call)
from qcompile.cutlass_templates import configs as C
from qcompile.cutlass_templates.layouts import LAYOUTS
from qcompile.passes.swap_gemm import GEMM_FORMATS
from qcompile.runtime.ops import gemm, gemm_fp8

TEMPLATES = Path(C.__file__).parent


def _sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("spec", QUANTIZED, ids=lambda s: s.precision)
def test_row_has_every_part(spec):
    assert PRECISIONS[spec.precision] == spec.scheme and spec_of(spec.scheme) is spec
    assert spec.op.namespace == "qcompile" and callable(spec.reference)
    assert LAYOUTS[spec.layout.name] is spec.layout
    assert callable(spec.layout.pack) and callable(spec.layout.unpack)
    assert (spec.act is None) == (spec.scheme.act_bits >= 16)
    assert spec.act is None or spec.act in ACT_QUANTS
    names = [a.name for a in spec.op._schema.arguments]
    after_n = [arg for arg, _ in spec.linear_args if arg not in spec.act_only]
    assert names[-1] == "out_dtype" and names[names.index("n") + 1:-1] == [*after_n,
                                                                            *spec.static_args]
    if spec.act is not None and spec.linear_args:  # the quantizer takes every linear arg
        act_names = [a.name for a in spec.act.op._schema.arguments]
        assert act_names[1:] == [arg for arg, _ in spec.linear_args]
    assert set(spec.act_only) <= {arg for arg, _ in spec.linear_args}
    assert spec.act is None or spec.act.takes_args == bool(spec.linear_args)
    assert (spec.linear_table is not None) == bool(spec.linear_args)
    if spec.kernel is not None:
        for kind, template in ((spec.kernel.kind, spec.kernel.template), spec.kernel.sm90 or ()):
            assert (TEMPLATES / template).is_file() and C.ALL_KINDS[kind][0] == template
    assert set(spec.targets) <= {"sm80", "sm90"} and spec.targets


@pytest.mark.parametrize("spec", QUANTIZED, ids=lambda s: s.precision)
def test_parts_fit_together(spec):
    """quantize -> pack -> (activation quantizer) -> op: the op equals its reference and is
    close to the float product; the packed buffers are the op's weight arguments in order."""
    g = torch.Generator().manual_seed(0)
    n, k = 40, 256
    w, x = torch.randn(n, k, generator=g) / 16, torch.randn(5, k, generator=g)
    qw = spec.quantize(w)
    assert isinstance(qw, spec.weights)
    packed = spec.pack_weight(w)
    assert all(torch.equal(a, b) for a, b in zip(packed.values(),
                                                   spec.pack(spec, qw).values()))
    largs = spec.default_linear_args
    act = spec.act.op(x, *largs)[:3 if spec.uses_sum else 2] if spec.act else (x,)
    args = (*act, *packed.values(), None, n, *spec.gemm_args(largs), *spec.extra,
            torch.float32)
    names = [a.name for a in spec.op._schema.arguments]
    assert spec_of_call(spec.op, dict(zip(names, args))) is spec
    y = spec.op(*args)
    assert torch.equal(y, spec.reference(*args))
    # e4m3 keeps 3 significand bits (~2^-4 relative per operand): ~29 dB against int8's ~40
    # 4-bit activations (w4a4 with no 8-bit block) another ~6 dB below 4-bit weights
    floor = (9 if spec.scheme.act_bits == 4 else 15 if spec.scheme.weight_bits == 4
             else 24 if spec.scheme.codes == "e4m3" else 30)
    assert _sqnr_db(x @ w.T, y) > floor
    # the container stands for the packed bytes: what is left is the activations' rounding
    assert _sqnr_db(x @ qw.dequantize().T, y) > floor + 3


def test_precisions_table():
    assert PRECISIONS == {"fp16": None, "w8a8": W8A8, "w4a8": W4A8, "w4a8-g128": W4A8_G128,
                          "w4a8-g64": W4A8_G64, "w4a16-g128": W4A16_G128, "w4a4": W4A4,
                          "fp8": FP8}
    assert list(SPECS) == [s.precision for s in SCHEMES] and SPECS["fp16"].scheme is None
    assert [s.name for s in PRECISIONS.values() if s and s.codes == "int"] == \
        list(PRECISIONS)[1:-1]
    assert FP8 != W8A8 and FP8.name == "w8a8-e4m3"  # the float codes keep the keys apart
    assert [s.precision for s in SCHEMES if s.targets != ("sm80", "sm90")] == ["fp8"]
    assert [s.precision for s in SCHEMES if not s.qoq] == ["fp16", "fp8"]


def test_op_tables():
    ops = torch.ops.qcompile
    assert GEMM_OPS == {W8A8: ops.gemm_w8a8.default, W4A8: ops.gemm_w4a8.default,
                        W4A8_G128: ops.gemm_w4a8_group.default,
                        W4A8_G64: ops.gemm_w4a8_group.default,
                        W4A16_G128: ops.gemm_w4a16.default, W4A4: ops.gemm_w4a4x.default,
                        FP8: ops.gemm_fp8.default}
    assert GEMM_REFERENCES == {W8A8: gemm.gemm_w8a8_ref, W4A8: gemm.gemm_w4a8_ref,
                               W4A8_G128: gemm.gemm_w4a8_group_ref,
                               W4A8_G64: gemm.gemm_w4a8_group_ref,
                               W4A16_G128: gemm.gemm_w4a16_ref, W4A4: gemm.gemm_w4a4x_ref,
                               FP8: gemm_fp8.gemm_fp8_ref}
    assert {s: (f.uses_sum, f.extra(s)) for s, f in GEMM_FORMATS.items()} == {
        W8A8: (False, ()), W4A8: (True, ()), W4A8_G128: (False, (128,)),
        W4A8_G64: (False, (64,)), W4A16_G128: (False, (128,)), W4A4: (True, ()),
        FP8: (False, ())}
    assert [a.op for a in ACT_QUANTS] == [ops.quant_a8.default, ops.quant_a4x.default,
                                          ops.quant_fp8.default]


def test_layout_table():
    assert list(LAYOUTS) == ["w8a8_rm", "w4a8_pc_sm80", "w4a8_g128_sm80", "w4a8_g64_sm80",
                             "w4a16_g128_rm", "fp8_rm"]


def test_kernel_tables():
    assert C.KINDS == {"w8a8": ("w8a8_sm80.cu", None), "w4a8": ("w4a8_sm80.cu", 0),
                       "w4a8_g128": ("w4a8_sm80.cu", 128), "w4a8_g64": ("w4a8_sm80.cu", 64),
                       "w4a4x": ("w4a8_sm80.cu", 0), "w4a4x_s4": ("w4a8_sm80.cu", 0)}
    assert C.SM90_KINDS == {"w8a8_sm90": ("w8a8_sm90.cu", None),
                            "w4a8_rs_sm90": ("w4a8_rs_sm90.cu", 0),
                            "w4a8_g128_rs_sm90": ("w4a8_rs_sm90.cu", 128),
                            "w4a8_g64_rs_sm90": ("w4a8_rs_sm90.cu", 64),
                            "w4a4x_rs_sm90": ("w4a8_rs_sm90.cu", 0)}
    assert C.RS_KINDS == ("w4a8_rs_sm90", "w4a8_g128_rs_sm90", "w4a8_g64_rs_sm90",
                          "w4a4x_rs_sm90")
    assert C.A4X_KINDS == {"w4a4x": 128, "w4a4x_rs_sm90": 128, "w4a4x_s4": 128}
    assert C.A4X_S4_KINDS == ("w4a4x_s4",)
    assert C.W4_KINDS == ("w4a8", "w4a8_g128", "w4a8_g64")
    a4x = ("w4a4x", "w4a4x_rs_sm90", "w4a4x_s4")
    assert [r.kinds for r in C.SELECTION if r.kinds] == [
        a4x, a4x, C.W4_KINDS, ("w8a8", "w4a8_g128", "w4a8_g64"), C.W4_KINDS, a4x]
    T = C.TargetRow
    w4 = lambda kernel: (  # noqa: E731  (the hand-written table this replaced)
        T(1537, kernel, C.WGMMA_RS), T(769, kernel, C.WGMMA_RS_T64, n_min=4097, n_max=8192),
        T(769, kernel, C.WGMMA_RS), T(257, kernel, C.WGMMA_RS_1WG, k_min=8192),
        T(257, kernel, C.WGMMA_RS, n_min=C.WIDE_N + 1), T(257, kernel, C.WGMMA_RS_T64),
        T(65, kernel, C.WGMMA_RS, n_min=C.WIDE_N + 1),
        T(64, kernel, C.WGMMA_RS_T64, n_min=C.WIDE_N + 1))
    assert C.TARGET_ROWS == {"sm90": {
        "w8a8": (T(1537, "w8a8_sm90", C.WGMMA_WIDE),
                 T(769, "w8a8_sm90", C.WGMMA_WIDE, k_min=8192),
                 T(769, "w8a8_sm90", C.WGMMA, n_max=8192), T(769, "w8a8_sm90", C.WGMMA_WIDE),
                 T(513, "w8a8_sm90", C.WGMMA),
                 T(256, "w8a8_sm90", C.WGMMA_WIDE, n_min=8193, n_max=16384),
                 T(256, "w8a8_sm90", C.WGMMA, n_min=4097)),
        "w4a8": w4("w4a8_rs_sm90"), "w4a8_g128": w4("w4a8_g128_rs_sm90"),
        "w4a8_g64": w4("w4a8_g64_rs_sm90"),
        "w4a4x": (T(769, "w4a4x_rs_sm90", C.WGMMA_RS_T64_WIDE, n_min=8193),
                  T(257, "w4a4x_rs_sm90", C.WGMMA_RS_T64),
                  T(64, "w4a4x_rs_sm90", C.WGMMA_RS_T64_WIDE, n_min=C.WIDE_N + 1))}}
    assert [k for s in WITH_KERNELS for k in (s.kernel.kind, s.kernel.s4) if k] == list(C.KINDS)


@pytest.mark.parametrize("spec", WITH_KERNELS, ids=lambda s: s.precision)
def test_cuda_impl_launches_the_row(spec, monkeypatch):
    """runtime/gemm_kernels.py's implementation of the row's op (CPU tensors, the launch
    stubbed): the kind, operands and packed K the hand-written implementations passed."""
    from qcompile.runtime import gemm_kernels as gk
    seen = {}
    monkeypatch.setattr(gk, "_find", lambda kind, m, n, k, dt: seen.setdefault("kind", kind))
    monkeypatch.setattr(gk, "_launch", lambda found, xq, sx, ops, n, kp, k, extra: seen.update(
        ops=ops, kp=kp, n=n, k=k, extra=extra))
    x, w = torch.randn(3, 256), torch.randn(40, 256)
    xq, sx, xsum = spec.act.op(x, *spec.default_linear_args)
    packed = list(spec.pack_weight(w).values())
    head = (xq, sx, xsum) if spec.uses_sum else (xq, sx)
    gk._impl(spec.op)(*head, *packed, None, 40, *spec.gemm_args(spec.default_linear_args),
                      *spec.extra, torch.float16)
    g = spec.scheme.group_size
    assert seen["kind"] == ("w8a8" if spec.scheme == W8A8 else f"w4a8_g{g}" if g else
                            "w4a4x" if spec.precision == "w4a4" else "w4a8")
    assert seen["ops"] == [*head[2:], *packed, None] and seen["n"] == 40
    assert seen["kp"] == packed[0].shape[1] * (1 if spec.scheme == W8A8 else 32)
    assert (seen["k"], seen["extra"]) == (256, ())


def test_cuda_impl_of_packed_w4a4_launches_the_s4_kind(monkeypatch):
    """An sm80 w4a4 call (x_q packed, `packed` = 1) launches the s4 kind with K = the input
    channels (not x_q's bytes) and n8 after it."""
    from qcompile.runtime import gemm_kernels as gk
    spec, seen = SPECS["w4a4"], {}
    monkeypatch.setattr(gk, "_find", lambda kind, m, n, k, dt: seen.update(kind=kind, k=k) or 1)
    monkeypatch.setattr(gk, "_launch", lambda found, xq, sx, ops, n, kp, k, extra: seen.update(
        width=xq.shape[-1], launch_k=k, extra=extra))
    x, w = torch.randn(3, 512), torch.randn(40, 512)
    head = spec.act.op(x, 1, 128, 1000, 1)
    assert head[0].shape == (3, 320)
    gk._impl(spec.op)(*head, *spec.pack_weight(w).values(), None, 40, 1, 128, 1,
                      torch.float16)
    assert seen == {"kind": "w4a4x_s4", "k": 512, "width": 320, "launch_k": 512,
                    "extra": (1,)}


def test_cuda_impl_without_kernels_runs_the_reference():
    from qcompile.runtime import gemm_kernels as gk
    spec = spec_of(W4A8)
    x, w = torch.randn(3, 256), torch.randn(40, 256)
    args = (*spec.act.op(x), *spec.pack_weight(w).values(), None, 40, torch.float16)
    before = sum(gk.STATS.fallbacks.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned once per reason and process
        y = gk._impl(spec.op)(*args)
    assert torch.equal(y, spec.reference(*args))
    assert sum(gk.STATS.fallbacks.values()) == before + 1


def test_w4a4_impl_takes_the_reference_for_blocks_the_kernels_lack(monkeypatch):
    """The W4Ax kernels scale 128-channel blocks; a program with other blocks (FMPQ picks 64
    for widths that 128 does not divide) runs the reference, counted and warned once."""
    from qcompile.runtime import gemm_kernels as gk
    spec = SPECS["w4a4"]
    monkeypatch.setattr(gk, "_find", lambda *a: pytest.fail("no kernel for 64-channel blocks"))
    x, w = torch.randn(3, 256), torch.randn(40, 256)
    head = spec.act.op(x, 1, 64)
    packed = list(spec.pack_weight(w).values())
    with pytest.warns(UserWarning, match="activation blocks of 64 channels"):
        got = gk._impl(spec.op)(*head, *packed, None, 40, 1, 64, 0, torch.float16)
    assert torch.equal(got, spec.reference(*head, *packed, None, 40, 1, 64, 0, torch.float16))
