"""One frozen row per quantization scheme: what a `--precision` is, from the rounding of a weight
to the kernel that multiplies it.

A `SchemeSpec` row holds the precision name, its `QuantScheme` key, the weight container and
the round-to-nearest quantizer that fills it, the named layout and the packing of the container
into the op's weight buffers, the GEMM op and its reference, the activation quantizer that
feeds the op (and that the fusion passes inline after RMSNorm / SiLU*Mul), the CUTLASS kernel
kinds and templates, and the targets and recipes it supports. Every other table is derived
from `SCHEMES`:

| table | derived as |
|---|---|
| `config.PRECISIONS` | precision -> scheme |
| `quantize.quantize_weight` | scheme -> quantizer (`spec_of`) |
| `swap_gemm.GEMM_FORMATS` | scheme -> pack and call shape |
| `GEMM_OPS`, `GEMM_REFERENCES` (here) | scheme -> op, reference |
| `layouts.LAYOUTS` | the rows' named layouts |
| `configs.KINDS`, `SM90_KINDS`, `TARGET_ROWS` | kernel kinds -> templates |
| `kernels.gemm_shapes` | GEMM node -> kernel kind (`spec_of_call`) |
| `gemm_kernels.enable` | op -> CUDA implementation |
| `fuse_rmsnorm_quant`, `fuse_swiglu_quant` | `ACT_QUANTS` |

So a new scheme adds a row (and the op, quantizer and layout it names), not branches.
tests/compiler/test_schemes.py checks that every row has all its parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import qcompile.runtime.ops  # noqa: F401  (registers torch.ops.qcompile)
from qcompile.cutlass_templates.fp8_layout import FP8_ROW_MAJOR
from qcompile.cutlass_templates.w4a8_layout import (W4A8_PER_CHANNEL, check_group_codes,
                                                    pack_group_params, w4a8_group_layout)
from qcompile.cutlass_templates.w4a16_layout import w4a16_layout
from qcompile.cutlass_templates.w8a8_layout import W8A8_ROW_MAJOR
from qcompile.runtime.ops import gemm
from qcompile.runtime.ops.gemm_fp8 import gemm_fp8_ref
from qcompile.runtime.ops.quant import (FMPQ_BLOCK, a4x_channels, quant_a4x_ref, quant_a8_ref,
                                        quant_fp8_ref)

from . import quantize as Q


@dataclass(frozen=True)
class QuantScheme:
    """The hashable key of a scheme (coverage tables, QoQ's grids). `codes`: "int" for integer
    codes; a float format names it ("e4m3")."""
    weight_bits: int
    act_bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    codes: str = "int"

    @property
    def search_act_bits(self) -> int:
        """The activation bits QoQ's searches (smooth, clip) score a weight with: act_bits,
        except FMPQ's mixed 4/8-bit blocks (act_bits 4), which the `fmpq` step chooses after
        smoothing: those searches see 8-bit activations."""
        return 8 if self.act_bits == 4 else self.act_bits

    @property
    def name(self) -> str:
        g = f"-g{self.group_size}" if self.group_size else ""
        return f"w{self.weight_bits}a{self.act_bits}{g}" + (
            "" if self.codes == "int" else f"-{self.codes}")


W8A8 = QuantScheme(8, 8, None, True)
W4A8 = QuantScheme(4, 8, None, False)
W4A8_G128 = QuantScheme(4, 8, 128, False)
W4A8_G64 = QuantScheme(4, 8, 64, False)
# Weight-only baseline (AWQ/GPTQ-style): activations stay in the program dtype (act_bits 16).
W4A16_G128 = QuantScheme(4, 16, 128, False)
# FP8 baseline: e4m3 weights per output channel, e4m3 activations per token.
FP8 = QuantScheme(8, 8, None, True, codes="e4m3")
# COMET's W4A4KV4 (FMPQ): per-channel W4A8's weights, activations in per-token blocks of 128
# channels, the leading n8 blocks of each linear int8 and the rest int4.
W4A4 = QuantScheme(4, 4, None, False)


@dataclass(frozen=True)
class ActQuant:
    """A per-token activation quantizer: the opaque op swap_gemm places after x's producer
    (x -> `outputs` tensors, codes and scales first), and its plain-ATen reference, which the
    fusion passes inline after RMSNorm and SiLU*Mul so that Inductor fuses the two."""
    name: str
    op: torch._ops.OpOverload
    reference: Callable
    outputs: int
    # per-linear arguments after x (`SchemeSpec.linear_args` names them): a quantizer with
    # some is not matched by the fusion passes (a pattern would bake their values in); the
    # runtime inlines its reference under Inductor all the same (runtime/compiled.py)
    takes_args: bool = False


A8 = ActQuant("a8", torch.ops.qcompile.quant_a8.default, quant_a8_ref, 3)  # x_q, s_x, sum x_q
E4M3 = ActQuant("e4m3", torch.ops.qcompile.quant_fp8.default, quant_fp8_ref, 2)  # x_q, s_x
# x_q, s_x per block, t = the dequantized row sum; args (n8, block)
A4X = ActQuant("a4x", torch.ops.qcompile.quant_a4x.default, quant_a4x_ref, 3, takes_args=True)


@dataclass(frozen=True)
class GemmKernel:
    """The CUTLASS templates of a scheme: the portable mma.sync kind (sm80 and up) and, where
    one exists, the target's own template, both (kernel kind, template file). block: the
    activations' channels per scale where they have one per block (COMET's W4Ax: the main
    loop scales each block's int32 partial, -DQC_A4X), 0 where one per token. s4: the kind
    of the same template for packed activations (`pack_a4x`: sm80 artifacts, whose kernel runs
    the 4-bit blocks on s4 MMAs), "" where there is none."""
    kind: str
    template: str
    sm90: tuple[str, str] | None = None
    block: int = 0
    s4: str = ""


@dataclass(frozen=True)
class SchemeSpec:
    """One `--precision`. The GEMM op is called as `op(*act, *buffers, bias, n, *extra,
    out_dtype)`: act = the first `act.outputs` values of `act.op(x)` (without the per-token sum
    unless `uses_sum`), or x itself when `act` is None (weight-only); buffers = `pack`'s
    values, in order; extra = the linear's `linear_args` values, then the scheme's fields
    named by `static_args`."""
    precision: str
    scheme: QuantScheme | None = None           # None: the linears stay floating point
    weights: type | None = None                 # container `quantize` returns
    quantize: Callable | None = None            # w [N, K] float -> weights
    layout: object | None = None                # named layout (cutlass_templates/layouts.py)
    pack: Callable | None = None                # (spec, weights) -> {buffer: tensor}
    op: torch._ops.OpOverload | None = None
    reference: Callable | None = None           # the op's plain PyTorch implementation
    act: ActQuant | None = None                 # None: the op reads x (weight-only)
    uses_sum: bool = False                      # the op reads act's per-token sum
    static_args: tuple[str, ...] = ()           # QuantScheme fields passed after n
    # per-linear arguments, (name, default): passed to the activation quantizer after x and
    # (but those of `act_only`) to the GEMM after n, from the compile's per-linear table
    # (FMPQ's n8) or the default
    linear_args: tuple[tuple[str, int], ...] = ()
    act_only: tuple[str, ...] = ()              # linear_args the GEMM does not take
    # (model config, QoQ's report, target) -> that table, {canonical linear name: {arg: value}}
    linear_table: Callable | None = None
    # None: no CUTLASS kernel; the op's own CUDA implementation (fp8: torch._scaled_mm) or
    # its reference runs on every device
    kernel: GemmKernel | None = None
    targets: tuple[str, ...] = ("sm80", "sm90")
    qoq: bool = True                            # QoQ's rounding steps know this grid

    @property
    def extra(self) -> tuple:
        return tuple(getattr(self.scheme, name) for name in self.static_args)

    @property
    def default_linear_args(self) -> tuple:
        return tuple(default for _, default in self.linear_args)

    def gemm_args(self, values: tuple) -> tuple:
        """The GEMM's share of a linear's argument values (in linear_args' order)."""
        return tuple(v for (name, _), v in zip(self.linear_args, values)
                     if name not in self.act_only)

    def kernel_kind(self, args: dict) -> str:
        """The kernel kind of a call of `op` with these arguments by name: the s4 kind where
        its activations are packed (W4Ax in sm80 artifacts), else the row's kind."""
        return self.kernel.s4 if args.get("packed") else self.kernel.kind

    def gemm_k(self, width: int, args: dict) -> int:
        """K (input channels) of a call with these arguments by name whose x_q is `width`
        wide: that width, or what packed A4x codes of that many bytes hold."""
        return a4x_channels(width, args["n8"], args["block"]) if args.get("packed") else width

    @property
    def kernel_group(self) -> int | None:
        """-DQC_GROUP of the templates: None for 8-bit weights, 0 per channel, else g."""
        return None if self.scheme.weight_bits == 8 else (self.scheme.group_size or 0)

    def pack_weight(self, w: torch.Tensor, qw=None) -> dict[str, torch.Tensor]:
        """The op's weight buffers of w [N, K]: quantized here by round-to-nearest unless
        integer weights chosen earlier (GPTQ) are given."""
        return self.pack(self, self.quantize(w) if qw is None else qw)


def _pad(v: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(v.float(), (0, n - v.shape[0]))


def _pack_per_channel(spec, qw):
    q = spec.layout.pack(qw.q)
    return {"q": q, "s": _pad(qw.scale, q.shape[0])}


def _pack_w4(spec, qw):
    q = spec.layout.pack(qw.q)
    np_ = q.shape[0] * 32
    return {"q": q, "s": _pad(qw.scale, np_), "zs": _pad(qw.zero * qw.scale, np_)}


def _pack_w4_group(spec, qw):
    check_group_codes(qw.q, qw.s2, qw.z2, spec.scheme.group_size)
    q = spec.layout.pack(qw.q)
    s2, negzs = pack_group_params(qw.s2, qw.z2)
    return {"q": q, "s1": _pad(qw.s1, q.shape[0] * 32), "s2": s2, "negzs": negzs}


def _pack_w4a16(spec, qw):
    s, z = spec.layout.pack_params(qw.scale, qw.zero)
    return {"q": spec.layout.pack(qw.q), "s": s, "z": z}


def _w4a8_group(g: int, scheme: QuantScheme) -> SchemeSpec:
    return SchemeSpec(
        f"w4a8-g{g}", scheme, Q.W4GroupWeights, lambda w: Q.quantize_w4_group(w, g),
        w4a8_group_layout(g), _pack_w4_group, torch.ops.qcompile.gemm_w4a8_group.default,
        gemm.gemm_w4a8_group_ref, A8, static_args=("group_size",),
        kernel=GemmKernel(f"w4a8_g{g}", "w4a8_sm80.cu",
                          sm90=(f"w4a8_g{g}_rs_sm90", "w4a8_rs_sm90.cu")))


def _fmpq_table(cfg, report, target):
    from .fmpq import linear_args
    return linear_args(cfg, report, target)


SCHEMES: tuple[SchemeSpec, ...] = (
    SchemeSpec("fp16", qoq=False),
    SchemeSpec("w8a8", W8A8, Q.W8Weights, Q.quantize_w8, W8A8_ROW_MAJOR, _pack_per_channel,
               torch.ops.qcompile.gemm_w8a8.default, gemm.gemm_w8a8_ref, A8,
               kernel=GemmKernel("w8a8", "w8a8_sm80.cu", sm90=("w8a8_sm90", "w8a8_sm90.cu"))),
    SchemeSpec("w4a8", W4A8, Q.W4Weights, Q.quantize_w4_per_channel, W4A8_PER_CHANNEL,
               _pack_w4, torch.ops.qcompile.gemm_w4a8.default, gemm.gemm_w4a8_ref, A8,
               uses_sum=True,
               kernel=GemmKernel("w4a8", "w4a8_sm80.cu", sm90=("w4a8_rs_sm90",
                                                               "w4a8_rs_sm90.cu"))),
    _w4a8_group(128, W4A8_G128),
    _w4a8_group(64, W4A8_G64),
    # no kernel: the reference (dequantize, float GEMM) runs on every device
    SchemeSpec("w4a16-g128", W4A16_G128, Q.W4FloatGroupWeights,
               lambda w: Q.quantize_w4_group_fp(w, 128), w4a16_layout(128), _pack_w4a16,
               torch.ops.qcompile.gemm_w4a16.default, gemm.gemm_w4a16_ref,
               static_args=("group_size",)),
    # COMET's W4Ax on per-channel W4A8's weights (the same quantizer, layout and QoQ grid);
    # its kernels are W4A8's templates with per-block activation scales. sm90 artifacts keep
    # the 4-bit blocks' codes as int8 (Hopper has no s4 MMA: s8 on every block); sm80 ones
    # pack them two a byte (`packed`) for the s4 MMAs of the w4a4x_s4 kind
    SchemeSpec("w4a4", W4A4, Q.W4Weights, Q.quantize_w4_per_channel, W4A8_PER_CHANNEL,
               _pack_w4, torch.ops.qcompile.gemm_w4a4x.default, gemm.gemm_w4a4x_ref, A4X,
               uses_sum=True, linear_args=(("n8", 0), ("block", FMPQ_BLOCK), ("clip", 1000),
                                           ("packed", 0)),
               act_only=("clip",), linear_table=_fmpq_table,
               kernel=GemmKernel("w4a4x", "w4a8_sm80.cu", sm90=("w4a4x_rs_sm90",
                                                                "w4a8_rs_sm90.cu"),
                                 block=FMPQ_BLOCK, s4="w4a4x_s4")),
    # no CUTLASS kernel: torch._scaled_mm (cuBLASLt) is the CUDA implementation, and e4m3
    # tensor cores start with sm89, so of the targets only sm90; QoQ searches integer grids
    SchemeSpec("fp8", FP8, Q.FP8Weights, Q.quantize_fp8, FP8_ROW_MAJOR, _pack_per_channel,
               torch.ops.qcompile.gemm_fp8.default, gemm_fp8_ref, E4M3, targets=("sm90",),
               qoq=False),
)

SPECS: dict[str, SchemeSpec] = {s.precision: s for s in SCHEMES}
QUANTIZED: tuple[SchemeSpec, ...] = tuple(s for s in SCHEMES if s.scheme is not None)
_BY_SCHEME = {s.scheme: s for s in QUANTIZED}
GEMM_OPS = {s.scheme: s.op for s in QUANTIZED}
GEMM_REFERENCES = {s.scheme: s.reference for s in QUANTIZED}
ACT_QUANTS: tuple[ActQuant, ...] = tuple(dict.fromkeys(s.act for s in QUANTIZED if s.act))
WITH_KERNELS: tuple[SchemeSpec, ...] = tuple(s for s in QUANTIZED if s.kernel)


def spec_of(scheme: QuantScheme) -> SchemeSpec:
    try:
        return _BY_SCHEME[scheme]
    except KeyError:
        raise ValueError(f"no scheme row for {scheme}; known: "
                         f"{', '.join(s.precision for s in QUANTIZED)}") from None


def spec_of_call(op, args: dict) -> SchemeSpec | None:
    """The row of a GEMM call: `op` with its arguments by name (a group op serves one row per
    group size). None for anything else."""
    for s in QUANTIZED:
        if s.op == op and all(args[name] == v for name, v in zip(s.static_args, s.extra)):
            return s
    return None
