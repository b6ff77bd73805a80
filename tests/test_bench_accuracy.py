"""bench/accuracy.py on a tiny checkpoint: two rows, both KV formats, a few short sequences.
The table, chart and cache are written, the numbers are finite, and a rerun is all cache."""
from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def bench(bench_module):
    with bench_module("accuracy") as mod:
        yield mod


def test_rows_are_data(bench):
    from qcompile.compiler.config import CompileConfig
    names = [r.name for r in bench.ROWS]
    assert len(names) == len(set(names)) and "FP16" in names and "W4A16 g128 RTN" in names
    pc = [r for r in bench.ROWS if r.table == "ablation W4A8 per-channel KV4"]
    assert [r.name.split(": ")[1] for r in pc][:3] == ["RTN", "+center", "+smooth"]
    assert pc[0].options["kv_key_centering"] == "none" and "kv_key_centering" not in pc[1].options
    assert not any("reorder" in r.name for r in pc)  # reordering only acts on groups
    assert pc[-1].options == bench.qoq("w4a8")  # all steps = the recipe
    assert [r.name.split(": ")[1] for r in pc][-2:] == ["+rotate", "+gptq"]
    for row in bench.ROWS:  # every row either builds a config or says why not
        cfg = bench.config_of(row, "int4")
        assert isinstance(cfg, CompileConfig) or cfg.startswith("not implemented")
        if isinstance(cfg, CompileConfig):
            assert (cfg.dtype, cfg.kernels) == ("float32", "skip")
    for row in bench.MAIN:  # RTN rows stay RTN although the compiler's default is the recipe
        cfg = bench.config_of(row, "int4")
        rtn = "RTN" in row.name or row.name == "FP16"
        assert cfg.quantizer == ("rtn" if rtn else "qoq"), row.name
        assert rtn or cfg.qoq_steps == CompileConfig(precision=cfg.precision).qoq_steps, row.name


def test_runner_on_tiny_checkpoint(bench, make_tiny_checkpoint, tmp_path, capsys):
    model = make_tiny_checkpoint("llama", num_hidden_layers=1)
    argv = ["--model", str(model), "--rows", "^(FP16|W4A16 g128 RTN)$", "--num-seqs", "2",
            "--seq-len", "32", "--out", str(tmp_path), "--stem", "acc", "--sources", "pydoc,package-readmes"]

    assert bench.main(argv) == 0

    results = json.loads((tmp_path / "acc.json").read_text())["results"]
    # 2 rows x 2 KV formats x 2 sources, less pydoc at KV4: its key means calibrate on pydoc
    assert len(results) == 6
    assert {(r["kv"], r["source"]) for r in results.values() if r["row"] == "FP16"} == {
        ("fp16", "pydoc"), ("fp16", "package-readmes"), ("int4", "package-readmes")}
    for r in results.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["tokens"] == 62
        assert r["compile_seconds"] > 0
    table = (tmp_path / "acc.md").read_text()
    lines = {tuple(line.split(" | ")[:2]): line for line in table.splitlines()
             if line.startswith("| ")}  # (| precision, KV)
    fp16 = next(r for r in results.values() if r["row"] == "FP16" and r["kv"] == "fp16"
                and r["source"] == "pydoc")
    assert f"{fp16['perplexity']:.2f} (+0.0%)" in lines["| FP16", "16"]
    assert "| calib |" in lines["| FP16", "4"]  # KV4's key means read pydoc: no pydoc cell
    assert "W4A16 g128 RTN" in table
    assert (tmp_path / "acc.png").stat().st_size > 10_000
    capsys.readouterr()

    assert bench.main(argv) == 0  # everything cached: no compile
    assert capsys.readouterr().out.count("cached") == 4  # one line per row and KV format

    report = [a if a != argv[3] else "^(FP16|W8A8 RTN)$" for a in argv] + ["--report"]
    assert bench.main(report) == 0  # W8A8 RTN is not cached: reported empty, not compiled
    out = capsys.readouterr().out
    assert out.count("cached") == 2 and out.count("not in the cache") == 2
    assert len(json.loads((tmp_path / "acc.json").read_text())["results"]) == 6
