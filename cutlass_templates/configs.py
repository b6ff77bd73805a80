"""Tile configurations of the INT8 tensor-core GEMM templates and their selection.

A :class:`TileConfig` is one instantiation of a template (``w8a8_sm80.cu`` or ``w4a8_sm80.cu``):
nvcc compiles the template once per (kind, config) with the ``-D`` defines of
:meth:`TileConfig.defines` into one binary holding the ``extern "C"`` entry ``name`` (and,
with split-K, ``name + "_reduce"``; :meth:`TileConfig.entries`), all taking the same arguments:

* ``w8a8``:  ``(A, s_x, B, s_w, bias, C, workspace, flags, M, N, K)``
* ``w4a8``:  ``(A, s_x, xsum, B, s_w, zs_w, bias, C, workspace, flags, M, N, K)``
* ``w4a8_g128`` / ``w4a8_g64``: ``(A, s_x, B, s1, s2, negzs, bias, C, workspace, flags, M, N,
  K)``

Launch: ``grid(m, n)``, ``threads()``, ``smem_bytes(kind)`` of dynamic shared memory (set
``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` when above 48 KB). With split-K, a
``workspace_bytes(m, n)`` int32 buffer [split_k, m, Np] (no zeroing needed: every slice
writes its part) and ``flag_count(m, n)`` uint32 arrival counters, zero before the launch and
left zero by it (allocate them zeroed once; see common.cuh). ``reduce`` says how the slices
meet: ``"separate"`` (the default), the launch gets no counters (nullptr) and the ``_reduce``
entry runs next with :meth:`TileConfig.reduce_launch`; ``"fixup"``, the last slice of each output
tile to finish sums the others' parts and runs the epilogue, in the same launch; ``"cluster"``
(sm_90 only: :meth:`TileConfig.cluster_dims`), the launch makes the slices of each tile one
thread-block cluster and they meet in distributed shared memory (no workspace, one launch;
needs ``bm * bn * 4`` bytes of the stage buffers, and at most 8 slices). On the H100 the
separate reduction won every split shape of the sweep (by 5-20% at M <= 64, and 4x for a
128x128 tile split 4 at M = 128, where the fixup serializes 64 KB partial reads on the last
slice); the fixup stays selectable for the sweep and for GPUs where launches cost more. The
cluster reduction, bitwise right, measured slower than the separate one everywhere on the H100
(decode +0.5-1.5 us, e.g. o M=1 8.9 vs 7.8 us; 1.5-3x at M >= 64): a cluster's CTAs must be
co-scheduled on one GPC and the acquire barrier invalidates L1, which costs more than a
graph-launched reduction kernel; it is kept for the sweep and for wgmma-era tiles. All modes
live in the same binary, so ``reduce`` is a launch choice, not part of the kernel: it is left out
of the name and of equality (a config and its other-mode twins build one binary).

Selection (:func:`select_config`) is a lookup in :data:`SELECTION`: the first row whose M
bucket holds ``m``, whose ``k_min`` is <= ``k``, whose ``n_max`` (if any) is >= ``n``, whose
``kinds`` (if any) hold the kind and whose config fits the kind and ``k`` (BK and group size
divide one another; split-K only when every slice gets K tiles, each slice a whole number of
groups).  Every M bucket ends with an unconditional split-free row, so a row always fits.
:func:`select_kernel` first tries the target's own rows (:data:`TARGET_ROWS`: wgmma on sm90).
The kinds and their templates come from the scheme rows (compiler/schemes.py). This module
needs no CUDA: the compiler imports it on any host.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from qcompile.compiler.schemes import WITH_KERNELS

# kind -> (template file in this folder, group size: None = W8A8, 0 = per channel), from the
# scheme rows (compiler/schemes.py): the portable mma.sync kinds.
KINDS: dict[str, tuple[str, int | None]] = {
    kind: (s.kernel.template, s.kernel_group) for s in WITH_KERNELS
    for kind in (s.kernel.kind, s.kernel.s4) if kind}

REDUCE_THREADS = 256  # qc::kReduceThreads in common.cuh
REDUCE_MODES = ("separate", "fixup", "cluster")
MAX_CLUSTER = 8  # portable thread-block cluster size
# Hopper-only templates (wgmma, sm_90a; built for an sm90 target, chosen by TARGET_ROWS). Same
# arguments as their sm80 kind. The W4A8 ones keep the weights unpacked in wgmma's register A
# operand, the problem transposed (C^T = W X^T): bm = tokens (wgmma N), bn = weight rows, one
# warpgroup per 128 (w4a8_rs_sm90.cu). It replaced a template that unpacked the weights into a
# shared s8 operand (slower at every M, bound by shared memory:
# bench/results/gemm-h100-2026-11-21{h,j,k-rs}).
SM90_KINDS: dict[str, tuple[str, int | None]] = {
    s.kernel.sm90[0]: (s.kernel.sm90[1], s.kernel_group) for s in WITH_KERNELS if s.kernel.sm90}
RS_TEMPLATE = "w4a8_rs_sm90.cu"  # register-A wgmma: its tile constraints in TileConfig.fits
RS_KINDS = tuple(k for k, (template, _) in SM90_KINDS.items() if template == RS_TEMPLATE)
ALL_KINDS = {**KINDS, **SM90_KINDS}
# kinds with per-block activation scales (COMET's W4Ax, -DQC_A4X) -> channels per block: a K
# tile is one block (BK = block), an fp32 accumulator beside the int32 one (at most
# A4X_MAX_ACC of each a thread: no spills), no split-K (the blocks' fp32 sum runs in order)
A4X_KINDS: dict[str, int] = {
    k: s.kernel.block for s in WITH_KERNELS if s.kernel.block
    for k in (s.kernel.kind, *(s.kernel.sm90 or ())[:1], s.kernel.s4) if k}
# of those, the kinds of packed activations (-DQC_A4X=2: s4 MMAs on the 4-bit blocks, sm80)
A4X_S4_KINDS = tuple(s.kernel.s4 for s in WITH_KERNELS if s.kernel.s4)
A4X_MAX_ACC = 64

MAX_SMEM_BYTES = 227 * 1024  # sm80 / sm90 opt-in dynamic shared memory per block
N_ALIGN = 32  # every weight layout pads N to 32 (Np)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _kind(kind: str) -> tuple[str, int | None]:
    try:
        return ALL_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown GEMM kind {kind!r}; known kinds: {sorted(ALL_KINDS)}") from None


def padded_k(kind: str, k: int) -> int:
    """K as the kind's weight layout pads it (Kp): to 32, or to the group size."""
    group = _kind(kind)[1]
    return _round_up(k, group if group else 32)


