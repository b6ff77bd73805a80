import importlib.util
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qcompile.cutlass_templates import configs as C
from qcompile.cutlass_templates.configs import (KINDS, SELECTION, TILE_CONFIGS, TileConfig,
                                                configs_for, padded_k, parse_defines, parse_name,
                                                select_config)

LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (192, 576),
                (1536, 576), (576, 1536)]
TEMPLATES = Path(C.__file__).parent


def test_names_unique_and_stable():
    names = [cfg.name(kind) for kind in KINDS for cfg in TILE_CONFIGS]
    assert len(set(names)) == len(names)
    assert TileConfig(128, 128, 64, 2, 2, 4).name("w4a8_g128") == \
        "qc_w4a8_g128_128x128x64_w2x2_s4_k1"
    assert TileConfig(16, 64, 128, 1, 2, 4, 2).name("w8a8") == "qc_w8a8_16x64x128_w1x2_s4_k2"
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        TILE_CONFIGS[0].name("w4a4")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_defines_round_trip(kind):
    for cfg in TILE_CONFIGS:
        d = cfg.defines(kind)
        assert parse_defines(d) == (kind, cfg)
        assert parse_name(cfg.name(kind)) == (kind, cfg)
        values = dict(x.removeprefix("-D").split("=") for x in d)
        assert values["QC_KERNEL"] == cfg.name(kind)
        assert (values["QC_BM"], values["QC_BN"], values["QC_BK"]) == \
            (str(cfg.bm), str(cfg.bn), str(cfg.bk))
        assert (values["QC_WARPS_M"], values["QC_WARPS_N"]) == (str(cfg.warps_m), str(cfg.warps_n))
        assert (values["QC_STAGES"], values["QC_SPLITK"]) == (str(cfg.stages), str(cfg.split_k))
        group = KINDS[kind][1]
        assert values.get("QC_GROUP") == (None if group is None else str(group))
    with pytest.raises(ValueError, match="not a GEMM kernel name"):
        parse_name("qc_w8a8_16x64_w1x2_s4_k1")


def test_invalid_tile_configs_rejected():
    for bad in [(16, 64, 128, 2, 2, 4), (16, 48, 128, 1, 2, 4), (16, 64, 48, 1, 2, 4),
                (16, 64, 128, 1, 2, 1), (16, 64, 128, 1, 2, 4, 0)]:
        with pytest.raises(ValueError, match="invalid TileConfig"):
            TileConfig(*bad)


def test_launch_geometry():
    cfg = TileConfig(128, 128, 64, 2, 2, 4)
    assert cfg.threads() == 128
    assert cfg.grid(129, 192) == (2, 2, 1)
    assert cfg.flag_count(129, 192) == 0 and cfg.workspace_bytes(129, 192) == 0
    sk = TileConfig(16, 64, 128, 1, 2, 4, 4)
    assert sk.threads() == 64
    assert sk.grid(3, 4096) == (64, 1, 4)
    assert sk.workspace_bytes(3, 200) == 4 * 3 * 224 * 4  # [split, M, Np] int32
    assert sk.flag_count(3, 4096) == 0  # the separate reduction needs no counters
    fix = sk.with_split(4, "fixup")
    assert fix.flag_count(3, 4096) == 64  # one arrival counter per output tile
    assert TileConfig(32, 128, 128, 1, 4, 4, 2, "fixup").flag_count(33, 200) == 2 * 2


