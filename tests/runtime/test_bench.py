"""qbench on CPU: a tiny artifact and HF eager beside it, every request exactly --output-len
tokens, the JSON, table and plot written; bad arguments are one-line errors before the load."""
from __future__ import annotations

import json

import pytest

from qcompile.runtime import bench


def test_percentiles_nearest_rank():
    p = bench.percentiles([float(x) for x in range(1, 101)])
    assert (p["p50"], p["p99"], p["mean"]) == (50.0, 99.0, 50.5)
    assert bench.percentiles([]) == {}


def test_synthetic_prompts_are_seeded_and_in_vocab():
    a = bench.synthetic_prompts(3, 7, 50, seed=1)
    assert a == bench.synthetic_prompts(3, 7, 50, seed=1) != bench.synthetic_prompts(3, 7, 50)
    assert [len(x) for x in a] == [7, 7, 7] and all(0 <= t < 50 for x in a for t in x)


def test_qbench_beside_hf_eager(served_artifact, tmp_path, capsys):
    rc = bench.main([str(served_artifact), "--device", "cpu", "--input-len", "12",
                     "--output-len", "5", "--num-prompts", "3", "--max-seqs", "2",
                     "--peer", "hf-eager", "--out", str(tmp_path), "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| qcompile fp16 kv fp16 |" in out and "| hf eager |" in out
    data = json.loads((tmp_path / f"qbench-{served_artifact.name}.json").read_text())
    ours, hf = data["results"]
    for r in (ours, hf):
        # exactly num_prompts x output_len tokens in the measured wall time
        assert r["output_tok_s"] * r["wall_s"] == pytest.approx(15, rel=1e-6)
        assert r["ttft_ms"]["p50"] > 0 and r["tpot_ms"]["p50"] >= 0  # HF: probe noise on CPU
    assert ours["tpot_ms"]["p50"] > 0
    assert ours["batch"] == 2 and ours["kv_capacity_tokens"] > 0
    assert ours["step_ms"]["p50"] > 0 and 1 <= ours["step_ms"]["batch"] <= 2
    # the prompts' steps: their time, and the prompt tokens over it
    assert ours["prefill_ms"]["p50"] > 0 and ours["prefill_tok_s"] > 0
    assert hf["prefill_ms"] == {} and hf["prefill_tok_s"] is None
    assert (tmp_path / f"qbench-{served_artifact.name}.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, msg", [
    (["--input-len", "0"], "--input-len must be at least 1"),
    (["--input-len", "100000"], "exceeds the artifact's"),
    (["--input-len", "8", "--peer", "hf-eager", "--hf", "/nonexistent"], "no config.json"),
])
def test_qbench_bad_arguments(served_artifact, tmp_path, capsys, argv, msg):
    rc = bench.main([str(served_artifact), "--device", "cpu", "--out", str(tmp_path), "-q",
                     *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_qbench_static_peer_and_a_failing_peer(served_artifact, tmp_path, capsys, monkeypatch):
    """HF's static-cache peer runs (on the CPU without its compile); a peer that fails is left
    out with a one-line message, and our row is still measured and written."""
    rc = bench.main([str(served_artifact), "--device", "cpu", "--input-len", "12",
                     "--output-len", "4", "--num-prompts", "2", "--max-seqs", "2",
                     "--peer", "hf-static", "--out", str(tmp_path), "-q"])
    assert rc == 0 and "| hf static+compile |" in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
    monkeypatch.setattr(bench, "bench_hf", broken)
    rc = bench.main([str(served_artifact), "--device", "cpu", "--input-len", "12",
                     "--output-len", "4", "--num-prompts", "2", "--max-seqs", "2",
                     "--peer", "hf", "--out", str(tmp_path), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0 and "| qcompile fp16 kv fp16 |" in out and "| hf" not in out
    assert err.count("qbench: peer") == 2 and "CUDAGraphs" in err
    data = json.loads((tmp_path / f"qbench-{served_artifact.name}.json").read_text())
    assert [r["name"] for r in data["results"]] == ["qcompile fp16 kv fp16"]
