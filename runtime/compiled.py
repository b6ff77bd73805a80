"""The program's glue under TorchInductor (Engine.load's `compile`): torch.compile with one
graph for every step shape (`torch_compile`), the graph edits it makes (`inline_act_quants`,
shared with AOTInductor; `fast_kv_rotation`, `drop_logits_upcast`), and Inductor's cache in
qcompile's cache folder (`persistent_cache`). AOTInductor's packages are in runtime/aot.py."""
from __future__ import annotations

import math
import os

import torch


def torch_compile(program, weights=(), rotation: str | None = None):
    """The program under torch.compile, one graph for every step shape: dynamic shapes without
    duck sizing, which equated the step inputs' storage offsets in the staging buffer with
    unrelated sizes and recompiled per decode bucket (six ~30 s compiles of the 1B shape on an
    H100). A dimension of one would still specialise a graph of its own (0/1 specialisation),
    so compiled steps never have one (`Engine._layout` adds a padding row; decode buckets start
    at 2). Size-oblivious reasoning (`backed_size_oblivious`) avoids that too but made the
    compile itself over 5x slower on the CPU. Rounding to the activation dtype where eager does
    (before quantization), so that the compiled program produces the reference ops' int8
    codes. rotation: `fast_kv_rotation`'s mode (None: $QCOMPILE_FAST_KV_ROTATION's)."""
    from torch.fx.experimental import _config as fx_config
    inline_act_quants(program)
    fast_kv_rotation(program, weights, rotation)
    drop_logits_upcast(program)
    compiled = torch.compile(program, dynamic=True, options={"emulate_precision_casts": True})

    def run(*args):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)
    return run


def drop_logits_upcast(gm: torch.fx.GraphModule) -> bool:
    """Return the logits in the activation dtype where the program casts them to float32 at
    its end (models/decoder.py): the cast was a kernel of its own and doubled what sampling
    reads (64 rows of a 128k vocabulary: 16 us for the cast on an H100, and 33 MB instead of
    16 for the argmax). Exact: every float16 / bfloat16 value is a float32; the engine's
    consumers take either (sampling upcasts where it computes, `Engine.score` returns
    float32). Returns whether the graph changed."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = out.args[0]
    logits = results[0] if isinstance(results, (tuple, list)) and results else None
    if not isinstance(logits, torch.fx.Node) or logits.op != "call_function" or not logits.args:
        return False
    src = logits.args[0]
    casts = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype,
             torch.ops.prims.convert_element_type.default)
    val, src_val = logits.meta.get("val"), getattr(src, "meta", {}).get("val")
    if logits.target not in casts or val is None or src_val is None or \
            val.dtype != torch.float32 or src_val.dtype not in (torch.float16, torch.bfloat16):
        return False
    out.args = ((src, *results[1:]),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return True


def inline_act_quants(gm: torch.fx.GraphModule) -> int:
    """Call each activation quantizer's ATen reference where the graph still calls its opaque
    op (the compiler's fusion passes inline it after RMSNorm and SiLU*Mul; the attention
    output, wo's input, keeps the op), so that Inductor fuses it into one kernel: eager, it is
    ~9 ATen kernels a layer (abs, max, div, round, clamp, casts, sum; ~0.25 ms of a 1B decode
    step on an H100). The same maths, so the same codes. Returns the number of calls inlined."""
    from qcompile.compiler.schemes import ACT_QUANTS
    refs = {act.op: act.reference for act in ACT_QUANTS}
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in refs:
            node.target = refs[node.target]
            n += 1
    if n:
        gm.recompile()
    return n


def persistent_cache() -> None:
    """Inductor's caches (compiled graphs, autotuning) under qcompile's cache folder unless
    TORCHINDUCTOR_CACHE_DIR is set: its default is under /tmp, which a reboot clears, and a
    warm load should find the compiled glue of its last run (issue 13: load to first token
    in seconds when warm)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from qcompile.models.default_model import cache_dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def fwht_rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [N, D] @ h for h = diag(s) H / sqrt(D), H the Sylvester Hadamard matrix of order D (a
    power of two) and s = +-1: x * s, then log2(D) butterflies (a + b, a - b), in float32, cast
    back once. Pointwise only, so Inductor fuses it into its producer (RoPE); the mm it replaces
    was two cuBLAS launches a layer, 74 us of the 1B shape's 2.0 ms decode step on an H100
    (bench/results/gpu-h100-2026-12-07d.md). s is read from h's first column (H's is all
    ones), inside the graph: no host synchronisation."""
    n, d = x.shape
    y = x.float() * torch.sign(h[:, 0].float())
    half = 1
    while half < d:
        y = y.reshape(n, d // (2 * half), 2, half)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        half *= 2
    return (y.reshape(n, d) * (1.0 / math.sqrt(d))).to(x.dtype)


def _signed_sylvester(h: torch.Tensor) -> bool:
    """Whether h [D, D] is diag(s) H_sylvester / sqrt(D) (to h's dtype's rounding)."""
    if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] < 2 or h.shape[0] & (h.shape[0] - 1):
        return False
    from qcompile.compiler.rotate import hadamard  # H / sqrt(D), Sylvester for powers of two
    h = h.detach().float().cpu()
    want = torch.sign(h[:, 0])[:, None] * hadamard(h.shape[0])
    return bool(torch.allclose(h, want, atol=2e-3, rtol=0))


def dense_rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x [N, D] @ h [D, D] as a broadcast product summed over D in float32, cast back once:
    under Inductor one reduction kernel that computes its input in place (RoPE, fused into
    the loads), so RoPE and the rotation of q or k are one kernel, not a Triton kernel and a
    cuBLAS mm. Any h; D^2 multiply-adds a row (4,096 at D = 64), which a decode step's few
    thousand rows do not notice. Eager it would materialize [N, D, D]: only for torch.compile."""
    return (x.float()[:, :, None] * h.float()[None]).sum(dim=1).to(x.dtype)