def test_smem_bytes():
    cfg = TileConfig(128, 128, 64, 2, 2, 4)
    assert cfg.smem_bytes("w8a8") == 4 * (128 * 64 + 128 * 64)
    assert cfg.smem_bytes("w4a8") == 4 * (128 * 64 + 128 * 64 // 2)
    assert cfg.smem_bytes("w4a8_g128") == 4 * (128 * 64 + 128 * 64 // 2 + 256)  # s2+negzs row
    g64 = TileConfig(16, 64, 128, 1, 2, 4)
    assert g64.smem_bytes("w4a8_g64") == 4 * (16 * 128 + 64 * 128 // 2 + 256)  # 2 group rows
    for cfg in TILE_CONFIGS:
        for kind in KINDS:
            assert cfg.smem_bytes(kind) <= C.MAX_SMEM_BYTES


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_selection_covers_llama_shapes(kind):
    group = KINDS[kind][1]
    for n, k in LLAMA_SHAPES:
        shipped = configs_for(kind, n, k)
        assert len(set(shipped)) == len(shipped)
        seen = set()
        for m in range(1, 8193):
            cfg = select_config(kind, m, n, k)
            seen.add(cfg)
            assert cfg in TILE_CONFIGS
            assert cfg.smem_bytes(kind) <= C.MAX_SMEM_BYTES
            if group:
                assert cfg.bk % group == 0 or group % cfg.bk == 0
            if cfg.split_k > 1:
                tiles = -(-padded_k(kind, k) // cfg.bk)
                assert tiles % cfg.split_k == 0, (kind, m, n, k, cfg)
                slice_k = tiles // cfg.split_k * cfg.bk
                assert not group or slice_k % group == 0
        assert seen == set(shipped), (kind, n, k)
        assert select_config(kind, 1, n, k).bm <= 16  # decode gets a thin tile
        # prefill gets a wide tile (W4Ax 64 x 128: its two accumulator sets, 64 a thread)
        big = select_config(kind, 8192, n, k)
        assert big.bm >= 128 or kind in C.A4X_KINDS and big.bm * big.bn >= 64 * 128


def test_split_k_only_where_n_gives_too_few_tiles():
    assert select_config("w4a8", 1, 6144, 4096).split_k > 1    # qkv: 96 thin tiles
    assert select_config("w4a8", 1, 28672, 4096).split_k == 1  # gate_up: 448 tiles
    assert select_config("w4a8", 1, 28672, 14336).split_k > 1  # long K still splits


def test_four_stage_big_tile_only_for_4bit_weights():
    assert select_config("w4a8", 4096, 4096, 4096).stages == 4
    assert select_config("w4a8_g128", 4096, 4096, 4096).stages == 4
    assert select_config("w8a8", 4096, 4096, 4096).stages == 3
    assert select_config("w4a8", 1024, 4096, 4096).stages == 3


def test_split_k_used_for_long_k_decode():
    assert select_config("w4a8_g128", 1, 4096, 14336).split_k > 1
    assert select_config("w8a8", 4, 4096, 4096).split_k > 1
    assert select_config("w4a8", 1, 192, 576).split_k == 1
    assert select_config("w4a8", 4096, 4096, 4096).split_k == 1


def test_selection_falls_back_when_split_does_not_divide():
    # K = 4096 + 128: 33 K tiles of 128 split in 4 as 9 + 9 + 9 + 6 (uneven is fine)
    cfg = select_config("w8a8", 1, 4096, 4224)
    assert cfg.split_k == 4 and cfg.bm == 16
    # K = 4 tiles of 128 cannot feed 8 slices (empty ones): 4 x 1 tile
    assert not TileConfig(16, 64, 128, 1, 2, 4, 8).fits("w4a8", 512)
    assert TileConfig(16, 64, 128, 1, 2, 4, 4).fits("w4a8", 512)
    # an uneven K: llama-2 down (K = 11008, 86 tiles) still splits
    assert select_config("w4a8", 1, 4096, 11008).split_k == 4
    # every bucket ends with an unconditional split-free row, so any K % 16 == 0 is served
    buckets = {}
    for row in SELECTION:
        buckets.setdefault(row.m_max, []).append(row)
    for rows in buckets.values():
        last = rows[-1]
        assert last.config.split_k == 1 and last.k_min == 0
        assert last.n_max is None and last.kinds is None
    for k in (16, 48, 592, 4112, 14352):
        for kind in KINDS:
            for m in (1, 17, 33, 200, 5000):
                select_config(kind, m, 100, k)


@pytest.mark.parametrize("k", [1, 8, 577, 4100])
def test_k_not_multiple_of_16_rejected(k):
    for kind in KINDS:
        with pytest.raises(ValueError, match="K % 16 == 0"):
            select_config(kind, 1, 4096, k)
        with pytest.raises(ValueError, match="K % 16 == 0"):
            configs_for(kind, 4096, k)


def test_bad_shape_and_kind():
    with pytest.raises(ValueError, match="positive"):
        select_config("w8a8", 0, 4096, 4096)
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        select_config("fp8", 1, 4096, 4096)


def _cutlass_include() -> Path | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cute" / "arch" / "mma_sm80.hpp").exists() else None


def test_templates_compile_with_nvcc(tmp_path):
    """Both templates (w8a8 and w4a8 per channel; the group variant shares the w4a8 source)
    build for sm_80 with one small split-K config, without local-memory spills, and export
    both entries."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    inc = _cutlass_include()
    if inc is None:
        pytest.skip("CUTLASS/CuTe headers (pip package nvidia-cutlass) not found")
    cfg = TileConfig(16, 64, 128, 1, 2, 4, 2)

    def build(kind):
        out = tmp_path / f"{cfg.name(kind)}.cubin"
        cmd = [nvcc, "-cubin", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_80",
               "--resource-usage", f"-I{inc}", *cfg.defines(kind), "-o", str(out),
               str(TEMPLATES / cfg.template(kind))]
        return kind, out, subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(build, ["w8a8", "w4a8"]))
    for kind, out, proc in results:
        assert proc.returncode == 0, proc.stderr[-3000:]
        ours = [line for line in proc.stderr.splitlines()
                if "warning" in line.lower() and cfg.template(kind) in line]
        assert not ours, "\n".join(ours)
        usage = [line.strip() for line in proc.stderr.splitlines() if "spill stores" in line]
        assert len(usage) == 2, proc.stderr[-3000:]  # the GEMM and its _reduce entry
        for line in usage:
            assert line.startswith(
                "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"), line
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", proc.stderr)]
        assert len(regs) == 2 and max(regs) <= 255
        blob = out.read_bytes()
        for entry in cfg.entries(kind):
            assert entry.encode() in blob


def test_reduce_mode_is_a_launch_choice_not_a_kernel():
    sep = TileConfig(16, 64, 128, 1, 2, 4, 4)
    fix = sep.with_split(4, "fixup")
    assert sep.reduce == "separate" and fix.reduce == "fixup"  # separate is the default
    # one binary serves both: same name, equal (one build), both entries in it
    assert sep == fix and sep.name("w4a8") == fix.name("w4a8")
    assert fix.entries("w4a8") == (fix.name("w4a8"), fix.name("w4a8") + "_reduce")
    assert TileConfig(16, 64, 128, 1, 2, 4).entries("w4a8") == ("qc_w4a8_16x64x128_w1x2_s4_k1",)
    assert fix.label("w4a8") == fix.name("w4a8") + "_fixup" and sep.label("w4a8") == sep.name("w4a8")
    # the fixup uses counters and no second launch; the separate mode the reverse
    assert fix.flag_count(3, 4096) == 64 and fix.reduce_launch(3, 4096) is None
    assert sep.flag_count(3, 4096) == 0
    assert sep.reduce_launch(3, 4096) == ((12, 1, 1), (C.REDUCE_THREADS, 1, 1))  # 3*1024 quads
    assert TileConfig(16, 64, 128, 1, 2, 4, 1).reduce_launch(3, 4096) is None
    with pytest.raises(ValueError, match="reduce must be one of"):
        TileConfig(16, 64, 128, 1, 2, 4, 2, "atomic")
    assert all(r.config.reduce in C.REDUCE_MODES for r in SELECTION)


def test_cluster_reduce_needs_smem_for_the_tile_and_at_most_8_slices():
    clu = TileConfig(16, 64, 128, 1, 2, 8, 4, "cluster")
    assert clu.cluster_dims() == (1, 1, 4) and clu.label("w4a8").endswith("_k4_cluster")
    assert clu.workspace_bytes(3, 4096) == 0 and clu.flag_count(3, 4096) == 0
    assert clu.reduce_launch(3, 4096) is None and clu.fits("w4a8", 4096)
    assert TileConfig(16, 64, 128, 1, 2, 8, 4).cluster_dims() is None
    assert not clu.with_split(16).fits("w4a8", 14336)  # clusters hold at most 8 CTAs
    # 128x256 int32 accumulators (128 KB) do not fit a 96 KB pipeline
    huge = TileConfig(128, 256, 64, 2, 4, 4, 2, "cluster")
    assert huge.smem_bytes("w4a8") < 128 * 256 * 4 and not huge.fits("w4a8", 4096)
    assert huge.with_split(2, "separate").fits("w4a8", 4096)


def test_reduce_threads_match_common_cuh():
    src = (TEMPLATES / "common.cuh").read_text()
    assert f"constexpr int kReduceThreads = {C.REDUCE_THREADS};" in src


def test_sm90_kinds_name_and_fit_only_wgmma_tiles():
    from qcompile.cutlass_templates.configs import (RS_KINDS, SM90_KINDS, WGMMA, WGMMA_RS,
                                                    WGMMA_RS_1WG, WGMMA_WIDE)
    assert "w8a8_sm90" in SM90_KINDS and "w8a8_sm90" not in KINDS  # via select_kernel only
    for cfg in (WGMMA, WGMMA_WIDE):
        assert cfg.fits("w8a8_sm90", 4096) and cfg.fits("w8a8_sm90", 576)
        assert parse_name(cfg.name("w8a8_sm90")) == ("w8a8_sm90", cfg)
        assert cfg.template("w8a8_sm90") == "w8a8_sm90.cu"
        assert cfg.smem_bytes("w8a8_sm90") == cfg.stages * (cfg.bm + cfg.bn) * 128
        assert not cfg.fits("w4a8_rs_sm90", 4096)  # warps along M: not the RS layout
    assert not C.BIG.fits("w8a8_sm90", 4096)            # mma.sync warp layout
    assert not WGMMA.with_split(2).fits("w8a8_sm90", 4096)
    with pytest.raises(ValueError, match="no rows in SELECTION|unknown GEMM kind"):
        select_config("w8a8_sm90", 1, 4096, 4096)
    # register-A W4A8: bm tokens, bn weight rows, one warpgroup (4 warps) per 128 rows
    assert set(RS_KINDS) == {"w4a8_rs_sm90", "w4a8_g128_rs_sm90", "w4a8_g64_rs_sm90",
                             "w4a4x_rs_sm90"}
    for kind in RS_KINDS:
        a4x = kind in C.A4X_KINDS  # two accumulator sets: 64 tokens at most
        assert not (a4x and (WGMMA_RS.fits(kind, 4096) or WGMMA_RS_1WG.fits(kind, 4096)))
        for cfg in (C.WGMMA_RS_T64, C.WGMMA_RS_T64_WIDE) if a4x else (WGMMA_RS, WGMMA_RS_1WG):
            assert cfg.fits(kind, 4096) and cfg.fits(kind, 576)
            assert cfg.threads() == cfg.bn and cfg.template(kind) == "w4a8_rs_sm90.cu"
            assert parse_name(cfg.name(kind)) == (kind, cfg)
        assert not WGMMA_WIDE.fits(kind, 4096) and not WGMMA_RS.with_split(2).fits(kind, 4096)
    # per stage: the activation rows plus the packed nibbles (plus s2 / negzs rows with groups)
    assert WGMMA_RS.smem_bytes("w4a8_rs_sm90") == 5 * (128 * 128 + 256 * 64)
    assert WGMMA_RS.smem_bytes("w4a8_g128_rs_sm90") == 5 * (128 * 128 + 256 * 64 + 512)
    assert WGMMA_RS.smem_bytes("w4a8_g64_rs_sm90") == 5 * (128 * 128 + 256 * 64 + 1024)


def test_target_rows_pick_wgmma_on_sm90_only_where_measured_faster():
    from qcompile.cutlass_templates.configs import (WGMMA, WGMMA_RS, WGMMA_RS_1WG,
                                                    WGMMA_RS_T64, WGMMA_WIDE, kernels_for,
                                                    select_kernel)
    assert select_kernel("w8a8", 4096, 4096, 4096, "sm80") == ("w8a8", select_config("w8a8", 4096, 4096, 4096))
    assert select_kernel("w8a8", 4096, 4096, 4096, "sm90") == ("w8a8_sm90", WGMMA_WIDE)
    assert select_kernel("w8a8", 1024, 4096, 14336, "sm90") == ("w8a8_sm90", WGMMA_WIDE)
    assert select_kernel("w8a8", 1024, 6144, 4096, "sm90") == ("w8a8_sm90", WGMMA)
    assert select_kernel("w8a8", 1024, 28672, 4096, "sm90") == ("w8a8_sm90", WGMMA_WIDE)
    assert select_kernel("w8a8", 512, 6144, 4096, "sm90") == ("w8a8_sm90", WGMMA)
    assert select_kernel("w8a8", 256, 6144, 4096, "sm90") == ("w8a8_sm90", WGMMA)
    assert select_kernel("w8a8", 256, 12288, 4096, "sm90") == ("w8a8_sm90", WGMMA_WIDE)
    assert select_kernel("w8a8", 256, 4096, 4096, "sm90")[0] == "w8a8"  # o, down: mma.sync
    assert select_kernel("w8a8", 128, 6144, 4096, "sm90")[0] == "w8a8"
    for base in ("w4a8", "w4a8_g128", "w4a8_g64"):  # register-A wgmma
        rs = base + "_rs_sm90"
        assert select_kernel(base, 4096, 4096, 4096, "sm90") == (rs, WGMMA_RS)
        assert select_kernel(base, 1024, 4096, 14336, "sm90") == (rs, WGMMA_RS)
        assert select_kernel(base, 1024, 6144, 4096, "sm90") == (rs, WGMMA_RS_T64)  # qkv
        assert select_kernel(base, 512, 4096, 4096, "sm90") == (rs, WGMMA_RS_T64)
        assert select_kernel(base, 512, 4096, 14336, "sm90") == (rs, WGMMA_RS_1WG)
        assert select_kernel(base, 256, 28672, 4096, "sm90") == (rs, WGMMA_RS)  # wide N
        assert select_kernel(base, 64, 28672, 4096, "sm90") == (rs, WGMMA_RS_T64)
        assert select_kernel(base, 16, 28672, 4096, "sm90")[0] == base  # decode: mma.sync
        assert select_kernel(base, 256, 4096, 4096, "sm90")[0] == base
        assert select_kernel(base, 4096, 4096, 4096, "sm80")[0] == base
        shipped = kernels_for(base, 4096, 4096, "sm90")
        assert (rs, WGMMA_RS) in shipped and (rs, WGMMA_RS_T64) in shipped
        assert all(kind == base for kind, _ in kernels_for(base, 4096, 4096, "sm80"))
        for m in (1, 64, 300, 600, 1000, 3000):  # whatever is selected is shipped
            for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
                assert select_kernel(base, m, n, k, "sm90") in kernels_for(base, n, k, "sm90")
    sm90 = kernels_for("w8a8", 4096, 4096, "sm90")
    assert ("w8a8_sm90", WGMMA) in sm90 and ("w8a8_sm90", WGMMA_WIDE) in sm90
    assert kernels_for("w8a8", 4096, 4096, "sm80") == [("w8a8", c) for c in configs_for("w8a8", 4096, 4096)]
    for m in (1, 600, 3000):  # whatever is selected is shipped
        assert select_kernel("w8a8", m, 4096, 4096, "sm90") in sm90


def test_a4x_kinds_take_no_split_and_at_most_64_accumulators_a_thread():
    """W4Ax (per-block activation scales): a K tile is one 128-channel block, an fp32
    accumulator beside the int32 one (at most 64 of each a thread: no spills), and no split-K
    (the blocks' fp32 sum runs in order, as the reference's)."""
    for kind in C.A4X_KINDS:
        assert f"-DQC_A4X={2 if kind == 'w4a4x_s4' else 1}" in C.MID.defines(kind)
        assert not C.BIG.fits(kind, 4096) and not C.WGMMA_RS.fits(kind, 4096)
        assert not C.MID.with_split(2).fits(kind, 4096)
        assert not TileConfig(64, 64, 64, 2, 2, 4).fits(kind, 4096)  # BK must be the block
    assert C.MID.fits("w4a4x", 4096) and C.A4X_WIDE.fits("w4a4x", 4096)
    assert C.WGMMA_RS_T64.fits("w4a4x_rs_sm90", 4096)
    assert "-DQC_A4X=1" in C.WGMMA_RS_T64.defines("w4a4x_rs_sm90")
    assert not any("QC_A4X" in d for d in C.MID.defines("w4a8"))
    for n, k in LLAMA_SHAPES:
        for m in (1, 16, 64, 128, 256, 1024, 8192):
            kind, cfg = C.select_kernel("w4a4x", m, n, k, "sm90")
            assert cfg.split_k == 1 and cfg.fits(kind, k) and kind in C.A4X_KINDS
    # decode takes its CTAs from N instead of K: 32-column tiles up to N = 8192
    assert select_config("w4a4x", 1, 4096, 14336) == C.A4X_DECODE
    assert select_config("w4a4x", 40, 6144, 4096) == C.A4X_THIN
    assert select_config("w4a8", 1, 4096, 14336).split_k > 1  # W4A8 keeps its split rows