@dataclass(frozen=True)
class TileConfig:
    """One tile shape: CTA tile bm x bn x bk, warps_m x warps_n warps, a cp.async pipeline of
    ``stages`` stages, K split over ``split_k`` CTAs (1: no split) whose parts meet by
    ``reduce`` (see the module docstring; not part of the kernel, so not of equality)."""

    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int
    split_k: int = 1
    reduce: str = field(default="separate", compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.bm <= 0 or self.bm % (16 * self.warps_m):
            problems.append("bm must be a positive multiple of 16 * warps_m")
        if self.bn <= 0 or self.bn % (32 * self.warps_n):
            problems.append("bn must be a positive multiple of 32 * warps_n")
        if self.bk not in (32, 64, 128, 256):
            problems.append("bk must be 32, 64, 128 or 256")
        if self.warps_m < 1 or self.warps_n < 1 or self.threads() > 1024:
            problems.append("warps_m, warps_n >= 1 and at most 32 warps")
        if self.stages < 2:
            problems.append("stages must be >= 2")
        if self.split_k < 1:
            problems.append("split_k must be >= 1")
        if self.reduce not in REDUCE_MODES:
            problems.append(f"reduce must be one of {REDUCE_MODES}")
        if problems:
            raise ValueError(f"invalid TileConfig {self}: " + "; ".join(problems))

    # --- naming and compilation -------------------------------------------------------------
    def name(self, kind: str) -> str:
        _kind(kind)
        return (f"qc_{kind}_{self.bm}x{self.bn}x{self.bk}_w{self.warps_m}x{self.warps_n}"
                f"_s{self.stages}_k{self.split_k}")

    def entries(self, kind: str) -> tuple[str, ...]:
        """The binary's ``extern "C"`` entries: the GEMM, and the reduction with split-K."""
        name = self.name(kind)
        return (name, name + "_reduce") if self.split_k > 1 else (name,)

    def label(self, kind: str) -> str:
        """The name, plus the reduction mode where it is not the default (for reports)."""
        split = self.split_k > 1 and self.reduce != "separate"
        return self.name(kind) + (f"_{self.reduce}" if split else "")

    def template(self, kind: str) -> str:
        return _kind(kind)[0]

    def defines(self, kind: str) -> list[str]:
        group = _kind(kind)[1]
        out = [f"-DQC_KERNEL={self.name(kind)}", f"-DQC_BM={self.bm}", f"-DQC_BN={self.bn}",
               f"-DQC_BK={self.bk}", f"-DQC_WARPS_M={self.warps_m}",
               f"-DQC_WARPS_N={self.warps_n}", f"-DQC_STAGES={self.stages}",
               f"-DQC_SPLITK={self.split_k}"]
        if group is not None:
            out.append(f"-DQC_GROUP={group}")
        if kind in A4X_KINDS:
            out.append(f"-DQC_A4X={2 if kind in A4X_S4_KINDS else 1}")
        return out

    # --- launch -----------------------------------------------------------------------------
    def threads(self) -> int:
        return self.warps_m * self.warps_n * 32

    def smem_bytes(self, kind: str) -> int:
        """Dynamic shared memory: stages x (A stage + B stage (+ W4Ax's block scales)), as
        the .cu lays it out."""
        group = _kind(kind)[1]
        a = self.bm * self.bk
        if group is None:
            b = self.bn * self.bk
        else:
            b = self.bn * self.bk // 2
            if group:
                rows = self.bk // group if self.bk > group else 1
                b += _round_up(2 * rows * self.bn, 128)  # s2 and negzs rows of the stage
        if kind in A4X_KINDS:  # the stage's block scales of its bm tokens (float32)
            b += _round_up(self.bm * 4, 128)
        return self.stages * (a + b)

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        return (_ceil_div(n, self.bn), _ceil_div(m, self.bm), self.split_k)

    def flag_count(self, m: int, n: int) -> int:
        """Split-K arrival counters the launch uses: one per output tile (0 without split or
        with the separate reduction)."""
        if self.split_k == 1 or self.reduce != "fixup":
            return 0
        gx, gy, _ = self.grid(m, n)
        return gx * gy

    def reduce_launch(self, m: int, n: int) -> tuple[tuple, tuple] | None:
        """(grid, block) of the ``_reduce`` entry (one thread per 4 columns of a row), or None
        when there is none to launch."""
        if self.split_k == 1 or self.reduce != "separate":
            return None
        quads = m * _ceil_div(n, 4)
        return (max(1, _ceil_div(quads, REDUCE_THREADS)), 1, 1), (REDUCE_THREADS, 1, 1)

    def cluster_dims(self) -> tuple[int, int, int] | None:
        """Thread-block cluster dims of the launch (the reduce mode "cluster"), else None."""
        return (1, 1, self.split_k) if self.split_k > 1 and self.reduce == "cluster" else None

    def workspace_bytes(self, m: int, n: int) -> int:
        if self.split_k == 1 or self.reduce == "cluster":
            return 0
        return self.split_k * m * _round_up(n, N_ALIGN) * 4

    # --- validity for a kind and K ------------------------------------------------------------
    def k_tiles(self, kind: str, k: int) -> int:
        return _ceil_div(padded_k(kind, k), self.bk)

    def fits(self, kind: str, k: int) -> bool:
        """Whether this config may run ``kind`` with this K (see the module docstring)."""
        group = _kind(kind)[1]
        if group and self.bk % group and group % self.bk:
            return False
        if kind in A4X_KINDS and not (self.bk == A4X_KINDS[kind] and self.split_k == 1
                                      and self.bm * self.bn <= A4X_MAX_ACC * self.threads()):
            return False
        if kind in RS_KINDS:
            if not (self.bk == 128 and self.warps_m == 1 and self.warps_n * 32 == self.bn
                    and self.bn % 128 == 0 and self.bm % 16 == 0 and self.bm <= 256
                    and self.split_k == 1 and self.stages >= 3):
                return False  # one warpgroup per 128 weight rows, wgmma N = bm tokens
        elif kind in SM90_KINDS and not (self.bk == 128 and self.warps_n == 1
                                         and self.split_k == 1 and self.bn <= 256
                                         and self.warps_m * 16 == self.bm and self.bm % 64 == 0):
            return False  # one warpgroup per 64 rows, 128-byte swizzled rows (w8a8_sm90.cu)
        if self.smem_bytes(kind) > MAX_SMEM_BYTES:
            return False
        if self.split_k == 1:
            return True
        if self.reduce == "cluster" and (self.split_k > MAX_CLUSTER
                                         or self.bm * self.bn * 4 > self.smem_bytes(kind)):
            return False
        # slices of ceil(tiles / split) K tiles (the last may be shorter), none empty, each a
        # whole number of groups
        tiles = self.k_tiles(kind, k)
        per = _ceil_div(tiles, self.split_k)
        if (self.split_k - 1) * per >= tiles:
            return False
        return not group or per * self.bk % group == 0

    def with_split(self, split_k: int, reduce: str | None = None) -> TileConfig:
        return replace(self, split_k=split_k, reduce=reduce or self.reduce)


def parse_name(name: str) -> tuple[str, TileConfig]:
    """Inverse of :meth:`TileConfig.name`: ``qc_<kind>_<bm>x<bn>x<bk>_w<wm>x<wn>_s<st>_k<sk>``."""
    try:
        head, tile, warps, stages, split = name.rsplit("_", 4)
        if not head.startswith("qc_") or head[3:] not in ALL_KINDS:
            raise ValueError
        bm, bn, bk = (int(v) for v in tile.split("x"))
        wm, wn = (int(v) for v in warps.removeprefix("w").split("x"))
        if not (warps[0], stages[0], split[0]) == ("w", "s", "k"):
            raise ValueError
        return head[3:], TileConfig(bm, bn, bk, wm, wn, int(stages[1:]), int(split[1:]))
    except ValueError:
        raise ValueError(f"not a GEMM kernel name: {name!r}") from None


def parse_defines(defines: list[str]) -> tuple[str, TileConfig]:
    """Inverse of :meth:`TileConfig.defines`: -> (kind, config); checks the two agree."""
    values = dict(d.removeprefix("-D").split("=", 1) for d in defines)
    kind, cfg = parse_name(values["QC_KERNEL"])
    if cfg.defines(kind) != list(defines):
        raise ValueError(f"defines {defines} do not match kernel {values['QC_KERNEL']}")
    return kind, cfg


# --- the table -------------------------------------------------------------------------------
# Measured, not guessed: bench/tune_gemm.py timed every base below with split-K 1/2/4/8 (and,
# split, both reductions) on an H100 over the Llama-3-8B linears with L2-cold weights
# (bench/results/tune-h100-*.csv); each row is the config with the lowest worst-case time
# relative to the per-(kind, shape, M) best over w4a8, w4a8_g128 and w8a8 (within 1-5% of the
# best at M = 1..64). Decode needs bytes in flight: thin tiles, split-K over long K with the
# separate reduction (the in-kernel fixup was 5-20% slower at M <= 64: its three dependent L2
# round trips sit on the tail), an 8-stage pipeline where N is small, but no split where N
# alone gives hundreds of tiles (gate_up). From M = 512 the 128x128x128 tile wins, with 4
# stages for the 4-bit kinds (their B stage is half the size; W8A8 at 4 stages fits one CTA
# per SM and loses 40%). Swept at M = 1, 4, 16, 32, 64, 128, 256, 1024, 4096.
DECODE = TileConfig(16, 64, 128, 1, 2, 4)
DECODE8 = TileConfig(16, 64, 128, 1, 2, 8)   # 8 of a slice's K tiles in flight at once
WIDE = TileConfig(16, 128, 128, 1, 4, 6)     # decode over N > WIDE_N: no split
THIN32 = TileConfig(32, 64, 128, 1, 2, 4)
SMALL = TileConfig(32, 128, 128, 1, 4, 4)
MID = TileConfig(64, 64, 128, 2, 2, 4)
BIG = TileConfig(128, 128, 128, 2, 2, 3)
BIG4 = TileConfig(128, 128, 128, 2, 2, 4)
# wgmma tiles of the sm90 kinds: two warpgroups of 64 x BN, 128-byte K rows.
WGMMA = TileConfig(128, 128, 128, 8, 1, 5)
WGMMA_WIDE = TileConfig(128, 256, 128, 8, 1, 4)
# register-A wgmma tiles (RS_KINDS): bm tokens x bn weight rows, one warpgroup per 128 rows
WGMMA_RS = TileConfig(128, 256, 128, 1, 8, 5)
WGMMA_RS_1WG = TileConfig(128, 128, 128, 1, 4, 4)   # one warpgroup: two CTAs per SM
WGMMA_RS_T64 = TileConfig(64, 128, 128, 1, 4, 4)    # 64 tokens: CTAs enough at M ~ 512
# Per-block activation scales (A4X_KINDS): at most 64 accumulators a thread, no split-K, not
# yet swept. Decode can not split K (the blocks' fp32 sum runs in order), so it takes CTAs from
# N instead: one warp a 32-column tile with a deep pipeline (N = 4096: 128 CTAs, ~32 KB of
# cp.async in flight an SM, about what the H100's bandwidth-latency product asks of each).
A4X_WIDE = TileConfig(64, 128, 128, 2, 2, 4)
A4X_DECODE = TileConfig(16, 32, 128, 1, 1, 8)
A4X_THIN = TileConfig(32, 32, 128, 1, 1, 6)
WGMMA_RS_T64_WIDE = TileConfig(64, 256, 128, 1, 8, 5)  # two warpgroups, 64 tokens
# Sweep candidates kept for bench/tune_gemm.py (not selected today).
MEDIUM = TileConfig(64, 128, 64, 2, 2, 4)
LARGE = TileConfig(128, 128, 64, 2, 2, 4)
HUGE = TileConfig(128, 256, 64, 2, 4, 4)

W4_KINDS = tuple(k for k, (_, group) in KINDS.items() if group is not None and k not in A4X_KINDS)
# every kind but per-channel W4A8 (whose epilogue also reads the per-token sum)
NOT_PER_CHANNEL = tuple(k for k, (_, group) in KINDS.items() if group != 0)
WIDE_N = 16384  # above this many output columns a thin tile has CTAs enough without split-K


@dataclass(frozen=True)
class Row:
    """One selection rule: M <= m_max (None: any), K >= k_min, N <= n_max (None: any),
    kind in kinds (None: any) -> config."""
    m_max: int | None
    k_min: int
    config: TileConfig
    n_max: int | None = None
    kinds: tuple[str, ...] | None = None

    def matches(self, kind: str, m: int, n: int, k: int) -> bool:
        return ((self.m_max is None or m <= self.m_max) and k >= self.k_min
                and (self.n_max is None or n <= self.n_max)
                and (self.kinds is None or kind in self.kinds) and self.config.fits(kind, k))


SELECTION: tuple[Row, ...] = (
    Row(16, 0, A4X_DECODE, n_max=8192, kinds=tuple(A4X_KINDS)),  # W4Ax: no split-K
    Row(16, 8192, DECODE8.with_split(4)),                   # down
    Row(16, 4096, DECODE8.with_split(4), n_max=4096),       # o
    Row(16, 4096, DECODE.with_split(4), n_max=WIDE_N),      # qkv
    Row(16, 4096, WIDE),                                         # gate_up
    Row(16, 0, DECODE),
    Row(64, 0, A4X_THIN, n_max=8192, kinds=tuple(A4X_KINDS)),
    Row(64, 8192, THIN32.with_split(4)),
    Row(64, 4096, THIN32.with_split(4), n_max=4096),
    Row(64, 4096, THIN32.with_split(2), n_max=WIDE_N),
    Row(64, 4096, SMALL),
    Row(64, 0, DECODE, n_max=4096),
    Row(64, 0, MID),
    Row(128, 8192, BIG4.with_split(8), kinds=W4_KINDS),
    Row(128, 8192, BIG.with_split(4)),
    Row(128, 4096, MID.with_split(2), n_max=WIDE_N),
    Row(128, 4096, BIG, kinds=NOT_PER_CHANNEL),
    Row(128, 0, MID),
    Row(256, 8192, BIG.with_split(4)),
    Row(256, 4096, MID, n_max=WIDE_N),
    Row(256, 4096, BIG),
    Row(256, 0, MID),
    Row(1024, 0, BIG),
    Row(None, 0, BIG4, kinds=W4_KINDS),
    Row(None, 0, A4X_WIDE, kinds=tuple(A4X_KINDS)),  # (the rows above but MID refuse them)
    Row(None, 0, BIG),
)

TILE_CONFIGS: tuple[TileConfig, ...] = tuple(dict.fromkeys(row.config for row in SELECTION))


def _check_shape(kind: str, m: int, n: int, k: int) -> None:
    _kind(kind)
    if m < 1 or n < 1 or k < 1:
        raise ValueError(f"GEMM shape must be positive, got m={m}, n={n}, k={k}")
    if k % 16:
        raise ValueError(
            f"{kind} GEMM needs K % 16 == 0 (16-byte rows of int8 activations for cp.async), "
            f"got K={k}; pad the input channels to a multiple of 16")


def select_config(kind: str, m: int, n: int, k: int) -> TileConfig:
    """The tile config for an (m, n, k) GEMM of this kind (pure table lookup)."""
    _check_shape(kind, m, n, k)
    if kind not in KINDS:
        raise ValueError(f"{kind} has no rows in SELECTION: select_kernel(base kind, ..., "
                         "target) picks it where TARGET_ROWS does, or launch it with an explicit "
                         "config (WGMMA, WGMMA_RS, ...)")
    for row in SELECTION:
        if row.matches(kind, m, n, k):
            return row.config
    raise ValueError(f"no tile config fits {kind} m={m} n={n} k={k}")  # table is broken


@dataclass(frozen=True)
class TargetRow:
    """A target-specific rule, tried before SELECTION: M >= m_min, K >= k_min, n_min <= N <=
    n_max (None: any) -> the kernel kind `kernel` (a template of that target) with `config`."""
    m_min: int
    kernel: str
    config: TileConfig
    k_min: int = 0
    n_min: int = 0
    n_max: int | None = None

    def fits(self, n: int, k: int) -> bool:
        return (k >= self.k_min and n >= self.n_min and (self.n_max is None or n <= self.n_max)
                and self.config.fits(self.kernel, k))


# sm90, from an L2-cold sweep of the Hopper tiles on an H100 (bench/tune_gemm.py --hopper-only,
# bench/results/tune-h100-2026-11-21k-hopper): each row is the tile within 8% of the sweep's
# best for every kind of its (M, shape) cells, preferring mma.sync (SELECTION) where it is.
# * W8A8: the wgmma template (warpgroups along M) from M = 256 where N > 4096 and K < 8192
#   (qkv, gate_up: 1.05-1.10x mma.sync at M = 256), from M = 513 everywhere (1.2-1.7x at
#   M = 512); 128 x 256 tiles for long K or wide N from M = 769 and for every shape from 1537,
#   else 128 x 128 (a 256-wide tile leaves under two waves of CTAs: qkv M=1024 1.17x slower);
#   at M ~ 256 with N 8193..16384 (Llama-2 qkv, 12288) 128 x 256: 96 CTAs in one partial wave
#   against 192 in 1.45 waves, 48.4 vs 55.1 us (gemm-h100-2026-11-21l).
# * W4A8 (per channel and groups): the register-A template (w4a8_rs_sm90.cu, tokens x weight
#   rows) from M = 257, and from M = 64 where N is wide (gate_up: 1.03-1.45x mma.sync at
#   M = 64..256). 64 tokens x 128 rows at M ~ 512 and for qkv (N 4097..8192) at M ~ 1024 (CTAs
#   enough: 1.2-1.56x the 128 x 256 tile there), 128 x 128 for long K at M ~ 512, else
#   128 x 256 with a 5-stage pipeline.
_W4_SM90 = lambda kernel: (  # noqa: E731
    TargetRow(1537, kernel, WGMMA_RS),
    TargetRow(769, kernel, WGMMA_RS_T64, n_min=4097, n_max=8192),
    TargetRow(769, kernel, WGMMA_RS),
    TargetRow(257, kernel, WGMMA_RS_1WG, k_min=8192),
    TargetRow(257, kernel, WGMMA_RS, n_min=WIDE_N + 1),
    TargetRow(257, kernel, WGMMA_RS_T64),
    TargetRow(65, kernel, WGMMA_RS, n_min=WIDE_N + 1),
    TargetRow(64, kernel, WGMMA_RS_T64, n_min=WIDE_N + 1))
_W8_SM90 = lambda kernel: (  # noqa: E731
    TargetRow(1537, kernel, WGMMA_WIDE),
    TargetRow(769, kernel, WGMMA_WIDE, k_min=8192),
    TargetRow(769, kernel, WGMMA, n_max=8192),
    TargetRow(769, kernel, WGMMA_WIDE),
    TargetRow(513, kernel, WGMMA),
    TargetRow(256, kernel, WGMMA_WIDE, n_min=8193, n_max=16384),
    TargetRow(256, kernel, WGMMA, n_min=4097))
# * W4Ax (per-block activation scales, A4X_KINDS): the register-A template at 64 tokens (two
#   accumulator sets), where W4A8 takes it; two warpgroups (256 weight rows) where N is wide
#   or M large. Not yet measured: a first guess from the W4A8 rows.
_A4X_SM90 = lambda kernel: (  # noqa: E731
    TargetRow(769, kernel, WGMMA_RS_T64_WIDE, n_min=8193),
    TargetRow(257, kernel, WGMMA_RS_T64),
    TargetRow(64, kernel, WGMMA_RS_T64_WIDE, n_min=WIDE_N + 1))
# target -> template -> its measured rows, for a kernel kind of that template
TEMPLATE_ROWS = {"sm90": {"w8a8_sm90.cu": _W8_SM90, RS_TEMPLATE: _W4_SM90}}
TARGET_ROWS: dict[str, dict[str, tuple[TargetRow, ...]]] = {
    "sm90": {s.kernel.kind: (_A4X_SM90 if s.kernel.block else
                             TEMPLATE_ROWS["sm90"][s.kernel.sm90[1]])(s.kernel.sm90[0])
             for s in WITH_KERNELS if s.kernel.sm90},
}


def _target_rows(kind: str, n: int, k: int, target: str):
    """The target's rows for `kind` that fit this (n, k), in order."""
    return [row for row in TARGET_ROWS.get(target, {}).get(kind, ()) if row.fits(n, k)]


def select_kernel(kind: str, m: int, n: int, k: int,
                  target: str = "sm80") -> tuple[str, TileConfig]:
    """(kernel kind, config) for an (m, n, k) GEMM of `kind` on `target`: a target-specific
    template where TARGET_ROWS has one (e.g. wgmma on sm90), else `kind` and select_config."""
    _check_shape(kind, m, n, k)
    for row in _target_rows(kind, n, k, target):
        if m >= row.m_min:
            return row.kernel, row.config
    return kind, select_config(kind, m, n, k)


def kernels_for(kind: str, n: int, k: int, target: str = "sm80") -> list[tuple[str, TileConfig]]:
    """Every (kernel kind, config) select_kernel can return for this (n, k, target), any M:
    what an artifact for `target` must ship."""
    out = [(kind, cfg) for cfg in configs_for(kind, n, k)]
    out += [(row.kernel, row.config) for row in _target_rows(kind, n, k, target)]
    return list(dict.fromkeys(out))


def configs_for(kind: str, n: int, k: int) -> list[TileConfig]:
    """Every config :func:`select_config` can return for this (n, k), any M."""
    _check_shape(kind, 1, n, k)
    bounds = sorted({row.m_max for row in SELECTION if row.m_max is not None})
    reps = bounds + [bounds[-1] + 1]  # each bucket's largest M, then the unbounded one
    return list(dict.fromkeys(select_config(kind, m, n, k) for m in reps))
