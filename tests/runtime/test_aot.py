"""Engine.load(compile="aot"): the program compiled by AOTInductor into a cached package gives
the eager engine's greedy tokens at every batch size (one sequence included: the exported
dimensions are symbolic from 1), and a second load maps the package without compiling."""
import time

import pytest
import torch

from qcompile.compiler.config import CompileConfig
from qcompile.runtime import aot
from qcompile.runtime.engine import Engine

# test_inductor_shapes' artifact: the fallback's torch.compile leaves in Inductor's cache the
# kernels that test then finds (12 s -> 3 s on 2 cores)
CFG = CompileConfig(precision="w4a8", kv="int4", dtype="float32", kernels="skip",
                    quantizer="rtn")
PROMPTS = ["the quick brown fox", "def main():", "hello", "a b c d e f",
           "a longer prompt that spans more than one page of the cache " * 3]


@pytest.mark.parametrize("precision,kv", [("w4a8", "int4")])
def test_aot_engine_matches_eager(tiny_artifact, inductor_cache_dir, tmp_path, monkeypatch,
                                  precision, kv):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir)
    art = tiny_artifact(CompileConfig(precision=precision, kv=kv, dtype="float32",
                                      kernels="skip", quantizer="rtn"))
    eager = Engine.load(art, compile=False, max_seqs=8)
    compiled = Engine.load(art, compile="aot", max_seqs=8)
    assert compiled.compiled == "aot"
    assert len(list((tmp_path / "cache" / "aot").glob("*.pt2"))) == 1
    assert len(list((tmp_path / "cache" / "aot").glob("*.ok"))) == 1  # the probe passed
    for prompts in (PROMPTS[:4], PROMPTS[2:3], PROMPTS[4:], PROMPTS[:2]):
        want = [c.token_ids for c in eager.generate(prompts, max_new_tokens=4)]
        got = [c.token_ids for c in compiled.generate(prompts, max_new_tokens=4)]
        assert got == want, prompts
    a, b = eager.score([[5, 6, 7, 8]])[0], compiled.score([[5, 6, 7, 8]])[0]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    def no_compile(*args, **kwargs):
        raise AssertionError("a second load compiled again")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    t = time.perf_counter()
    again = Engine.load(art, compile="aot", max_seqs=8)
    assert time.perf_counter() - t < 10
    assert [c.token_ids for c in again.generate(PROMPTS[:2], max_new_tokens=4)] == \
        [c.token_ids for c in eager.generate(PROMPTS[:2], max_new_tokens=4)]


def test_package_key_follows_the_program(served_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    from qcompile.runtime.artifact import open_artifact
    art = open_artifact(served_artifact, torch.device("cpu"))
    p = aot.package_path(art, torch.device("cpu"))
    assert p.parent == tmp_path / "aot" and p.suffix == ".pt2"
    art.manifest["files"]["program.pt2"]["sha256"] = "0" * 64
    assert aot.package_path(art, torch.device("cpu")) != p


def test_compile_must_be_known(served_artifact):
    with pytest.raises(ValueError, match="compile must be"):
        Engine.load(served_artifact, compile="fast")


def test_aot_failure_falls_back_to_torch_compile(tiny_artifact, inductor_cache_dir, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir)
    art = tiny_artifact(CFG)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler (simulated)")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.warns(UserWarning, match="AOTInductor failed.*simulated.*torch.compile"):
        engine = Engine.load(art, compile="aot", max_seqs=8)
    assert engine.compiled is True
    want = Engine.load(art, compile=False, max_seqs=8)
    assert [c.token_ids for c in engine.generate(["abc"], max_new_tokens=3)] == \
        [c.token_ids for c in want.generate(["abc"], max_new_tokens=3)]


def test_a_package_that_kills_its_loader_is_refused(tmp_path, monkeypatch):
    """A package whose load dies in the probe's child process (as AOTInductor's loader did on
    an H100, of a segmentation fault) raises here, naming the signal, and leaves no verdict
    file (the next load probes again); Engine.load turns that into torch.compile with a
    warning (test_aot_failure_falls_back_to_torch_compile). A probe that passes leaves one."""
    package = tmp_path / "x.pt2"
    package.write_bytes(b"")
    monkeypatch.setattr(aot, "_PROBE", "import os; os.abort()")
    with pytest.raises(RuntimeError, match="x.pt2 in a test process failed .killed by signal 6"):
        aot.probe(package)
    assert not package.with_suffix(".ok").exists()
    monkeypatch.setattr(aot, "_PROBE", "pass")
    aot.probe(package)
    assert package.with_suffix(".ok").is_file()
