"""An artifact's program as a module torch.onnx can export (compiler/onnx_export.py has the
exported interface): `OnnxDecoder` runs the program's FX graph node by node (an interpreter
that torch.export traces) with the qcompile ops, the cache's layer select and the logits-row
gather replaced by plain ATen over a typed KV cache.

| qcompile op | becomes (ONNX after torch.onnx) |
|---|---|
| gemm_w8a8 | MatMulInteger(x_q int8 [M, K], W int8 [K, N]) -> int32; Cast, Mul s_x, Mul s_w |
| gemm_w4a8 | the same on the codes 0..15 as int8, minus (z s_w)(s_x sum x_q) |
| gemm_w4a8_group | the same on w8 = q s2 - z2 s2 (the kernel's per-byte int8), times s1 |
| quant_a8 | its reference: ReduceMax(Abs), Div, Round (half to even), Clip, Cast, ReduceSum |
| kv_encode_fp16 | nothing: the typed cache holds the values |
| kv_encode_int4 | quantize and dequantize per (token, head): ReduceMin/Max, Round, Clip, Mul, Add |
| paged_attention_* | Concat(past, new) -> present; mask causal from P; MatMul, Softmax in float32 |

No custom domain is needed. GEMM weights are laid out for the ONNX op once, at export: int8
[K, N] with the kernel buffers' padding dropped; W4A8's are the reference's own int8 operand,
decoded from the packed buffers (one byte per weight, twice the artifact's packed int4).
Precisions: fp16 and those whose GEMM op has a row in `GEMMS` (`PRECISIONS`); not w4a16-g128
(opset 21's blocked DequantizeLinear on UINT4 could say it, but torch has no 4-bit dtype to
hold the initializer) nor fp8 (ONNX has no float8 MatMul).

Rounding: a float16 / bfloat16 program runs in float32 here, rounded to the activation dtype
(a Cast there and back) after every node whose value the program holds in that dtype, ops
that only move values excepted; inputs, presents and weights keep the activation dtype. Why
not a float16 graph: onnxruntime's CPU provider has no float16 kernels for most ops, runs
them in float32 and removes the Cast pairs it inserted, dropping the roundings in between;
that moves int8 activation and int4 KV codes (SmolLM2 W8A8 logits up to 3.4 from the
reference's with KV fp16, 5.6 with KV int4; bench/results/onnx-export-2026-12-07.md).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate

# the reference's decoders of the packed W4 buffers: the exported int8 is what it multiplies
from qcompile.runtime.ops.gemm import _w4_codes, _w8_from_groups
from qcompile.runtime.ops.quant import quant_a8_ref  # (importing the package registers the ops)

from .schemes import SPECS

if TYPE_CHECKING:
    from qcompile.runtime.artifact import Artifact

qc = torch.ops.qcompile
aten = torch.ops.aten


# ---- GEMMs: weights re-laid out at export, then traced torch code --------------------------

@dataclass(frozen=True)
class GemmLowering:
    """How one qcompile GEMM op becomes ONNX: `weights(args, k)` gives the op's weight
    arguments in the ONNX op's layout by argument index, None for a buffer the lowering no
    longer reads (computed once, at export, from the packed buffers); `run` takes the op's
    arguments with those weights and is traced."""
    weights: Callable[[tuple, int], dict[int, torch.Tensor | None]]
    run: Callable[..., torch.Tensor]


def _int8_kn(w8: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[Np, Kp] int8 codes -> [K, N]: MatMulInteger's B, padding dropped."""
    return w8[:n, :k].t().contiguous()


def _int_mm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(xq.reshape(-1, xq.shape[-1]), w)  # -> MatMulInteger


def _finish(y, bias, xq, n: int, out_dtype):
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def _w8a8_weights(args, k: int):
    _, _, w, sw, _, n, _ = args
    return {2: _int8_kn(w, n, k), 3: sw[:n].contiguous()}


def _w8a8(xq, sx, w, sw, bias, n: int, out_dtype):
    """gemm_w8a8_ref: y = s_x s_w (x_q . w_q)."""
    y = _int_mm(xq, w).float() * sx.reshape(-1, 1) * sw[None, :]
    return _finish(y, bias, xq, n, out_dtype)


