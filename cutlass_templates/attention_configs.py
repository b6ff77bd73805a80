"""Kernel configs of the paged attention template (``paged_attention.cu``) and the launch plan.

One binary per (KV format, head dim) holds nine ``extern "C"`` entries (:meth:`AttnConfig.entries`):
the decode kernel (16 query rows per CTA as the MMA's M, the 4 warps split each tile), the
keys-as-M decode kernel ``_kt`` (8 query rows as the MMA's N, keys as M: half the MMAs and
accumulators of the first for GQA decode, attention_decode.cuh), two prefill kernels
(FlashAttention-2 style: ``_prefill`` 64 rows per CTA, 16 a warp; ``_prefill2`` 128 rows, 32 a
warp, each K / V fragment read once for two m16 tiles), the split-KV merge, the KV encode (plain,
strided, and with the key rotation folded in) and the page store (the step's records into their
pages). The four attention entries take ``(q, kv_new, cache, block_tables, ctx_lens,
query_start, out, ws_o, ws_lse, T, B, MB, NB, BS, R, Hq, Hkv, scale_log2, split_keys, select,
rot)``.

:func:`plan` chooses the entry and the key splits from shapes only (never from device data),
so a launch is the same for every step of a CUDA graph bucket. Pure Python: the compiler
imports it on any host.
"""
from __future__ import annotations

from dataclasses import dataclass

# kind -> (template file, KV format). Activations fp16 (the GEMM kernels' dtype).
ATTN_KINDS: dict[str, tuple[str, str]] = {
    "attn_fp16": ("paged_attention.cu", "fp16"),
    "attn_int4": ("paged_attention.cu", "int4"),
}
KIND_OF_FORMAT = {fmt: kind for kind, (_, fmt) in ATTN_KINDS.items()}
HEAD_DIMS = (64, 128)
THREADS = 128     # 4 warps (paged_attention.cu THREADS)
TILE_KEYS = 64    # keys per shared-memory stage (TN), but see AttnConfig.stage_keys
DECODE_ROWS, KT_ROWS, PREFILL_ROWS, PREFILL2_ROWS = 16, 8, 64, 128
ROWS = {"decode": DECODE_ROWS, "kt": KT_ROWS, "prefill": PREFILL_ROWS,
        "prefill2": PREFILL2_ROWS}
PREFILL_ENTRIES = ("prefill", "prefill2")
MIN_SPLIT_KEYS = 128  # one int4 decode stage: a shorter split is all launch and merge
MAX_SPLITS = 64
# Split targets, measured on an H200 (bench/results/gpu-h200-2026-12-07.md, 8B heads): with
# fewer (sequence, kv head) CTAs than SMs (batch 1) split up to one CTA per SM (4096 keys: 16
# splits 15.5 us, 32 splits 18.3 us, as two CTAs on one SM serialise); with more, split until
# ~WAVE_CTAS_PER_SM CTAs per SM so that the last wave is small (batch 64 x 8 kv heads: 2 splits
# 147 us at 4096 keys, 3 splits 150, 1 split 175; fp16 pages 338 / 346 / 328).
WAVE_CTAS_PER_SM = 4
# ... but there only splits of at least this many keys: a shorter split's CTAs are mostly
# pipeline fill and merge. H100, batch 64, 1024 keys (bench/results/gpu-h100-2026-12-07d.md):
# int4 1 split 52.0 / 32.2 us (8B / 1B heads) against 2 splits 56.3 / 35.1, fp16 105 / 62
# against 119 / 61; at 4096 keys 2 splits stay best for int4 (149 / 93 against 173 / 107).
WAVE_MIN_SPLIT_KEYS = 2048


def _kind(kind: str) -> tuple[str, str]:
    try:
        return ATTN_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown attention kind {kind!r}; known: {sorted(ATTN_KINDS)}") from None


