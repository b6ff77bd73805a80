"""The nvcc driver: builds for sm80 and sm90 with a tiny test template, cache hits skip nvcc,
the key follows the source and its headers, errors are clear, the kernel table round-trips
and detects tampering."""
import hashlib
import json
import shutil
from dataclasses import dataclass, replace

import pytest

from qcompile.cutlass_templates import build
from qcompile.cutlass_templates.build import (KernelBuildError, KernelTableError,
                                              NvccNotFoundError, build_kernel, build_kernels,
                                              kernel_key, read_kernel_table, write_kernel_table)

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")

KINDS = {"axpb": ("axpb.cu", None), "broken": ("broken.cu", None)}

COMMON = """#pragma once
#define QC_PASTE_(a, b) a##b
#define QC_PASTE(a, b) QC_PASTE_(a, b)
__device__ inline float qc_scale(float v) { return 2.0f * v; }
"""

TEMPLATE = """#include "common.cuh"
// y[i] = 2 * x[i] + QC_BM
extern "C" __global__ void QC_NAME(float* y, const float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = qc_scale(x[i]) + QC_BM;
}
"""


@dataclass(frozen=True)
class Cfg:
    """Stand-in for configs.TileConfig: the methods build.py calls."""
    bm: int = 64
    bn: int = 64
    bk: int = 32
    warps_m: int = 2
    warps_n: int = 2
    stages: int = 3
    split_k: int = 1

    def name(self, kind):
        return (f"qc_{kind}_{self.bm}x{self.bn}x{self.bk}_w{self.warps_m}x{self.warps_n}"
                f"_s{self.stages}_k{self.split_k}")

    def defines(self, kind):
        return [f"-DQC_NAME={self.name(kind)}", f"-DQC_BM={self.bm}", f"QC_SPLIT_K={self.split_k}"]

    def threads(self):
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self, kind):
        return self.stages * (self.bm + self.bn) * self.bk


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    (d / "common.cuh").write_text(COMMON)
    (d / "axpb.cu").write_text(TEMPLATE)
    (d / "broken.cu").write_text('extern "C" __global__ void QC_NAME() { undeclared_thing(); }\n')
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _build(templates, cache, cfg=Cfg(), target="sm80", kind="axpb"):
    return build_kernel(kind, cfg, target, cache, template_dir=templates, kinds=KINDS)


@needs_nvcc
@pytest.mark.parametrize("target", ["sm80", "sm90"])
def test_build_targets(templates, cache, target):
    cfg = Cfg(split_k=2)
    b = _build(templates, cache, cfg, target)
    data = b.path.read_bytes()
    assert b.path.suffix == ".fatbin" and b.path.parent == cache / target
    assert b.entries == (cfg.name("axpb"),)
    assert b.threads == 128 and b.smem_bytes == cfg.smem_bytes("axpb") and b.target == target
    assert "release 13" in b.nvcc or "release 12" in b.nvcc
    for entry in b.entries:  # the SASS's ELF names each entry's section
        assert f".text.{entry}".encode() in data
    arch = {"sm80": b"sm_80", "sm90": b"sm_90a"}[target]
    assert arch in data


@needs_nvcc
def test_cache_hit_skips_nvcc(templates, cache, monkeypatch):
    first = _build(templates, cache, Cfg(bm=128))
    mtime = first.path.stat().st_mtime_ns

    def no_nvcc(cmd):
        raise AssertionError(f"nvcc ran on a cache hit: {cmd}")
    monkeypatch.setattr(build, "_compile", no_nvcc)
    again = _build(templates, cache, Cfg(bm=128))
    assert again == first and again.path.stat().st_mtime_ns == mtime
    assert not [p for p in again.path.parent.iterdir() if p.name.startswith(".")]  # no temp left