ROTATION_MODES = ("0", "1", "dense", "kernel")
# Whether engines rotate inside the kernels unless told otherwise (QCOMPILE_FAST_KV_ROTATION
# chooses): on since the H100 ran test_rotation_in_kernels (every entry, splits, graph replay)
# and qbench's A/B, 1B shape 64 x 1024 / 128: 15,245 output tok/s against 14,539 with the
# mms, decode step p50 1.7 against 1.8 ms (bench/results/gpu-h100-2026-12-07h.md).
KERNEL_ROTATION_DEFAULT = True


def rotation_mode(kernels_rotate: bool, invariant: bool = False) -> str:
    """`fast_kv_rotation`'s mode for an engine: $QCOMPILE_FAST_KV_ROTATION when set, else
    "kernel" where the attention kernels rotate (`attention_kernels.rotates`) and
    KERNEL_ROTATION_DEFAULT holds, else "0". A batch-invariant engine needs a rotation that
    does not depend on the row count: "0" becomes "kernel" where that would be the default,
    else "dense"."""
    default = kernels_rotate and KERNEL_ROTATION_DEFAULT
    mode = os.environ.get("QCOMPILE_FAST_KV_ROTATION") or ("kernel" if default else "0")
    if mode not in ROTATION_MODES:
        raise ValueError(f"QCOMPILE_FAST_KV_ROTATION={mode!r}: expected one of "
                         f"{', '.join(ROTATION_MODES)}")
    if mode == "kernel" and not kernels_rotate:
        mode = "0"
    if invariant and mode == "0":
        mode = "kernel" if default else "dense"
    return mode


