"""The paged attention template's configs and launch plan (pure Python), the kernels a
lowered graph asks for, and (with nvcc) that the template builds for both targets with the
shared-memory sizes the configs launch it with (the template static_asserts them)."""
import random
import shutil

import pytest
import torch

from qcompile.cutlass_templates.attention_configs import (ATTN_KINDS, MAX_SPLITS,
                                                          MIN_SPLIT_KEYS, ROWS,
                                                          WAVE_MIN_SPLIT_KEYS, AttnConfig,
                                                          plan)


def test_names_entries_defines():
    cfg = AttnConfig(128)
    assert cfg.name("attn_int4") == "qc_attn_int4_d128_s3"
    assert cfg.entries("attn_fp16") == ("qc_attn_fp16_d128_s3", "qc_attn_fp16_d128_s3_kt",
                                        "qc_attn_fp16_d128_s3_prefill",
                                        "qc_attn_fp16_d128_s3_prefill2",
                                        "qc_attn_fp16_d128_s3_merge",
                                        "qc_attn_fp16_d128_s3_encode",
                                        "qc_attn_fp16_d128_s3_encode_strided",
                                        "qc_attn_fp16_d128_s3_encode_rot",
                                        "qc_attn_fp16_d128_s3_store")
    d = cfg.defines("attn_int4")
    assert "-DQC_KV_INT4=1" in d and "-DQC_HEAD_DIM=128" in d
    assert f"-DQC_SMEM_DECODE={cfg.smem_bytes('attn_int4', 'decode')}" in d
    assert f"-DQC_SMEM_KT={cfg.smem_bytes('attn_int4', 'kt')}" in d
    assert "-DQC_KV_INT4=0" in AttnConfig(64).defines("attn_fp16")
    with pytest.raises(ValueError, match="head_dim"):
        AttnConfig(96)
    with pytest.raises(ValueError, match="unknown attention kind"):
        cfg.name("attn_int8")


def test_shared_memory():
    for kind in ATTN_KINDS:
        for d in (64, 128):
            cfg = AttnConfig(d)
            dec, pre = cfg.smem_bytes(kind, "decode"), cfg.smem_bytes(kind, "prefill")
            kt, pre2 = cfg.smem_bytes(kind, "kt"), cfg.smem_bytes(kind, "prefill2")
            assert dec >= 4 * 16 * d * 4  # the decode entries merge 4 warps' fp32 rows there
            assert kt >= 4 * 8 * d * 4
            assert pre2 >= 4 * 32 * d * 2  # + 4 warps' Q fragments, 32 rows each
            assert cfg.smem_bytes(kind) == max(dec, pre, kt, pre2) <= 227 * 1024
    # int4 records are ~4x smaller: its stage holds 128 keys in the decode entry
    assert AttnConfig(128).stage_bytes("attn_int4", "decode") == 128 * (64 + 80 + 8)
    assert AttnConfig(128).stage_bytes("attn_fp16", "prefill") == 64 * (288 + 272)
    assert AttnConfig(128).stage_bytes("attn_int4", "kt") == 64 * (64 + 80 + 8)
    # the int4 keys-as-M decode runs one stage deeper, still 5 CTAs (of 227 KB) per SM
    assert AttnConfig(128).smem_bytes("attn_int4", "kt") == 4 * 64 * (64 + 80 + 8) <= 227 * 1024 // 5
    assert AttnConfig(128).smem_bytes("attn_fp16", "kt") == 3 * 64 * (288 + 272)