@needs_nvcc
def test_key_follows_source_headers_defines_target(templates, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(templates, d)

    def key(cfg=Cfg(), target="sm80"):
        return kernel_key("axpb", cfg, target, template_dir=d, kinds=KINDS)
    base = key()
    assert key() == base
    assert key(Cfg(bm=32)) != base and key(target="sm90") != base
    (d / "common.cuh").write_text(COMMON + "// a comment changes the header\n")
    k_header = key()
    assert k_header != base
    (d / "axpb.cu").write_text(TEMPLATE + "\n")
    assert key() not in (base, k_header)
    (d / "unrelated.cuh").write_text("// not included\n")
    assert key() == key()
    assert build.local_headers(d / "axpb.cu", d) == [(d / "common.cuh").resolve()]


@needs_nvcc
def test_source_change_rebuilds(templates, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(templates, d)
    a = _build(d, tmp_path / "cache")
    (d / "axpb.cu").write_text(TEMPLATE.replace("+ QC_BM", "- QC_BM"))
    b = _build(d, tmp_path / "cache")
    assert a.path != b.path and a.sha256 != b.sha256 and a.path.exists()


@needs_nvcc
def test_compile_error_names_command_and_error(templates, tmp_path):
    with pytest.raises(KernelBuildError) as e:
        _build(templates, tmp_path, kind="broken")
    msg = str(e.value)
    assert "undeclared_thing" in msg and "nvcc" in msg and "broken.cu" in msg
    assert "-gencode arch=compute_80,code=sm_80" in msg
    assert not list((tmp_path / "sm80").iterdir())  # neither binary nor temp file


def test_missing_nvcc(templates, tmp_path, monkeypatch):
    for var in ("QCOMPILE_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NvccNotFoundError, match="Install the CUDA toolkit"):
        _build(templates, tmp_path)
    with pytest.raises(NvccNotFoundError, match="PATH"):
        build_kernels([("axpb", Cfg())], "sm80", progress=False, cache_dir=tmp_path,
                      template_dir=templates, kinds=KINDS)


def test_bad_target_and_kind(templates, tmp_path):
    with pytest.raises(ValueError, match="unknown target 'sm75'"):
        build_kernel("axpb", Cfg(), "sm75", tmp_path, template_dir=templates, kinds=KINDS)
    with pytest.raises(ValueError, match="unknown kernel kind 'w2a2'"):
        build_kernel("w2a2", Cfg(), "sm80", tmp_path, template_dir=templates, kinds=KINDS)


@needs_nvcc
def test_parallel_build_dedup_and_table(templates, tmp_path):
    cfgs = [Cfg(bm=16), Cfg(bm=32, split_k=2), Cfg(bm=48), Cfg(bm=16)]  # one duplicate
    bins = build_kernels([("axpb", c) for c in cfgs], "sm90", jobs=3, progress=False,
                         cache_dir=tmp_path / "cache", template_dir=templates, kinds=KINDS)
    assert [b.config for b in bins] == cfgs[:3]
    assert len({b.path for b in bins}) == 3

    out = tmp_path / "art" / "kernels" / "sm90"
    table_path = write_kernel_table(bins + bins[:1], out)
    assert table_path == out / "kernels.json"
    table = read_kernel_table(out)
    assert [e["name"] for e in table] == [b.name for b in bins]
    e = table[1]
    assert e["entries"] == [bins[1].name]
    assert e["config"] == {"bm": 32, "bn": 64, "bk": 32, "warps_m": 2, "warps_n": 2,
                           "stages": 3, "split_k": 2}
    assert (e["kind"], e["target"], e["file"]) == ("axpb", "sm90", bins[1].name + ".fatbin")
    assert (out / e["file"]).read_bytes() == bins[1].path.read_bytes()

    # tampering: a changed byte, a missing file, a file outside the folder
    f = out / table[0]["file"]
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(KernelTableError, match="does not match"):
        read_kernel_table(out)
    f.unlink()
    with pytest.raises(KernelTableError, match="is missing"):
        read_kernel_table(out)
    write_kernel_table(bins, out)  # restores it
    assert len(read_kernel_table(out)) == 3
    table[0]["file"] = "../evil.fatbin"
    (out / "kernels.json").write_text(json.dumps(table))
    with pytest.raises(KernelTableError, match="outside"):
        read_kernel_table(out)
    with pytest.raises(KernelTableError, match="no kernels.json"):
        read_kernel_table(tmp_path)


@needs_nvcc
def test_build_failure_in_parallel_raises(templates, tmp_path):
    with pytest.raises(KernelBuildError, match="undeclared_thing"):
        build_kernels([("axpb", Cfg(bm=8)), ("broken", Cfg())], "sm80", jobs=2, progress=False,
                      cache_dir=tmp_path, template_dir=templates, kinds=KINDS)


def test_name_clash_in_table_is_refused(tmp_path):
    a, b = tmp_path / "a.fatbin", tmp_path / "b.fatbin"
    a.write_bytes(b"one")
    b.write_bytes(b"two")

    def mk(p):
        return build.KernelBinary(p, ("k",), "axpb", Cfg(), "sm80", 0, 128,
                                  hashlib.sha256(p.read_bytes()).hexdigest(), "nvcc")
    with pytest.raises(KernelTableError, match="both named k"):
        write_kernel_table([mk(a), mk(b)], tmp_path / "out")
    stale = replace(mk(a), sha256="0" * 64)
    with pytest.raises(KernelTableError, match="changed since it was built"):
        write_kernel_table([stale], tmp_path / "out2")
