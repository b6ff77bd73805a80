"""CUDA implementations of the quantized GEMM ops: choose the tile config for (M, N, K),
take its kernel from the active kernel table, check the inputs, launch on PyTorch's current
stream (so CUDA graphs capture it).

Kernel tables belong to their users: an `Engine` holds a `Kernels` (its table and the counts
of its launches and reference fallbacks) and makes it active around each call of its program
(`Kernels.wrap`, `using`), so two engines in one process keep their own tables and counts.
The CUDA implementations are registered once per process (`register`) and serve whichever
`Kernels` is active; outside any, the process default that `enable(kernel_dir)` loads
(benchmarks, tests; its counts are `STATS`). A call the active table has no kernel for (a
float32 program, a shape it was not built for) runs the reference implementation, counted in
its `gemm.fallbacks` with the reason, so a benchmark can say what it measured.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qcompile.compiler.schemes import WITH_KERNELS, SchemeSpec, spec_of_call
from qcompile.cutlass_templates.configs import (A4X_S4_KINDS, padded_k, select_config,
                                               select_kernel)


@dataclass
class Stats:
    launches: collections.Counter = field(default_factory=collections.Counter)
    fallbacks: collections.Counter = field(default_factory=collections.Counter)


class KernelTable:
    """name -> loaded CudaKernel, from a directory holding kernels.json and the binaries."""

    def __init__(self, kernel_dir):
        from qcompile.cutlass_templates.build import read_kernel_table
        from qcompile.runtime.launcher import CudaModule
        self.dir = Path(kernel_dir)
        self.kernels = {}
        for entry in read_kernel_table(self.dir):
            module = CudaModule(self.dir / entry["file"])
            for name in entry["entries"]:
                kernel = module.function(name)
                kernel.set_max_dynamic_smem(entry["smem_bytes"])
                self.kernels[name] = kernel


class Kernels:
    """One user's kernels: a kernel table (None: every op runs its reference) and the counts
    of its GEMM and attention launches and fallbacks. `gemm_on` / `attention_on` False keep
    those ops on their references (to compare; attention's default is off where
    $QCOMPILE_ATTENTION is "reference")."""

    def __init__(self, table: KernelTable | None = None, *, attention: bool | None = None):
        self.table, self.gemm_on = table, True
        self.attention_on = attention_by_default() if attention is None else attention
        self.gemm, self.attention = Stats(), Stats()
        # > 0: attention launches batch-invariant plans with splits of this many keys
        # (attention_configs.plan_invariant; Engine.load(batch_invariant=True))
        self.split_keys = 0

    @classmethod
    def load(cls, kernel_dir, device: torch.device) -> "Kernels":
        """The kernels in kernel_dir, with the ops routed to the active kernels and the
        device's split-K counters allocated (before any CUDA-graph capture)."""
        from . import attention_kernels
        kernels = cls(KernelTable(kernel_dir))
        split_k_flags(device)
        register()
        attention_kernels.register()
        return kernels

    def wrap(self, program):
        """`program`, called with these kernels active (what an Engine runs)."""
        def run(*args, **kwargs):
            with using(self):
                return program(*args, **kwargs)
        return run


def attention_by_default() -> bool:
    """Attention kernels on unless $QCOMPILE_ATTENTION is "reference"."""
    return os.environ.get("QCOMPILE_ATTENTION", "kernels") != "reference"


_DEFAULT = Kernels()  # the process default: enable() loads its table
_ACTIVE: contextvars.ContextVar[Kernels | None] = contextvars.ContextVar("qcompile_kernels",
                                                                        default=None)
STATS = _DEFAULT.gemm  # the default's GEMM counts (benchmarks, tests)


def active() -> Kernels:
    """The kernels of the current call: the innermost `using`, else the process default."""
    return _ACTIVE.get() or _DEFAULT


@contextlib.contextmanager
def using(kernels: Kernels):
    """Make `kernels` the active ones for the ops called inside (this thread or task)."""
    token = _ACTIVE.set(kernels)
    try:
        yield kernels
    finally:
        _ACTIVE.reset(token)


# Split-K arrival counters (common.cuh), one zeroed buffer per device that every split-K launch
# on it shares: kernels leave them zero, and launches on one stream run one after another.
# Allocated outside any CUDA-graph capture (graphs keep the address); replaced buffers are
# kept alive for graphs captured with them.
FLAG_SLOTS = 1 << 16
_FLAGS: dict[int, torch.Tensor] = {}
_RETIRED_FLAGS: list[torch.Tensor] = []


