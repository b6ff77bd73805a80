"""GEMM benchmark: qcompile's W4A8 / W4A8-g128 / W8A8 / W4Ax ops against cuBLAS fp16, int8,
fp8 and tinygemm W4A16, side by side in one process, on the linear shapes of Llama-3-8B and
Llama-2-7B.

    python bench/gemm.py [--m 1,16,...] [--shapes llama3-8b,llama2-7b:qkv] [--iters 30]
                         [--out out/bench] [--s8-peak-tops 1289] [--no-graph] [--quick]
                         [--w4a4-shares 0,0.125,0.25] [--w4a4-packed]

* ours: the public ops `torch.ops.qcompile.gemm_*` on weights packed by
  `GEMM_FORMATS[scheme].pack` (on CPU, then copied), activations quantized by `quant_a8_ref`
  on the GPU outside the timed region (W4Ax: `quant_a4x_ref` with --w4a4-shares of the
  128-channel blocks in 8 bits, one row per share), fp16 out. Kernels come from
  `qcompile.runtime.gemm_kernels.enable()`; a call that ran the PyTorch reference instead
  (no kernels, or none for that shape: gemm_kernels.STATS) says `ref` and why. Guard, before
  timing each (shape, M, scheme): up to 32 rows of the GPU output against the same op on CPU
  (the reference); relative Frobenius error > 1e-2 or a non-finite value prints FAIL and
  marks the row (it is still timed).
* peers: cuBLAS fp16 `x @ w.t()` (w [N, K] as nn.Linear holds it); cuBLAS int8
  `torch._int_mm` (int32 out, no dequant epilogue; it needs M > 16, so M <= 16 runs padded to
  M = 32, as a caller would, and the row says so); cuBLAS fp8 e4m3 `torch._scaled_mm` with the
  weight column-major (`w8.t()`), rowwise scales [M,1] x [1,N] and bf16 out, else per-tensor
  scales and fp16 out, no fast accumulation; tinygemm `aten._weight_int4pack_mm` (bf16, g128).
* timing: the inputs are cloned into max(2, ceil(2 L2 / bytes per call)) copies and one pass
  calls the op once per copy, so no call finds its operands in L2 (50 MB on H100). A pass is
  replayed as a CUDA graph (as the runtime does; no Python dispatch cost), eagerly if capture
  fails or with --no-graph. `torch.cuda._sleep` before each pass lets the CPU queue all of it,
  so the CUDA events see GPU time only. Time per call = median over passes / copies.
* limits: TOP/s = 2 M N K / t. M <= 64: fraction of the weight-bytes bound, weight bytes over
  the device copy bandwidth (2 x bytes / time of a 1 GiB `copy_`: read + write, measured at
  startup). M >= 1024: fraction of the mma.sync s8 peak (--s8-peak-tops; default 1289, the
  H200 register-only figure of HARDWARE.md). Speedup of ours = peer time / our time.
Writes <out>/gemm.md (also printed), gemm.csv and gemm.png (TOP/s vs M per shape, with the W4
and fp16 weight-bandwidth bounds dashed) after every shape.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # model -> layer -> (N, K)
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                  "down": (4096, 14336)},
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096),
                  "down": (4096, 11008)},
}
PEERS = ("cublas-fp16", "cublas-int8", "cublas-fp8", "tinygemm-w4a16")
CSV_COLUMNS = ("shape", "N", "K", "M", "impl", "status", "time_us", "tops", "weight_bytes",
               "bound_us", "frac_bw", "frac_s8", *(f"x_{p}" for p in PEERS), "note")
REL_TOL = 1e-2


class Skip(Exception):
    """This implementation does not run on this build or shape (the message says why)."""


@dataclass
class Case:
    fn: Callable
    args: tuple
    weight_bytes: int
    note: str = ""
    status: str = "ok"


# ---- pure logic (no GPU) -------------------------------------------------------------------

def parse_shapes(spec: str) -> list[tuple[str, int, int]]:
    """'llama3-8b,llama2-7b:o' -> [('llama3-8b/qkv', 6144, 4096), ...]."""
    out = []
    for tok in filter(None, (t.strip() for t in spec.split(","))):
        model, _, layer = tok.partition(":")
        if model not in MODELS or (layer and layer not in MODELS[model]):
            raise SystemExit(f"unknown shape {tok!r}; models: {sorted(MODELS)}")
        out += [(f"{model}/{name}", *nk) for name, nk in MODELS[model].items()
                if not layer or name == layer]
    return out


def tops(m: int, n: int, k: int, us: float) -> float:
    return 2 * m * n * k / (us * 1e-6) / 1e12


def bw_roofline_tops(m: int, n: int, k: int, bytes_per_weight: float, bw: float) -> float:
    """TOP/s if the GEMM took exactly the time to read its weights once at bw bytes/s."""
    return 2 * m * n * k / (n * k * bytes_per_weight / bw) / 1e12


def n_copies(set_bytes: int, l2_bytes: int) -> int:
    return max(2, min(64, math.ceil(2 * l2_bytes / max(set_bytes, 1))))


def int8_rows(m: int) -> int:
    return m if m > 16 else 32  # torch._int_mm needs M > 16


def derive(rows: list[dict], bw: float, s8_peak_tops: float) -> list[dict]:
    """Adds tops, bound_us, frac_bw (M <= 64), frac_s8 (M >= 1024), x_<peer> (ours rows)."""
    by_key = {(r["shape"], r["M"], r["impl"]): r for r in rows}
    for r in rows:
        t = r.get("time_us")
        r["tops"] = tops(r["M"], r["N"], r["K"], t) if t else None
        r["bound_us"] = r["weight_bytes"] / bw * 1e6 if r.get("weight_bytes") else None
        r["frac_bw"] = r["bound_us"] / t if t and r["bound_us"] and r["M"] <= 64 else None
        r["frac_s8"] = r["tops"] / s8_peak_tops if t and r["M"] >= 1024 else None
        for p in PEERS:
            peer = by_key.get((r["shape"], r["M"], p), {}).get("time_us")
            ours = r["impl"].startswith("ours")
            r[f"x_{p}"] = peer / t if ours and t and peer else None
    return rows


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(rows: list[dict]) -> str:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape]
        out += [f"### {shape} (N={sub[0]['N']}, K={sub[0]['K']})", "",
                "| M | impl | us | TOP/s | " + " | ".join(f"x {p}" for p in PEERS)
                + " | limit | status | note |", "|---" * (7 + len(PEERS)) + "|"]
        for r in sub:
            lim = (f"{r['frac_bw']:.0%} of BW bound" if r.get("frac_bw") is not None else
                   f"{r['frac_s8']:.0%} of s8 peak" if r.get("frac_s8") is not None else "")
            ratios = " | ".join(_f(r.get(f"x_{p}"), ".2f") for p in PEERS)
            status = f"**{r['status']}**" if r["status"] in ("FAIL", "error") else r["status"]
            out.append(f"| {r['M']} | {r['impl']} | {_f(r.get('time_us'), '.1f')} | "
                       f"{_f(r.get('tops'), '.1f')} | {ratios} | {lim} | {status} | "
                       f"{r.get('note', '')} |")
        out.append("")
    return "\n".join(out)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS} for r in rows)


def plot(rows: list[dict], path: Path, title: str, bw: float, s8_peak_tops: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ncol = min(4, len(shapes))
    fig, axes = plt.subplots(math.ceil(len(shapes) / ncol), ncol, squeeze=False,
                             figsize=(4.6 * ncol, 3.9 * math.ceil(len(shapes) / ncol)))
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if r["shape"] == shape]
        n, k, ms = sub[0]["N"], sub[0]["K"], sorted({r["M"] for r in sub})
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["M"], r["tops"]) for r in sub if r["impl"] == impl and r.get("tops"))
            ref = any(r["status"] == "ref" for r in sub if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=impl + (" [ref]" if ref else ""),
                        lw=2 if impl.startswith("ours") else 1)
        for label, bpw, color in (("W4 weight-BW bound", 0.5, "tab:gray"),
                                  ("fp16 weight-BW bound", 2.0, "k")):
            ax.plot(ms, [bw_roofline_tops(m, n, k, bpw, bw) for m in ms], "--", color=color,
                    lw=0.8, label=label)
        ax.axhline(s8_peak_tops, ls=":", color="tab:red", lw=0.8, label="s8 mma.sync peak")
        ax.set(yscale="log", title=f"{shape} N={n} K={k}", xlabel="M", ylabel="TOP/s")
        ax.set_xscale("log", base=2)
        ax.set_ylim(top=s8_peak_tops * 3)
        ax.grid(True, which="both", lw=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows, out: Path, title: str, bw: float, s8_peak_tops: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = f"## {title}\n\n" + markdown(derive(rows, bw, s8_peak_tops))
    (out / "gemm.md").write_text(text)
    write_csv(rows, out / "gemm.csv")
    plot(rows, out / "gemm.png", title, bw, s8_peak_tops)
    return text


# ---- implementations: each returns a Case whose fn(*args) is one GEMM -------------------

class ShapeCtx:
    def __init__(self, name: str, n: int, k: int, device: str = "cuda", seed: int = 0):
        self.name, self.n, self.k, self.device = name, n, k, device
        self.w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
        self._cache: dict = {}

    def get(self, key: str, make: Callable):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def build_fp16(ctx: ShapeCtx, x: torch.Tensor) -> Case:
    w = ctx.get("fp16", lambda: ctx.w.half().to(ctx.device))
    return Case(lambda x, w: torch.matmul(x, w.t()), (x, w), w.nbytes)


def build_int8(ctx: ShapeCtx, x: torch.Tensor) -> Case:
    w = ctx.get("int8", lambda: torch.randint(-127, 128, (ctx.n, ctx.k), dtype=torch.int8)
                .to(ctx.device))
    mp = int8_rows(x.shape[0])
    a = torch.randint(-127, 128, (mp, ctx.k), dtype=torch.int8, device=x.device)
    note = f"M padded to {mp} (_int_mm needs M > 16); " if mp != x.shape[0] else ""
    return Case(lambda a, w: torch._int_mm(a, w.t()), (a, w), w.nbytes, note + "int32 out")


def build_fp8(ctx: ShapeCtx, x: torch.Tensor) -> Case:
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None or not hasattr(torch, "_scaled_mm"):
        raise Skip("no float8_e4m3fn / torch._scaled_mm in this build")

    def make():
        w = ctx.w.to(ctx.device)
        sw = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448  # [N, 1] per channel
        return (w / sw).to(f8), sw.t().contiguous()                 # [N, K] e4m3, [1, N] f32

    w8, sw = ctx.get("fp8", make)
    sx = x.float().abs().amax(1, keepdim=True).clamp_min(1e-6) / 448
    x8 = (x.float() / sx).to(f8)
    fn = lambda a, b, sa, sb, dt: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=dt)  # noqa: E731
    errors = []
    for args, note in (((x8, w8, sx, sw, torch.bfloat16), "rowwise scales, bf16 out"),
                       ((x8, w8, sx.new_ones(()), sw.new_ones(()), torch.float16),
                        "per-tensor scales, fp16 out")):
        try:
            fn(*args)
            return Case(fn, args, w8.nbytes + sw.nbytes, note)
        except (RuntimeError, NotImplementedError) as e:
            errors.append(f"{note}: {str(e).splitlines()[0][:120]}")
    raise Skip("; ".join(errors))


def build_tinygemm(ctx: ShapeCtx, x: torch.Tensor, group: int = 128) -> Case:
    aten = torch.ops.aten
    if not (hasattr(aten, "_weight_int4pack_mm") and hasattr(aten, "_convert_weight_to_int4pack")):
        raise Skip("aten._weight_int4pack_mm not in this build")

    def make():  # [N, K/2] uint8, two codes a byte (torch >= 2.5), innerKTiles 8
        q = torch.randint(0, 16, (ctx.n, ctx.k), dtype=torch.uint8)
        try:
            wp = aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(ctx.device), 8)
            sz = torch.rand(ctx.k // group, ctx.n, 2, device=ctx.device).bfloat16()
            aten._weight_int4pack_mm(x.bfloat16(), wp, group, sz)
        except (RuntimeError, NotImplementedError) as e:
            raise Skip(f"tinygemm unavailable: {str(e).splitlines()[0][:150]}") from e
        return wp, sz

    wp, sz = ctx.get("int4", make)
    return Case(lambda x, wp, sz: aten._weight_int4pack_mm(x, wp, group, sz),
                (x.bfloat16(), wp, sz), wp.nbytes + sz.nbytes, f"bf16, g{group}")


def check_rows(op, dev_args: tuple, cpu_args: tuple, n_act: int, rows: int = 32,
               ref_op=None) -> float:
    """Relative error of op on the device against ref_op (default: op) on CPU (the reference),
    on up to `rows` rows of M: the first n_act args are [M, ...] activations, and rows are
    independent (per-token scales). A non-finite output gives inf."""
    m = dev_args[0].shape[0]
    idx = torch.linspace(0, m - 1, min(m, rows)).round().long().unique()
    y = op(*dev_args)[idx.to(dev_args[0].device)].float().cpu()
    ref = (ref_op or op)(*(a[idx] for a in cpu_args[:n_act]), *cpu_args[n_act:]).float()
    if not torch.isfinite(y).all():
        return math.inf
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _public_op_case(ctx: ShapeCtx, x: torch.Tensor, label: str, op, head: tuple, cpu: dict,
                    dev: dict, tail: tuple, probe: Callable) -> Case:
    """A Case of a public op on (head, packed weights, tail), guarded against the op on CPU:
    FAIL printed and marked past REL_TOL, `ref` where the reference ran instead of a kernel."""
    args = (*head, *dev.values(), *tail)
    cpu_args = (*(t.cpu() for t in head), *cpu.values(), *tail)
    err, why_ref = probe(lambda: check_rows(op, args, cpu_args, len(head)))
    note = f"rel err {err:.1e}" + (f"; reference: {why_ref}" if why_ref else "")
    if err > REL_TOL:
        print(f"!!! FAIL {ctx.name} M={x.shape[0]} {label}: rel err {err:.3g} vs "
              f"CPU reference (tol {REL_TOL})", flush=True)
    status = "FAIL" if err > REL_TOL else "ref" if why_ref else "ok"
    return Case(op, args, sum(v.nbytes for v in dev.values()), note, status)


def build_ours(scheme, probe: Callable):
    """probe(run) -> (run(), why the reference ran instead of our kernel, "" if it did not)."""
    def build(ctx: ShapeCtx, x: torch.Tensor) -> Case:
        from qcompile.compiler.schemes import GEMM_OPS
        from qcompile.passes.swap_gemm import GEMM_FORMATS
        from qcompile.runtime.ops import quant_a8_ref
        fmt, op = GEMM_FORMATS[scheme], GEMM_OPS[scheme]
        cpu = ctx.get(scheme.name, lambda: fmt.pack(ctx.w, scheme))
        dev = ctx.get(scheme.name + "@dev", lambda: {k: v.to(ctx.device) for k, v in cpu.items()})
        xq, sx, xsum = quant_a8_ref(x)
        head = (xq, sx, xsum) if fmt.uses_sum else (xq, sx)
        tail = (None, ctx.n, *fmt.extra(scheme), torch.float16)
        return _public_op_case(ctx, x, scheme.name, op, head, cpu, dev, tail, probe)
    return build


def operands(spec, kind: str, x: torch.Tensor, n: int, a4x_share: float = 0.0):
    """(x_q, s_x, the operands after s_x but the weights, the reference's arguments after the
    bias, gemm_kernels._run's keyword arguments) of one call of `kind` (a kernel kind of the
    row `spec`) on activations x: per-token int8 codes (with their sum where the row reads
    it), or W4Ax's blocks (`a4x_share` of them 8-bit; the s4 kind's packed)."""
    from qcompile.cutlass_templates.configs import A4X_S4_KINDS
    from qcompile.runtime.ops.quant import FMPQ_BLOCK, quant_a4x_ref, quant_a8_ref
    if spec.kernel.block:
        k = x.shape[-1]
        n8, packed = round(a4x_share * k / FMPQ_BLOCK), int(kind in A4X_S4_KINDS)
        xq, sx, t = quant_a4x_ref(x, n8, FMPQ_BLOCK, 1000, packed)
        return (xq, sx, (t,), (n, n8, FMPQ_BLOCK, packed),
                dict(k=k, extra=(n8,) if packed else ()))
    xq, sx, xsum = quant_a8_ref(x)
    return xq, sx, (xsum,) if spec.uses_sum else (), (n, *spec.extra), {}


def build_w4a4x(int8_share: float, probe: Callable, packed: int = 0):
    """COMET's W4Ax through the public op (the selection's kernel: mma.sync, or the register-A
    wgmma tile on sm_90 from M = 257), with `int8_share` of the 128-channel activation blocks
    8-bit (FMPQ's outlier blocks). The codes of every block are int8 in memory and feed s8
    MMAs, so the share changes the numbers, not the work: the rows show what the per-block
    scales cost against per-channel W4A8. packed: the sm80 artifacts' form (4-bit blocks two
    codes a byte, s4 MMAs: kind w4a4x_s4), whose speed only an sm80 GPU shows (a Hopper
    emulates s4 MMAs)."""
    def build(ctx: ShapeCtx, x: torch.Tensor) -> Case:
        from qcompile.compiler.schemes import SPECS
        from qcompile.runtime.ops.quant import FMPQ_BLOCK
        spec = SPECS["w4a4"]
        if ctx.k % FMPQ_BLOCK:
            raise Skip(f"K % {FMPQ_BLOCK}")
        cpu = ctx.get("w4a4", lambda: spec.pack_weight(ctx.w))
        dev = ctx.get("w4a4@dev", lambda: {k: v.to(ctx.device) for k, v in cpu.items()})
        kind = spec.kernel.s4 if packed else spec.kernel.kind
        xq, sx, rest, tail, _ = operands(spec, kind, x, ctx.n, int8_share)
        return _public_op_case(ctx, x, kind, spec.op, (xq, sx, *rest), cpu, dev,
                               (None, *tail, torch.float16), probe)
    return build


def build_wgmma(kind: str, cfg, min_m: int = 256):
    """A Hopper wgmma template (w8a8_sm90 / w4a8*_rs_sm90) with tile `cfg`, launched directly,
    whatever the selection table says; built on first use (sm_90 only; M < min_m skipped)."""
    def build(ctx: ShapeCtx, x: torch.Tensor) -> Case:
        if torch.cuda.get_device_capability() < (9, 0):
            raise Skip("wgmma needs sm_90")
        if x.shape[0] < min_m:
            raise Skip(f"M < {min_m}")
        from qcompile.compiler.schemes import GEMM_OPS, WITH_KERNELS
        from qcompile.cutlass_templates.build import build_kernel
        from qcompile.passes.swap_gemm import GEMM_FORMATS
        from qcompile.runtime import gemm_kernels
        from qcompile.runtime.launcher import CudaModule
        from qcompile.runtime.ops import quant_a8_ref
        spec = next(s for s in WITH_KERNELS if s.kernel.sm90 and s.kernel.sm90[0] == kind)
        scheme = spec.scheme

        def load():
            fn = CudaModule(build_kernel(kind, cfg, "sm90").path).function(cfg.name(kind))
            fn.set_max_dynamic_smem(cfg.smem_bytes(kind))
            return fn

        fn = ctx.get(f"wgmma-fn-{cfg.name(kind)}", load)
        fmt = GEMM_FORMATS[scheme]
        cpu = ctx.get(scheme.name, lambda: fmt.pack(ctx.w, scheme))
        dev = ctx.get(scheme.name + "@dev", lambda: {k: v.to(ctx.device) for k, v in cpu.items()})
        xq, sx, xsum = quant_a8_ref(x)
        head = (xq, sx, xsum) if fmt.uses_sum else (xq, sx)
        w = list(dev.values())
        kp = spec.layout.packed_k(w[0])
        op = lambda *a: gemm_kernels._run(kind, (cfg, fn), a[0], a[1],  # noqa: E731
                                          (*a[2:], None), ctx.n, kp)
        args = (*head, *w)
        cpu_args = (*(t.cpu() for t in head), *cpu.values(), None, ctx.n, *fmt.extra(scheme),
                    torch.float16)
        err = check_rows(op, args, cpu_args, len(head), ref_op=GEMM_OPS[scheme])
        status = "ok" if err <= REL_TOL else "FAIL"
        return Case(op, args, sum(t.nbytes for t in w), f"rel err {err:.1e}; wgmma", status)
    return build


def make_probe(stats) -> Callable:
    """A probe over gemm_kernels.STATS (Counters of kernel launches and of reference fallbacks
    by reason): the call ran our kernel iff it launched one and fell back nowhere."""
    def probe(run):
        launches, fallbacks = sum(stats.launches.values()), stats.fallbacks.copy()
        value = run()
        new = sorted(stats.fallbacks - fallbacks)
        if not new and sum(stats.launches.values()) == launches:
            new = ["no kernel launched"]
        return value, "; ".join(new)
    return probe


# ---- timing on the GPU ----------------------------------------------------------------------

def rotated(case: Case, l2_bytes: int) -> list[Callable]:
    """Zero-arg callables over distinct copies of the inputs (see module docstring)."""
    set_bytes = sum(a.nbytes for a in case.args if torch.is_tensor(a))
    copies = [case.args] + [tuple(a.clone() if torch.is_tensor(a) else a for a in case.args)
                            for _ in range(n_copies(set_bytes, l2_bytes) - 1)]
    return [functools.partial(case.fn, *c) for c in copies]


def sleep_cycles_per_us() -> float:
    if not hasattr(torch.cuda, "_sleep"):
        return 0.0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    a.record(); torch.cuda._sleep(1_000_000); b.record(); b.synchronize()  # noqa: E702
    return 1e6 / (a.elapsed_time(b) * 1e3)


def time_calls(calls: list[Callable], iters: int, cyc_per_us: float, use_graph: bool = True,
               budget_s: float = 2.0) -> tuple[float, str]:
    """Median GPU microseconds per call over passes through `calls`, and the mode used."""
    def eager():
        for c in calls:
            c()
    eager(); eager(); torch.cuda.synchronize()  # noqa: E702  (warmup, cuBLAS heuristics)
    run, mode = eager, "eager"
    if use_graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                eager()
            g.replay(); torch.cuda.synchronize()  # noqa: E702
            run, mode = g.replay, "graph"
        except Exception as e:  # noqa: BLE001  (any capture failure: fall back, say so)
            torch.cuda.synchronize()
            mode = f"eager: graph capture failed ({type(e).__name__})"
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter(); a.record(); run(); b.record()  # noqa: E702
    cpu_us = (time.perf_counter() - t0) * 1e6
    b.synchronize()
    n = max(3, min(iters, int(budget_s * 1e3 / max(a.elapsed_time(b), 1e-3))))
    sleep = int(cyc_per_us * min(2 * cpu_us + 50, 50_000))
    times = []
    for _ in range(n):
        if sleep:
            torch.cuda._sleep(sleep)
        a.record(); run(); b.record(); b.synchronize()  # noqa: E702
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times), mode


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = time_calls([functools.partial(dst.copy_, src)], 10, 0.0, use_graph=False)[0]
    return 2 * nbytes / (times * 1e-6)


def run_point(ctx: ShapeCtx, x: torch.Tensor, impls: dict, timer: Callable, l2_bytes: int,
              on_error: Callable = lambda: None) -> list[dict]:
    """Builds and times every implementation at one (shape, M); one row each."""
    rows = []
    for name, build in impls.items():
        row = dict(shape=ctx.name, N=ctx.n, K=ctx.k, M=x.shape[0], impl=name, status="skip",
                   time_us=None, weight_bytes=None, note="")
        try:
            case = build(ctx, x)
            row.update(status=case.status, note=case.note, weight_bytes=case.weight_bytes)
            row["time_us"], mode = timer(rotated(case, l2_bytes))
            row["note"] += "" if mode == "graph" else f" [{mode}]"
        except Skip as e:
            row["note"] = str(e)
        except Exception as e:  # noqa: BLE001  (report the row, keep benchmarking)
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            print(f"!!! ERROR {ctx.name} M={x.shape[0]} {name}: {row['note']}", flush=True)
            on_error()
        rows.append(row)
    return rows


def import_qcompile():
    """Use the installed package, or map `qcompile.<sub>` onto this checkout's folders."""
    try:
        import qcompile.runtime.ops  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("qcompile")
        pkg.__path__ = [str(ROOT)]
        sys.modules["qcompile"] = pkg
        import qcompile.runtime.ops  # noqa: F401