def _w4a8_weights(args, k: int):
    _, _, _, w, s, zs, _, n, _ = args
    return {3: _int8_kn(_w4_codes(w, n), n, k), 4: s[:n].contiguous(), 5: zs[:n].contiguous()}


def _w4a8(xq, sx, xsum, w, s, zs, bias, n: int, out_dtype):
    """gemm_w4a8_ref on the unsigned codes 0..15 as int8: y = s_x s_w acc - (z s_w)(s_x sum x_q)."""
    sxf = sx.reshape(-1, 1)
    y = sxf * s[None, :] * _int_mm(xq, w).float() - zs[None, :] * (
        sxf * xsum.reshape(-1, 1).float())
    return _finish(y, bias, xq, n, out_dtype)


def _w4a8_group_weights(args, k: int):
    _, _, w, s1, s2, negzs, _, n, g, _ = args
    return {2: _int8_kn(_w8_from_groups(w, s2, negzs, n, g), n, k), 3: s1[:n].contiguous(),
            4: None, 5: None}  # s2, negzs are in the int8 weights


def _w4a8_group(xq, sx, w, s1, s2, negzs, bias, n: int, group_size: int, out_dtype):
    """gemm_w4a8_group_ref on w8 = q s2 - z2 s2 (per byte, decoded at export): y = s_x s1 acc."""
    y = sx.reshape(-1, 1) * s1[None, :] * _int_mm(xq, w).float()
    return _finish(y, bias, xq, n, out_dtype)


GEMMS: dict[torch._ops.OpOverload, GemmLowering] = {
    qc.gemm_w8a8.default: GemmLowering(_w8a8_weights, _w8a8),
    qc.gemm_w4a8.default: GemmLowering(_w4a8_weights, _w4a8),
    qc.gemm_w4a8_group.default: GemmLowering(_w4a8_group_weights, _w4a8_group),
}
# --precision values the exporter takes: floating-point linears, and the rows of
# compiler/schemes.py whose GEMM op has a lowering above.
PRECISIONS = tuple(p for p, s in SPECS.items() if s.op is None or s.op in GEMMS)


def matmul_integer(a, b):
    """torch.onnx translation of aten._int_mm (int8 [M, K] x int8 [K, N] -> int32).

    int8 x int8 is exact on every CPU, though onnxruntime 1.32 runs it with a slow kernel on
    most x86 (SmolLM2 W8A8 decodes at 61 ms/token on 2 cores, fp16 at 22). Feeding x_q + 128 as
    uint8 with a_zero_point 128 gives the same sums by ONNX's definition and was 3.5x faster
    on AVX-512 VNNI, but MLAS's uint8 x int8 kernel on x86 without VNNI adds pairs of products
    in int16 with saturation, which those operands can reach
    (bench/results/onnx-export-2026-12-07.md)."""
    from onnxscript import opset18 as op
    return op.MatMulInteger(a, b)


# ---- KV: typed cache in, typed cache out ---------------------------------------------------

def _kv_values(k, v, round_act):
    return k, v


def _int4_roundtrip(x: torch.Tensor, round_act) -> torch.Tensor:
    """encode_int4 then decode_int4 (runtime/ops/kv.py) without the bytes: per (token, head)
    s = (max - min) / 15 and m = min as fp16, q = clamp(round((x - m) / s), 0, 15),
    x' = q s + m, rounded to the activation dtype."""
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).half()
    s = ((xf.amax(dim=-1, keepdim=True) - lo.float()) / 15).half()
    s = torch.where(s > 0, s, torch.full_like(s, 1e-4))
    q = torch.clamp(torch.round((xf - lo.float()) / s.float()), 0, 15)
    return round_act(q * s.float() + lo.float())


def _kv_int4(k, v, round_act):
    return _int4_roundtrip(k, round_act), _int4_roundtrip(v, round_act)


# --kv format -> what its encode op becomes: the (k, v) values the attention reads
KV_ENCODE = {qc.kv_encode_fp16.default: _kv_values, qc.kv_encode_int4.default: _kv_int4}
ATTENTION = (qc.paged_attention_fp16.default, qc.paged_attention_int4.default)