def split_k_flags(device: torch.device, count: int = FLAG_SLOTS) -> torch.Tensor:
    """The device's zeroed split-K counters, at least `count` of them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLAGS.get(index)
    if buf is None or buf.numel() < count:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"split-K GEMM needs {count} arrival counters on cuda:{index} but "
                f"{0 if buf is None else buf.numel()} were allocated before this CUDA-graph "
                "capture; run the GEMM once eagerly (warm-up) before capturing")
        if buf is not None:
            _RETIRED_FLAGS.append(buf)
        _FLAGS[index] = buf = torch.zeros(max(count, FLAG_SLOTS), dtype=torch.int32,
                                          device=f"cuda:{index}")
    return buf


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# Launch the separate split-K reduction with programmatic dependent launch on sm_90+: its
# launch overlaps the GEMM's tail and it waits for the GEMM in-kernel (griddepcontrol.wait);
# the GEMM lets it launch once every CTA has started its main loop (launch_dependents).
PDL = os.environ.get("QCOMPILE_PDL", "1") != "0"


def device_target(device: torch.device) -> str:
    """The kernel target whose templates run best on this device: sm90 from Hopper on."""
    return "sm90" if has_clusters(device) else "sm80"


def has_clusters(device: torch.device) -> bool:
    """sm_90 and newer: thread-block clusters (the "cluster" split-K reduction) and
    programmatic dependent launch."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


def default_kernel_dir() -> Path:
    """$QCOMPILE_KERNEL_DIR, else build/kernels_sm<major>0 (where bench/build_kernels.py puts
    them) for the current GPU."""
    major = torch.cuda.get_device_capability()[0]
    return Path(os.environ.get("QCOMPILE_KERNEL_DIR", f"build/kernels_sm{major}0"))


def register() -> None:
    """Route CUDA calls of the GEMM ops to the active kernels (per process; registering again
    replaces the same implementations)."""
    for op in dict.fromkeys(s.op for s in WITH_KERNELS):  # a group op serves several rows
        torch.library.register_kernel(op, "cuda", _impl(op))


def enable(kernel_dir=None) -> KernelTable:
    """Load the kernels in kernel_dir as the process default and route CUDA calls of the GEMM
    ops to the active kernels (benchmarks and tests; an Engine holds its own)."""
    _DEFAULT.table = KernelTable(kernel_dir or default_kernel_dir())
    split_k_flags(torch.device("cuda"))
    register()
    return _DEFAULT.table


def _find(kind: str, m: int, n: int, k: int, out_dtype):
    """(kernel kind, config, kernel), or None with the reason counted (and warned once)."""
    kernels = active()
    table = kernels.table
    if out_dtype != torch.float16:
        reason = f"{kind}: the kernels write float16, the program asks for {out_dtype}"
    elif table is None:
        reason = f"{kind}: no kernel table enabled"
    elif not kernels.gemm_on:
        reason = f"{kind}: GEMM kernels turned off"
    else:
        # the target's own template first (wgmma on sm90), if the table has it (an artifact
        # built for sm80 running on an H100 has not), else the portable mma.sync kernel
        kkind, cfg = select_kernel(kind, m, n, k, device_target(torch.device("cuda")))
        kernel = table.kernels.get(cfg.name(kkind))
        if kernel is None and kkind != kind:
            kkind, cfg = kind, select_config(kind, m, n, k)
            kernel = table.kernels.get(cfg.name(kind))
        if kernel is not None:
            return kkind, cfg, kernel
        reason = f"{kind}: {cfg.name(kind)} is not in {table.dir}"
    _fallback(reason)
    return None


def _fallback(reason: str) -> None:
    """Count a call that runs the reference instead of a kernel (warned once a reason)."""
    stats = active().gemm
    if not stats.fallbacks[reason]:
        warnings.warn(f"qcompile GEMM runs the PyTorch reference: {reason}")
    stats.fallbacks[reason] += 1


def _launch(found, xq, sx, operands, n, k_packed, out=None, k=None, extra=()):
    """_run with what _find returned: (kernel kind, config, kernel)."""
    kind, cfg, kernel = found
    return _run(kind, (cfg, kernel), xq, sx, operands, n, k_packed, out, k, extra)