def enable_kernels() -> Callable:
    """Registers our CUDA kernels; returns the probe build_ours uses to label rows ok / ref."""
    try:
        from qcompile.runtime import gemm_kernels
        gemm_kernels.enable()
        return make_probe(gemm_kernels.STATS)
    except Exception as e:  # noqa: BLE001  (no kernels: still benchmark the reference)
        why = f"gemm_kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:150]})"
        print(f"\n{'!' * 90}\n!!! {why}.\n!!! 'ours' below is the PyTorch REFERENCE, not a kernel "
              f"(rows marked ref).\n{'!' * 90}\n", flush=True)
        return lambda run: (run(), "gemm_kernels unavailable")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,4,16,64,256,1024,4096,8192")
    p.add_argument("--shapes", default="llama3-8b,llama2-7b", help="model or model:layer, ...")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    p.add_argument("--s8-peak-tops", type=float, default=1289.0)
    p.add_argument("--no-graph", action="store_true", help="time eagerly, no CUDA graphs")
    p.add_argument("--quick", action="store_true", help="M 1,16,1024; 2 shapes; 5 iters")
    p.add_argument("--w4a4-shares", default="0,0.125,0.25",
                   type=lambda v: [float(s) for s in v.split(",") if s],
                   help="W4Ax rows: shares of 8-bit activation blocks ('' for none)")
    p.add_argument("--w4a4-packed", action="store_true",
                   help="W4Ax rows of sm80 artifacts too (4-bit blocks on s4 MMAs; a Hopper "
                        "emulates those: correctness there, speed only on an sm80 GPU)")
    a = p.parse_args(argv)
    if a.quick:
        a.m, a.shapes, a.iters = "1,16,1024", "llama3-8b:qkv,llama3-8b:down", 5
    if not torch.cuda.is_available():
        raise SystemExit("bench/gemm.py needs a CUDA GPU")
    import_qcompile()
    from qcompile.compiler.config import W4A8, W4A8_G128, W8A8
    probe = enable_kernels()
    impls = {f"ours-{s.name}": build_ours(s, probe) for s in (W4A8, W4A8_G128, W8A8)}
    # the Hopper templates launched directly at every M (the selection uses them from M = 513;
    # sm_90 only): wgmma W8A8, and W4A8 with the weights in wgmma's register A operand
    from qcompile.cutlass_templates.configs import WGMMA, WGMMA_RS, WGMMA_RS_1WG, WGMMA_WIDE
    for suffix, cfg in (("", WGMMA), ("256", WGMMA_WIDE)):
        impls[f"ours-w8a8-wgmma{suffix}"] = build_wgmma("w8a8_sm90", cfg)
    for suffix, cfg in (("", WGMMA_RS), ("-1wg", WGMMA_RS_1WG)):
        impls[f"ours-w4a8-rs{suffix}"] = build_wgmma("w4a8_rs_sm90", cfg)
    impls["ours-w4a8-g128-rs"] = build_wgmma("w4a8_g128_rs_sm90", WGMMA_RS)
    # COMET's W4Ax (issue 15) at 0, 12.5% and 25% of the activation blocks in 8 bits
    for share in a.w4a4_shares:
        impls[f"ours-w4a4x-{share * 100:g}%"] = build_w4a4x(share, probe)
        if a.w4a4_packed:
            impls[f"ours-w4a4x-s4-{share * 100:g}%"] = build_w4a4x(share, probe, packed=1)
    impls.update(zip(PEERS, (build_fp16, build_int8, build_fp8, build_tinygemm)))
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    bw, cyc = copy_bandwidth(), sleep_cycles_per_us()
    title = (f"{props.name}, torch {torch.__version__}, copy BW {bw / 1e12:.2f} TB/s, "
             f"s8 peak {a.s8_peak_tops:g} TOP/s (--s8-peak-tops), L2 {l2 >> 20} MB")
    print(f"{title}\nsleep {cyc:.0f} cycles/us; rotation over >= 2x L2; "
          f"{'eager' if a.no_graph else 'CUDA-graph'} timing", flush=True)
    timer = functools.partial(time_calls, iters=a.iters, cyc_per_us=cyc, use_graph=not a.no_graph)
    rows, broken, text = [], [], ""

    def on_error():
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001  (sticky error: the context is unusable)
            broken.append(True)

    for name, n, k in parse_shapes(a.shapes):
        ctx = ShapeCtx(name, n, k)
        for m in (int(v) for v in a.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            rows += run_point(ctx, x, impls, timer, l2, on_error)
            torch.cuda.empty_cache()
            if broken:
                break
        text = write_outputs(rows, a.out, title, bw, a.s8_peak_tops)
        if broken:
            print("!!! CUDA context broken: stopping, partial results written", flush=True)
            break
        del ctx
    print(text + f"\nwritten: {a.out}/gemm.md, gemm.csv, gemm.png", flush=True)


if __name__ == "__main__":
    main()