@dataclass(frozen=True)
class AttnConfig:
    head_dim: int
    stages: int = 3

    def __post_init__(self) -> None:
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"AttnConfig: head_dim {self.head_dim} not in {HEAD_DIMS}")
        if self.stages < 2:
            raise ValueError("AttnConfig: stages must be >= 2")

    def name(self, kind: str) -> str:
        _kind(kind)
        return f"qc_{kind}_d{self.head_dim}_s{self.stages}"

    def entries(self, kind: str) -> tuple[str, ...]:
        name = self.name(kind)
        return (name, name + "_kt", name + "_prefill", name + "_prefill2", name + "_merge",
                name + "_encode", name + "_encode_strided", name + "_encode_rot", name + "_store")

    def defines(self, kind: str) -> list[str]:
        int4 = _kind(kind)[1] == "int4"
        # the template static_asserts that its layout takes exactly these shared-memory sizes
        return [f"-DQC_KERNEL={self.name(kind)}", f"-DQC_HEAD_DIM={self.head_dim}",
                f"-DQC_KV_INT4={int(int4)}", f"-DQC_STAGES={self.stages}",
                f"-DQC_SMEM_DECODE={self.smem_bytes(kind, 'decode')}",
                f"-DQC_SMEM_PREFILL={self.smem_bytes(kind, 'prefill')}",
                f"-DQC_SMEM_PREFILL2={self.smem_bytes(kind, 'prefill2')}",
                f"-DQC_SMEM_KT={self.smem_bytes(kind, 'kt')}"]

    def threads(self) -> int:
        return THREADS

    def stage_keys(self, kind: str, entry: str) -> int:
        """Keys per stage (DECODE_TN / KT_TN / 64 / P2_TN in the .cu): the int4 decode entry
        takes 128, so its 4 warps get 32 keys each per barrier; _prefill2 at head dim 128 takes
        32 (S of a warp's 32 rows stays in registers beside their O); every other stage 64."""
        if entry == "prefill2":
            return 32 if self.head_dim == 128 else TILE_KEYS
        return 128 if entry == "decode" and _kind(kind)[1] == "int4" else TILE_KEYS

    def stage_bytes(self, kind: str, entry: str = "decode") -> int:
        """K and V rows of one stage (+ int4 (scale, min) pairs), as the .cu pads them."""
        d, int4 = self.head_dim, _kind(kind)[1] == "int4"
        k_stride = d // 2 if int4 else 2 * d + 32
        v_stride = d // 2 + 16 if int4 else 2 * d + 16
        return self.stage_keys(kind, entry) * (k_stride + v_stride + (8 if int4 else 0))

    def entry_stages(self, kind: str, entry: str) -> int:
        """Pipeline depth of an entry (KT_STAGES in attention_decode.cuh): the int4 keys-as-M
        decode takes one stage more (memory-bound on the bytes in flight per SM, and its
        9.7 KB stages leave room for it at 5 CTAs per SM)."""
        return self.stages + (entry == "kt" and _kind(kind)[1] == "int4")

    def smem_bytes(self, kind: str, entry: str | None = None) -> int:
        """Dynamic shared memory of an entry (None: the most any entry takes): the stages; the
        decode entries also merge their 4 warps' rows there ([4][rows][D + 4] fp32 + m, l)."""
        if entry is None:
            return max(self.smem_bytes(kind, e) for e in ROWS)
        stages = self.entry_stages(kind, entry) * self.stage_bytes(kind, entry)
        if entry == "prefill":
            return stages
        if entry == "prefill2":  # + the Q fragments of 4 warps x 2 m-tiles (16 B a lane)
            return stages + 4 * 2 * (self.head_dim // 16) * 32 * 16
        rows = ROWS[entry]  # the decode entries merge their 4 warps' rows in shared memory
        merge = 4 * rows * (self.head_dim + 4) * 4 + 2 * 4 * rows * 4
        return max(stages, merge)


@dataclass(frozen=True)
class Launch:
    entry: str          # "kt", "decode" or "prefill"
    grid: tuple[int, int, int]
    splits: int
    split_keys: int = 0  # > 0: each split is this many keys (plan_invariant); 0: even splits
    select: int = 0      # sequences served: 0 all, 1 one new token, 2 more (paged_attention.cu)


def plan(t: int, b: int, hq: int, hkv: int, max_keys: int, sm_count: int, *,
         entry: str | None = None, splits: int | None = None) -> Launch:
    """Entry, grid and key splits for T query tokens of B sequences with up to max_keys keys
    each (block-table width x page size). A decode entry when the batch is mostly
    single-token steps (T <= 2B): "kt" (8 rows per CTA) when a sequence averages at most 8
    query rows (T * G <= 8 B), else "decode" (16 rows); prefill otherwise. Keys split up to
    one CTA per SM when the batch's CTAs are fewer than the SMs, else until about
    WAVE_CTAS_PER_SM CTAs per SM, so the last partial wave costs little (64 x 8 heads = 512
    CTAs on 132 SMs: 2 splits of 4096 keys; prefill only up to one CTA per SM); each split at
    least MIN_SPLIT_KEYS keys, and WAVE_MIN_SPLIT_KEYS where the CTAs already fill the SMs. Any entry is correct for any batch (a sequence with more
    rows than a CTA holds gets several CTAs); `entry` / `splits` override (tests, benchmarks)."""
    g = hq // hkv
    if entry is None:
        entry = "prefill" if t > 2 * b else ("kt" if t * g <= KT_ROWS * b else "decode")
    if entry not in ROWS:
        raise ValueError(f"plan: unknown entry {entry!r}; known: {sorted(ROWS)}")
    rows = ROWS[entry]
    row_blocks = -(-t * g // rows) + b  # >= sum over sequences of ceil(n_b * G / rows)
    if splits is None:
        prefill = entry in PREFILL_ENTRIES
        busy = max(1, (-(-t * g // rows) if prefill else min(b, t)) * hkv)
        # prefill CTAs are many and uneven (causal): a split there only adds the fp32
        # workspace round trip and the merge, so split only to reach one CTA per SM
        waves = busy >= sm_count and not prefill
        target = WAVE_CTAS_PER_SM * sm_count if waves else sm_count
        min_keys = WAVE_MIN_SPLIT_KEYS if waves else MIN_SPLIT_KEYS
        splits = max(1, min(-(-target // busy), max_keys // min_keys, MAX_SPLITS))
    return Launch(entry, (row_blocks, hkv, splits), splits)


# Batch-invariant plans (plan_invariant): a sequence's attention must not depend on the batch
# it is in, so its keys are cut at fixed multiples of the split size (a split count per batch
# would move the cuts) and its rows always go to the same entry (a decode row to kt or decode,
# a prefill chunk's to prefill, even when both share a step). The split size is the engine's
# (`invariant_split_keys`), prefill's PREFILL_SPLIT_FACTOR times it: prefill CTAs are many.
INVARIANT_MIN_SPLIT_KEYS = 512
INVARIANT_MAX_SPLITS = 16
PREFILL_SPLIT_FACTOR = 4


def invariant_split_keys(max_seq_len: int) -> int:
    """The decode split size of an engine that serves up to max_seq_len tokens: at least
    INVARIANT_MIN_SPLIT_KEYS, and large enough that a sequence is never cut into more than
    INVARIANT_MAX_SPLITS splits (which bounds a decode graph's grid and fp32 workspace); a
    multiple of 128 (every entry's tile divides it)."""
    need = -(-max_seq_len // INVARIANT_MAX_SPLITS)
    return max(INVARIANT_MIN_SPLIT_KEYS, -(-need // 128) * 128)


def plan_invariant(t: int, b: int, hq: int, hkv: int, max_keys: int,
                   split_keys: int) -> list[Launch]:
    """The batch-invariant launches for T query tokens of B sequences (max_keys as in `plan`):
    the rows of single-token sequences in the decode entry of the model's group size ("kt"
    up to KT_ROWS query heads a kv head, else "decode"), split every `split_keys` keys; when
    the step has more tokens than sequences (a prefill chunk in it; the engine makes no
    sequence without tokens), a second launch of "prefill" for the others, split every
    PREFILL_SPLIT_FACTOR * split_keys. Each launch serves only its sequences (`select`), so
    a row's entry and key cuts depend on its own sequence alone."""
    if split_keys <= 0 or split_keys % 128:
        raise ValueError(f"plan_invariant: split_keys must be a positive multiple of 128, got "
                         f"{split_keys}")
    g = hq // hkv
    single = "kt" if g <= KT_ROWS else "decode"
    splits = max(1, -(-max_keys // split_keys))
    mixed = t > b
    # a selected sequence has one token: G rows; unselected, any (as `plan`'s bound)
    blocks = b * -(-g // ROWS[single]) if mixed else -(-t * g // ROWS[single]) + b
    launches = [Launch(single, (blocks, hkv, splits), splits, split_keys, 1 if mixed else 0)]
    if mixed:
        keys = PREFILL_SPLIT_FACTOR * split_keys
        splits = max(1, -(-max_keys // keys))
        launches.append(Launch("prefill", (-(-t * g // PREFILL_ROWS) + b, hkv, splits), splits,
                               keys, 2))
    return launches