def test_plan_entry_and_splits():
    dec = plan(64, 64, 32, 8, 4096, 132)  # 512 CTAs: split to even out the last wave
    assert dec.entry == "kt" and dec.splits == 2 and dec.grid == (64 * 4 // 8 + 64, 8, 2)
    # ... but not into splits shorter than WAVE_MIN_SPLIT_KEYS
    assert plan(64, 64, 32, 8, 1024, 132).splits == 1
    assert plan(64, 64, 32, 8, 2 * WAVE_MIN_SPLIT_KEYS - 1, 132).splits == 1
    # 16 query rows a sequence on average (two tokens of G = 8): the 16-row entry
    assert plan(128, 64, 64, 8, 1024, 132).entry == "decode"
    with pytest.raises(ValueError, match="unknown entry"):
        plan(1, 1, 8, 8, 64, 132, entry="decod")
    big = plan(256, 256, 32, 8, 4096, 132)
    assert big.splits == 1
    one = plan(1, 1, 32, 8, 32768, 132)  # one long sequence: split its keys, a CTA per SM
    assert one.splits == 17 and one.grid[2] == 17  # 8 kv heads x 17 >= 132 SMs
    assert plan(1, 1, 32, 8, 4096, 132).splits == 17
    assert plan(1, 1, 32, 1, 32768, 132).splits == MAX_SPLITS  # one kv head: capped
    short = plan(1, 1, 32, 8, 512, 132)  # never below MIN_SPLIT_KEYS keys a split
    assert short.splits == 512 // MIN_SPLIT_KEYS
    pre = plan(4096, 2, 32, 8, 4096, 132)
    assert pre.entry == "prefill" and pre.splits == 1
    # 1024 new tokens of one sequence: 64 row blocks x 8 kv heads = 512 CTAs, no split (a
    # decode batch of as many CTAs splits in 2); 64 tokens after a long prefix: 4 x 8 CTAs
    # split to reach the 132 SMs
    assert plan(1024, 1, 32, 8, 4096, 132).splits == 1
    assert plan(64, 1, 32, 8, 8192, 132).splits == 5
    forced = plan(64, 64, 32, 8, 1024, 132, entry="prefill", splits=3)
    assert forced.entry == "prefill" and forced.grid == (64 * 4 // 64 + 64, 8, 3)


@pytest.mark.parametrize("entry", tuple(ROWS))
def test_plan_covers_every_row_block(entry):
    """The grid's row blocks bound sum_b ceil(n_b G / rows) for any split of T tokens."""
    rng = random.Random(0)
    rows = ROWS[entry]
    for _ in range(500):
        b = rng.randint(1, 40)
        new = [rng.choice((0, 1, 1, 2, rng.randint(0, 300))) for _ in range(b)]
        g = rng.choice((1, 2, 4, 7, 8))
        t = max(1, sum(new))
        need = sum(-(-n * g // rows) for n in new)
        assert plan(t, b, 2 * g, 2, 4096, 132, entry=entry).grid[0] >= need


def test_plan_invariant():
    """Batch-invariant plans: a decode-only step is one launch of the group size's decode
    entry split every split_keys keys; a step with a prefill chunk adds a prefill launch, each
    serving only its sequences; the grids cover every selected row block."""
    from qcompile.cutlass_templates.attention_configs import (PREFILL_SPLIT_FACTOR,
                                                              invariant_split_keys,
                                                              plan_invariant)
    (one,) = plan_invariant(64, 64, 32, 8, 2048, 512)
    assert (one.entry, one.splits, one.split_keys, one.select) == ("kt", 4, 512, 0)
    assert one.grid == (64 * 4 // 8 + 64, 8, 4)  # any split of the tokens fits (select 0)
    dec, pre = plan_invariant(64 + 300, 65, 32, 8, 4096, 512)
    assert (dec.entry, dec.splits, dec.select, dec.grid) == ("kt", 8, 1, (65, 8, 8))
    assert (pre.entry, pre.select, pre.split_keys) == ("prefill", 2, PREFILL_SPLIT_FACTOR * 512)
    assert pre.splits == 2 and pre.grid[0] >= -(-300 * 4 // ROWS["prefill"])
    (mha,) = plan_invariant(5, 5, 18, 2, 100, 128)  # 9 query heads a kv head: 16-row entry
    assert mha.entry == "decode" and mha.splits == 1
    assert plan_invariant(9, 5, 18, 2, 100, 128)[0].grid[0] == 5 * 1
    assert invariant_split_keys(2048) == 512 and invariant_split_keys(131072) == 8192
    assert invariant_split_keys(10000) % 128 == 0 and invariant_split_keys(10000) * 16 >= 10000
    for bad in (0, 100, -128):
        with pytest.raises(ValueError, match="split_keys"):
            plan_invariant(4, 4, 8, 2, 64, bad)


def _lowered(ckpt, dtype, kv):
    from qcompile.compiler.capture import KVSpec, capture
    from qcompile.compiler.config import CompileConfig
    from qcompile.compiler.pipeline import run_pipeline
    from qcompile.models.decoder import Decoder
    from qcompile.passes.base import Lowering
    cfg = CompileConfig(precision="fp16", kv=kv, dtype=dtype, kernels="skip",
                        kv_key_centering="none")
    low = Lowering.from_exported(capture(Decoder(ckpt.config, ckpt.weights, cfg.torch_dtype),
                                         KVSpec.of(ckpt.config, "fp16", 16, cfg.torch_dtype)))
    run_pipeline(low, cfg)
    return low.gm


def test_graph_attention_requests(make_tiny_checkpoint):
    from qcompile.compiler.kernels import attention_requests
    from qcompile.models.loaders import load_checkpoint
    ckpt = load_checkpoint(make_tiny_checkpoint("llama", head_dim=64))
    assert attention_requests(_lowered(ckpt, "float16", "int4")) == [("attn_int4", AttnConfig(64))]
    assert attention_requests(_lowered(ckpt, "float16", "fp16")) == [("attn_fp16", AttnConfig(64))]
    assert attention_requests(_lowered(ckpt, "float32", "int4")) == []  # reference only
    small = load_checkpoint(make_tiny_checkpoint("llama"))  # head_dim 16: no kernel
    assert attention_requests(_lowered(small, "float16", "int4")) == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
@pytest.mark.parametrize("target", ("sm80", "sm90"))
def test_template_builds(target, tmp_path):
    from qcompile.cutlass_templates.build import build_kernel
    b = build_kernel("attn_int4", AttnConfig(128), target, tmp_path)
    assert b.entries == AttnConfig(128).entries("attn_int4") and b.path.stat().st_size > 0
    assert b.smem_bytes == AttnConfig(128).smem_bytes("attn_int4")


def test_invariant_plans_need_a_binary_that_takes_them():
    """A kernel table built before the split-size and selection arguments (no
    `_encode_strided` entry, which came with them) is refused for batch-invariant launches:
    it would ignore them and cut the keys by the batch (correct, but not invariant)."""
    from types import SimpleNamespace

    from qcompile.runtime.attention_kernels import fixed_splits, launch_attention
    from qcompile.runtime.gemm_kernels import Kernels, using
    cfg, kind = AttnConfig(64), "attn_int4"
    old = {name: object() for name in cfg.entries(kind) if not name.endswith("_strided")}
    assert not fixed_splits(old, cfg, kind)
    assert fixed_splits({**old, cfg.name(kind) + "_encode_strided": object()}, cfg, kind)
    q = torch.zeros(2, 4, 64, dtype=torch.float16)
    args = (q, torch.zeros(2, 2, 80, dtype=torch.uint8), torch.zeros(2, 3, 16, 80,
                                                                      dtype=torch.uint8),
            torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32))
    with using(Kernels(SimpleNamespace(kernels=old, dir="old-build"))):
        with pytest.raises(RuntimeError, match="rebuild"):
            launch_attention(cfg, kind, *args, 2, 0.125, split_keys=512)