def fast_kv_rotation(gm: torch.fx.GraphModule, weights, mode: str | None = None) -> int:
    """Rewrite the graph's multiplications by the key / query rotation (passes/rotate_kv.py,
    `mm(x, kv_rotation)`) as `mode` (default $QCOMPILE_FAST_KV_ROTATION) says: "0" (default)
    keeps the mm, "dense" calls `dense_rotate` (any square weight of an mm, at most 256
    wide), "1" calls `fwht_rotate` where the weight is a signed Sylvester Hadamard matrix;
    "kernel" hands such a weight to the int4 encode and attention ops that read the product
    (`fold_kv_rotation`: the kernels rotate in registers; an engine's default where its
    kernels can, see `rotation_mode`); the same product to rounding.
    `weights`: the values of the graph's first placeholders, in order (the program's
    weights); nothing changes without them. Returns the calls replaced.

    "1" is off by default: with it on, the 1B shape's Inductor decode step
    on an H100 measured 2.1 ms against 2.0 and its cold compile 105-123 s against 49
    (bench/results/gpu-h100-2026-12-07e.md; two other changes landed with it, so this is not
    yet isolated). Inductor cannot keep the butterflies in registers: each stage reads
    elements another thread wrote, so it realizes a buffer per stage (12 for D = 64 in its CPU
    code), on the GPU a Triton kernel each, ~190 launches a step where the mm made 32, and
    ~1,000 more IR nodes to schedule. "dense" trades the butterflies' O(D log D) for D^2 in
    one kernel. The rotation's final place is inside our KV-write and attention kernels (a
    warp-shuffle transform), not the glue; bench/gpu_ab.sh measures these switches on the
    device."""
    if mode is None:
        mode = os.environ.get("QCOMPILE_FAST_KV_ROTATION", "0")
    if mode == "kernel":
        return fold_kv_rotation(gm, weights)
    if mode not in ("1", "dense"):
        return 0
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(holders, weights))
    checked: dict = {}
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.mm.default:
            continue
        h = values.get(node.args[1])
        if h is None:
            continue
        if node.args[1] not in checked:
            checked[node.args[1]] = (_signed_sylvester(h) if mode == "1" else
                                     h.dim() == 2 and h.shape[0] == h.shape[1] <= 256)
        if checked[node.args[1]]:
            node.target = fwht_rotate if mode == "1" else dense_rotate
            n += 1
    if n:
        gm.recompile()
    return n


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default)


def _rotated(x, values: dict, checked: dict):
    """(input, H node) where x is view(mm(view(input), H)) with H a weight that is a signed
    Sylvester Hadamard matrix (passes/rotate_kv.py's `_rotate`), else None."""
    if not (isinstance(x, torch.fx.Node) and x.target in _VIEWS):
        return None
    mm = x.args[0]
    if not (isinstance(mm, torch.fx.Node) and mm.target is torch.ops.aten.mm.default):
        return None
    flat, h = mm.args[:2]
    if not (isinstance(flat, torch.fx.Node) and flat.target in _VIEWS) or h not in values:
        return None
    if h not in checked:
        checked[h] = _signed_sylvester(values[h])
    src = flat.args[0]
    shapes = [n.meta.get("val") for n in (src, x)]
    if not checked[h] or any(v is None for v in shapes) or shapes[0].shape != shapes[1].shape:
        return None
    return src, h


def fold_kv_rotation(gm: torch.fx.GraphModule, weights) -> int:
    """Hand the key rotation to the int4 KV encode and attention ops: where an op's keys or
    queries are view(mm(view(x), H)) with H a signed Sylvester Hadamard weight, the op takes
    x and `rotation=H` instead and the mms go (the kernels apply H in registers, a
    Walsh-Hadamard transform, cutlass_templates/paged_attention.cu `rotate_q`; the reference
    ops multiply as the graph did). The mms were two cuBLAS launches a layer, 74 us of the 1B
    shape's 2.0 ms decode step on an H100; the in-register transform is also batch-invariant,
    which the mm was not. Only for an engine whose attention kernels rotate
    (`attention_kernels.rotates`): another would multiply before its kernel. Returns the ops
    changed."""
    from qcompile.runtime.ops import ATTENTION_OPS, KV_ENCODE_OPS
    targets = {ATTENTION_OPS["int4"], KV_ENCODE_OPS["int4"]}
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values, checked, n = dict(zip(holders, weights)), {}, 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets or \
                node.kwargs.get("rotation") is not None:
            continue
        found = _rotated(node.args[0], values, checked)
        if found is None:
            continue
        node.args = (found[0], *node.args[1:])
        node.kwargs = {**node.kwargs, "rotation": found[1]}
        n += 1
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return n