class _Past:
    """The program's kv_cache input: per layer (past keys, past values) [B, Hkv, P, D]."""
    name = "kv_cache"

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers


class _AllRows:
    """The program's logits_indices input: every token's row."""
    name = "logits_indices"


class _Unused:
    """A paged-cache input the exported graph has no counterpart for."""

    def __init__(self, name: str):
        self.name = name


# Ops that only move or select values: their result needs no rounding to the activation dtype.
_MOVES = frozenset((aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                    aten.cat.default, aten.select.int, aten.slice.Tensor, aten.index.Tensor,
                    aten.transpose.int, aten.permute.default, aten.t.default,
                    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
                    aten.clone.default, aten.embedding.default, aten.neg.default,
                    operator.getitem))


@dataclass
class _Step:
    """One forward: B rows of S tokens after P cached ones, computed in float32 with every
    value the program holds in `act` (float16 / bfloat16) rounded to it; collects the
    presents."""
    b: int
    s: int
    act: torch.dtype
    present: list

    def round_act(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to the activation dtype, kept in float32 (two Casts in ONNX)."""
        return x if self.act == torch.float32 else x.to(self.act).float()

    def attention(self, q, kv, past, tables, ctx_lens, query_start, num_kv_heads: int,
                  scale: float):
        """paged_attention_ref over the typed cache: q [B*S, Hq, D], kv the new (k, v)
        [B*S, Hkv, D], past (k, v) [B, Hkv, P, D]; scores and softmax in float32."""
        (k, v), (pk, pv) = kv, past
        hq, d, p = q.shape[1], q.shape[2], pk.shape[2]
        k = torch.cat([pk, k.reshape(self.b, self.s, num_kv_heads, d).transpose(1, 2)], dim=2)
        v = torch.cat([pv, v.reshape(self.b, self.s, num_kv_heads, d).transpose(1, 2)], dim=2)
        self.present += [k, v]
        g = hq // num_kv_heads
        qb = q.reshape(self.b, self.s, hq, d).transpose(1, 2)
        pos = torch.arange(self.s, device=q.device) + p
        mask = torch.arange(p + self.s, device=q.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(qb, k.repeat_interleave(g, dim=1),
                                           v.repeat_interleave(g, dim=1),
                                           attn_mask=mask, scale=scale)
        return o.transpose(1, 2).reshape(self.b * self.s, hq, d)

    def call(self, node: fx.Node, args: tuple, kwargs: dict):
        """The node's value, computed in float32 where the program computes in `act`."""
        args, kwargs = map_aggregate((args, kwargs), self._compute_dtype)
        y = self._call(node, args, kwargs)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == self.act and node.target not in _MOVES:
            y = self.round_act(y)
        return y

    def _compute_dtype(self, a):
        return torch.float32 if isinstance(a, torch.dtype) and a == self.act else a

    def _call(self, node: fx.Node, args: tuple, kwargs: dict):
        t = node.target
        if t in ATTENTION:
            return self.attention(*args)
        if t in KV_ENCODE:
            return KV_ENCODE[t](*args, self.round_act)
        if t in GEMMS:
            return GEMMS[t].run(*args)
        if t == qc.quant_a8.default:
            return quant_a8_ref(*args)
        if t == aten.select.int and isinstance(args[0], _Past):
            return args[0].layers[args[2]]
        if t == aten.index.Tensor and isinstance(args[1][0], _AllRows):
            return args[0]
        bad = [a for a in (*args, *kwargs.values()) if isinstance(a, (_Past, _AllRows, _Unused))]
        if bad or (isinstance(t, torch._ops.OpOverload) and t.namespace != "aten"):
            what = ", ".join(getattr(a, "name", type(a).__name__) for a in bad) or "its inputs"
            raise ValueError(f"node {node.name} calls {t} on {what}, which the ONNX exporter "
                             "has no translation for")
        return t(*args, **kwargs)


class OnnxDecoder(nn.Module):
    """An artifact's program over a typed KV cache (the interface of the module docstring).
    `forward(input_ids, past)` with past = [k0, v0, k1, v1, ...] returns
    (logits, [present k0, v0, ...]). Weights keep their stored dtype (the file's size);
    float16 / bfloat16 ones are widened in the graph."""

    def __init__(self, ep: torch.export.ExportedProgram, weights: list[torch.Tensor],
                 act: torch.dtype):
        super().__init__()
        kinds = {s.kind for s in ep.graph_signature.input_specs}
        if kinds != {torch.export.graph_signature.InputKind.USER_INPUT}:
            raise ValueError("the program holds parameters or buffers; qcompile programs take "
                             "their weights as inputs (recompile the artifact)")
        self.act, self.graph = act, ep.graph_module.graph
        nodes = list(self.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        values = dict(zip(self.placeholders, weights))
        for node in nodes:
            low = GEMMS.get(node.target)
            if low is not None:
                args = fx.map_arg(node.args, lambda a: values.get(a, a))
                k = node.args[0].meta["val"].shape[-1]
                for i, t in low.weights(args, k).items():
                    if len(node.args[i].users) != 1:
                        raise ValueError(f"GEMM weight {node.args[i].name} has several users")
                    values[node.args[i]] = t
        self.weight_names = []  # per weight placeholder: its buffer, or None (not read)
        for i, ph in enumerate(self.placeholders[: len(weights)]):
            name = None if values[ph] is None else f"w{i}_{ph.name}"
            if name is not None:
                self.register_buffer(name, values[ph])
            self.weight_names.append(name)
        logits = next(n for n in nodes if n.op == "output").args[0][0]
        self.logits_node, self.live = logits, _ancestors(logits)

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        b, s = input_ids.shape
        p = past[0].shape[2]
        step = _Step(b, s, self.act, [])
        positions = (torch.arange(s, device=input_ids.device) + p).repeat(b)
        past = [x.float() for x in past]
        inputs = [input_ids.reshape(-1), positions, _Past(list(zip(past[0::2], past[1::2]))),
                  _Unused("block_tables"), _Unused("ctx_lens"), _Unused("query_start"),
                  _AllRows()]
        weights = [None if n is None else getattr(self, n) for n in self.weight_names]
        weights = [w.float() if w is not None and w.is_floating_point() else w for w in weights]
        env = dict(zip(self.placeholders, [*weights, *inputs]))
        for node in self.graph.nodes:
            if node.op == "call_function" and node in self.live:
                env[node] = step.call(node, fx.map_arg(node.args, env.__getitem__),
                                      fx.map_arg(node.kwargs, env.__getitem__))
        logits = env[self.logits_node].reshape(b, s, -1)
        return logits, [x.to(self.act) for x in step.present]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """node and everything it reads: the logits' part of the graph (the new_kv output,
    the stacked records, is dropped: the presents replace it)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{{}}.{i}.{x}" for i in range(num_layers) for x in ("key", "value")]
    return (["input_ids"] + [n.format("past_key_values") for n in kv],
            ["logits"] + [n.format("present") for n in kv])


def load_decoder(artifact) -> tuple[OnnxDecoder, Artifact]:
    """(OnnxDecoder of the artifact's program, the opened Artifact); refuses precisions the
    exporter has no lowering for, before reading the weights."""
    from qcompile.runtime.artifact import load_program, load_weights, open_artifact
    art = open_artifact(artifact, torch.device("cpu"))
    if art.compile.precision not in PRECISIONS:
        raise ValueError(f"{art.path}: --precision {art.compile.precision} artifacts cannot be "
                         f"exported to ONNX; supported: {', '.join(PRECISIONS)}")
    return OnnxDecoder(load_program(art.path), load_weights(art, torch.device("cpu")),
                       art.compile.torch_dtype), art


def example_args(model_cfg, dtype: torch.dtype, batch: int = 2, seq: int = 3,
                 past: int = 2) -> tuple:
    """(input_ids, past) of the given sizes, random: what the export traces (>= 2 each, so
    torch.export specializes no size to 0 or 1)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), generator=g)
    shape = (batch, model_cfg.num_kv_heads, past, model_cfg.head_dim)
    return ids, [torch.randn(shape, generator=g).to(dtype)
                 for _ in range(2 * model_cfg.num_layers)]