def _run(kind, found, xq, sx, operands, n, k_packed, out=None, k=None, extra=()):
    """Launch the kernel (and, for a split-K config with the separate reduction, its _reduce
    entry) into out (fp16 [..., n]; allocated when None: tests pass a poisoned one). k: the
    input channels where x_q's rows hold them packed (A4x), else x_q's width; extra: int
    arguments after K (the s4 W4Ax kind's n8)."""
    from qcompile.runtime.launcher import check_tensor, i32, ptr
    cfg, kernel = found
    kernels = active()
    width = xq.shape[-1]
    k = width if k is None else k
    m = xq.numel() // width
    check_tensor(xq, name="x_q", dtype=torch.int8)
    check_tensor(sx, name="s_x", dtype=torch.float32, align=4)
    if k % 16 or width % 16 or padded_k(kind, k) != k_packed:
        raise ValueError(f"x_q has K = {k} ({width} bytes a row): the {kind} kernels need rows "
                         f"of whole 16-byte chunks (cp.async) and K padded as the layout pads it "
                         f"to equal the packed weight's {k_packed}")
    big = [t.nbytes for t in (xq, *operands) if t is not None and t.nbytes >= 1 << 31]
    if big:
        raise ValueError(f"{kind}: an operand of {big[0]} bytes: the kernels address operands "
                         "with 32-bit offsets (< 2 GiB each); split the batch or the layer")
    if out is None:
        out = torch.empty((*xq.shape[:-1], n), dtype=torch.float16, device=xq.device)
    check_tensor(out, name="out", dtype=torch.float16, shape=(*xq.shape[:-1], n), align=4)
    if m == 0:
        return out
    if cfg.reduce == "cluster" and not has_clusters(xq.device):
        cfg = cfg.with_split(cfg.split_k, "separate")  # same binary, sm_80/sm_86/sm_89
    ws = flags = None
    if cfg.workspace_bytes(m, n):
        ws = torch.empty(cfg.workspace_bytes(m, n) // 4, dtype=torch.int32, device=xq.device)
    if cfg.flag_count(m, n):
        flags = split_k_flags(xq.device, cfg.flag_count(m, n))
    args = [ptr(xq), ptr(sx), *map(ptr, operands), ptr(out), ptr(ws), ptr(flags), i32(m),
            i32(n), i32(k), *map(i32, extra)]
    kernel.launch(cfg.grid(m, n), (cfg.threads(), 1, 1), cfg.smem_bytes(kind), args,
                  cluster=cfg.cluster_dims())
    reduce = cfg.reduce_launch(m, n)
    if reduce is not None:  # the separate split-K reduction, next on the same stream
        kernels.table.kernels[cfg.name(kind) + "_reduce"].launch(
            *reduce, 0, args, pdl=PDL and has_clusters(xq.device))
    kernels.gemm.launches[cfg.label(kind)] += 1
    return out


def _impl(op):
    """The CUDA implementation of a GEMM op of the scheme rows: its call
    (x_q, s_x, [sum x_q], *weights, bias, n, *extra, out_dtype) launches the kernel of its row's
    kind with the operands between s_x and n, or runs the row's reference."""
    names = [a.name for a in op._schema.arguments]
    n_at = names.index("n")

    def impl(*args, **kwargs):
        named = {**dict(zip(names, args)), **kwargs}
        args = [named[name] for name in names]
        spec: SchemeSpec | None = spec_of_call(op, named)
        if spec is None:
            raise ValueError(f"{op}: no scheme row has these arguments "
                             f"({ {k: v for k, v in named.items() if type(v) is int} })")
        xq, n = args[0], named["n"]
        block, kind = spec.kernel.block, spec.kernel_kind(named)
        if block and named["block"] != block:  # a hand-made program: the kernels' block is 128
            _fallback(f"{kind}: activation blocks of {named['block']} channels, "
                      f"the kernels take {block}")
            return spec.reference(*args)
        k = spec.gemm_k(xq.shape[-1], named)
        found = _find(kind, xq.numel() // xq.shape[-1], n, k, named["out_dtype"])
        if found is None:
            return spec.reference(*args)
        operands = args[2:n_at]  # [sum x_q], packed weights, bias
        weight = operands[int(spec.uses_sum)]
        extra = (named["n8"],) if kind in A4X_S4_KINDS else ()
        if block:  # per-block scales s_x [..., K / block] and the row sums t [..., 1], float32
            from qcompile.runtime.launcher import check_tensor
            if k % block:
                raise ValueError(f"{spec.kernel.kind}: K = {k} is not a multiple of the "
                                 f"activation block ({block})")
            check_tensor(args[1], name="s_x", dtype=torch.float32, align=4,
                         shape=(*xq.shape[:-1], k // block), device=xq.device)
            check_tensor(args[2], name="t", dtype=torch.float32, align=4,
                         shape=(*xq.shape[:-1], 1), device=xq.device)
        return _launch(found, xq, args[1], operands, n, spec.layout.packed_k(weight), k=k,
                       extra=extra)

    return impl
