"""CPU tests of bench/gemm.py's pure logic: shape parsing, TOP/s, roofline and ratio math, the
markdown/CSV/PNG writers on fake timings, and one benchmark point built and run on CPU with a
fake timer (packing, argument order, rotation, correctness guard)."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "bench" / "gemm.py"


@pytest.fixture(scope="module")
def bench(bench_module):
    with bench_module("gemm") as mod:
        yield mod


def _rows(bench, bw=4e12):
    """Fake timings for one shape at M = 1 and 1024: ours 10 us, peers 20/40/80/160 us."""
    rows = []
    for m in (1, 1024):
        for i, impl in enumerate(("ours-w4a8", *bench.PEERS)):
            t = 10.0 if i == 0 else 10.0 * 2 ** i
            rows.append(dict(shape="llama3-8b/o", N=4096, K=4096, M=m, impl=impl, status="ok",
                             time_us=t, weight_bytes=4096 * 4096 // 2, note=""))
    rows.append(dict(shape="llama3-8b/o", N=4096, K=4096, M=1, impl="cublas-fp8",
                     status="skip", time_us=None, weight_bytes=None, note="no fp8"))
    rows.pop(-4)  # M=1024 cublas-int8 missing: its ratio stays empty
    return bench.derive(rows, bw, 1289.0)


def test_parse_shapes(bench):
    assert bench.parse_shapes("llama3-8b:qkv,llama2-7b:down") == [
        ("llama3-8b/qkv", 6144, 4096), ("llama2-7b/down", 4096, 11008)]
    assert [s[0] for s in bench.parse_shapes("llama2-7b")] == [
        "llama2-7b/qkv", "llama2-7b/o", "llama2-7b/gate_up", "llama2-7b/down"]
    with pytest.raises(SystemExit):
        bench.parse_shapes("llama3-8b:mlp")


def test_tops_roofline_and_rotation_math(bench):
    assert bench.tops(1, 4096, 4096, 10.0) == pytest.approx(2 * 4096 * 4096 / 1e-5 / 1e12)
    # W4 at M=1: 2 N K ops over N K / 2 bytes read at bw -> 4 * bw ops/s
    assert bench.bw_roofline_tops(1, 4096, 4096, 0.5, 4e12) == pytest.approx(16.0)
    assert bench.bw_roofline_tops(64, 6144, 4096, 2.0, 4e12) == pytest.approx(256.0)
    assert bench.n_copies(4096 * 4096 // 2, 50 << 20) == 13  # 8.4 MB sets, 2 x 52.4 MB
    assert bench.n_copies(1 << 30, 50 << 20) == 2
    assert bench.n_copies(0, 50 << 20) == 64
    assert [bench.int8_rows(m) for m in (1, 16, 17, 1024)] == [32, 32, 17, 1024]


def test_derive_ratios_and_limits(bench):
    rows = {(r["M"], r["impl"]): r for r in _rows(bench)}
    ours1, ours1k = rows[1, "ours-w4a8"], rows[1024, "ours-w4a8"]
    assert ours1["tops"] == pytest.approx(2 * 4096 * 4096 / 10e-6 / 1e12)
    assert ours1["bound_us"] == pytest.approx(4096 * 4096 / 2 / 4e12 * 1e6)
    assert ours1["frac_bw"] == pytest.approx(ours1["bound_us"] / 10.0)
    assert ours1["frac_s8"] is None and ours1k["frac_bw"] is None
    assert ours1k["frac_s8"] == pytest.approx(ours1k["tops"] / 1289.0)
    assert ours1["x_cublas-fp16"] == pytest.approx(2.0)      # peer 20 us / ours 10 us
    assert ours1["x_tinygemm-w4a16"] == pytest.approx(16.0)
    assert ours1["x_cublas-fp8"] is None                     # skipped peer
    assert ours1k["x_cublas-int8"] is None                   # missing peer
    assert rows[1, "cublas-fp16"]["x_cublas-fp16"] is None   # ratios only on ours rows


def test_markdown_csv_png(bench, tmp_path):
    rows = _rows(bench)
    rows[0]["status"] = "FAIL"
    text = bench.write_outputs(rows, tmp_path, "Fake GPU, torch x", 4e12, 1289.0)
    assert "### llama3-8b/o (N=4096, K=4096)" in text and "**FAIL**" in text
    assert "| 1 | ours-w4a8 | 10.0 | 3.4 | 2.00 | 4.00 | " in text
    assert "of BW bound" in text and "of s8 peak" in text
    assert (tmp_path / "gemm.md").read_text() == text
    with open(tmp_path / "gemm.csv") as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0]) == bench.CSV_COLUMNS and len(got) == len(rows)
    assert float(got[0]["x_cublas-fp16"]) == pytest.approx(2.0)
    assert got[-1]["time_us"] == "" and got[-1]["status"] == "skip"
    assert (tmp_path / "gemm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_point_on_cpu_with_fake_timer(bench):
    """Every builder on CPU: ours packs, checks against itself (err 0, status ref: no CUDA
    kernel), runs through the rotated callables; peers run or skip with a reason."""
    from qcompile.compiler.config import W4A8, W4A8_G128, W8A8
    impls = {f"ours-{s.name}": bench.build_ours(s, lambda run: (run(), "no CUDA"))
             for s in (W4A8, W4A8_G128, W8A8)}
    impls.update({"cublas-fp16": bench.build_fp16, "cublas-int8": bench.build_int8,
                  "cublas-fp8": bench.build_fp8, "tinygemm-w4a16": bench.build_tinygemm})
    calls_seen = {}

    def timer(calls):
        outs = [c() for c in calls]
        calls_seen[len(calls_seen)] = (len(calls), outs[0].shape)
        return 5.0, "graph"

    ctx = bench.ShapeCtx("tiny/o", 96, 256, device="cpu")
    for m in (3, 40):
        x = torch.randn(m, 256, dtype=torch.float16)
        rows = {r["impl"]: r for r in bench.run_point(ctx, x, impls, timer, l2_bytes=1 << 20)}
        for s in ("w4a8", "w4a8-g128", "w8a8"):
            r = rows[f"ours-{s}"]
            assert (r["status"], r["time_us"]) == ("ref", 5.0), r
            assert r["note"] == "rel err 0.0e+00; reference: no CUDA", r
        assert rows["cublas-fp16"]["status"] == "ok"
        assert rows["cublas-int8"]["status"] == "ok"
        assert ("M padded to 32" in rows["cublas-int8"]["note"]) == (m <= 16)
        for name in ("cublas-fp8", "tinygemm-w4a16"):
            assert rows[name]["status"] in ("ok", "skip"), rows[name]
            assert rows[name]["status"] == "ok" or rows[name]["note"]
    assert all(n >= 2 for n, _ in calls_seen.values())
    assert (40, 96) in {shape[-2:] for _, shape in calls_seen.values() if len(shape) == 2}


def test_check_rows_flags_a_wrong_kernel(bench):
    """A 'kernel' reading a corrupted scale must fail the guard; the same args pass."""
    from qcompile.compiler.config import W8A8
    from qcompile.passes.swap_gemm import GEMM_FORMATS
    from qcompile.compiler.schemes import GEMM_OPS
    from qcompile.runtime.ops import quant_a8_ref
    w = torch.randn(64, 128) * 0.02
    q, s = GEMM_FORMATS[W8A8].pack(w, W8A8).values()
    xq, sx, _ = quant_a8_ref(torch.randn(100, 128))
    good = (xq, sx, q, s, None, 64, torch.float16)
    bad = (xq, sx, q, s * 1.5, None, 64, torch.float16)
    op = GEMM_OPS[W8A8]
    assert bench.check_rows(op, good, good, 2) == 0.0
    assert bench.check_rows(op, bad, good, 2) == pytest.approx(0.5, rel=1e-2)
    nan = (xq, sx, q, s * math.nan, None, 64, torch.float16)
    assert bench.check_rows(op, nan, good, 2) == math.inf


def test_imports_from_checkout_without_install(tmp_path):
    """On a GPU machine without `pip install -e .`, qcompile maps onto the checkout."""
    code = (
        "import sys, importlib.util\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path_hooks = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
        "sys.path_importer_cache.clear()\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m\n"
        "spec.loader.exec_module(m)\n"
        "m.import_qcompile()\n"
        "import qcompile.runtime.ops as ops, qcompile.passes.swap_gemm\n"
        "print(ops.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("runtime/ops/__init__.py")


def test_probe_reads_kernel_stats(bench):
    """ok only when the call launched a kernel and fell back to the reference nowhere."""
    from collections import Counter
    from types import SimpleNamespace
    stats = SimpleNamespace(launches=Counter(), fallbacks=Counter({"old reason": 3}))
    probe = bench.make_probe(stats)
    assert probe(lambda: stats.launches.update(["w4a8_t128"]) or 7) == (7, "")
    assert probe(lambda: stats.fallbacks.update(["w4a8: no config"])) == (None, "w4a8: no config")
    assert probe(lambda: None) == (None, "no kernel launched")


def test_without_kernels_ours_is_labelled_reference(bench, capsys):
    """On this CPU machine enable() cannot load kernels: loud warning, every call is ref."""
    probe = bench.enable_kernels()
    assert "REFERENCE" in capsys.readouterr().out
    assert probe(lambda: 1) == (1, "gemm_kernels unavailable")
