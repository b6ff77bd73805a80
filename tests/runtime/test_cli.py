"""qrun, qeval and qcompile from the command line: every error is one line on stderr that says
what to do, with no traceback (a CUDA request on a CPU-only torch or a machine without a GPU,
an unknown device, a missing artifact, bad sampling values, a bad text file, a bug); qeval
scores any UTF-8 text and prints JSON for scripts; qrun streams the text generate() returns;
--no-cuda-graphs reaches Engine.load."""
import json

import pytest
import torch

from qcompile.compiler import cli as qcompile_cli
from qcompile.compiler.config import CompileConfig
from qcompile.runtime.cli import eval_main, run_main
from qcompile.runtime.device import DeviceError, parse_device
from qcompile.runtime.engine import Engine
from qcompile.runtime.eval import pydoc_text


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact(CompileConfig(precision="fp16", kv="fp16", dtype="float32",
                                       kernels="skip"))


def _one_line_error(capsys, prog: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ---- devices ---------------------------------------------------------------------------

def test_device_strings():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0': use cpu or cuda"):
        parse_device("gpu0")
    with pytest.raises(DeviceError, match="not supported: qcompile runs on cpu or cuda"):
        parse_device("meta")


def test_cuda_on_a_cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="CPU-only: install a CUDA build .* or use --device cpu"):
        parse_device("cuda")


def test_cuda_without_a_gpu_and_past_the_last_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU is visible.*nvidia-smi"):
        parse_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="has 1 GPU"):
        parse_device("cuda:3")
    assert parse_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("main,prog", [(run_main, "qrun"), (eval_main, "qeval")])
def test_cuda_request_is_one_line(artifact, capsys, monkeypatch, main, prog):
    monkeypatch.setattr(torch.version, "cuda", None)  # as a CPU build of torch, on any machine
    argv = [str(artifact), "--device", "cuda"] + (["-p", "hi"] if prog == "qrun" else [])
    assert main(argv) == 2
    _one_line_error(capsys, prog, "CUDA build", "--device cpu")


# ---- qrun ------------------------------------------------------------------------------

def test_missing_artifact(tmp_path, capsys):
    assert run_main([str(tmp_path / "nope"), "-p", "hi"]) == 2
    _one_line_error(capsys, "qrun", "no such artifact directory", "qcompile")


@pytest.mark.parametrize("flags,says", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "-2"], "top_k must be an integer >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_bad_sampling_values_before_loading(tmp_path, capsys, flags, says):
    assert run_main([str(tmp_path / "not-loaded"), "-p", "hi", *flags]) == 2
    _one_line_error(capsys, "qrun", says)


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_main(["art", "--temperature", "warm", "-p", "x"])
    assert e.value.code == 2
    _one_line_error(capsys, "qrun", "invalid float value: 'warm'", "qrun --help")


def test_stream_prints_the_generated_text(artifact, capsys):
    want = Engine.load(artifact).generate(["import os"], max_new_tokens=8)[0].text
    assert run_main([str(artifact), "-p", "import os", "--max-new-tokens", "8", "--raw"]) == 0
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.parametrize("flags,want", [([], None), (["--no-cuda-graphs"], False)])
def test_cuda_graphs_flag_reaches_the_engine(artifact, capsys, monkeypatch, flags, want):
    """On cuda the engine captures decode graphs unless --no-cuda-graphs (a CUDA device is
    faked: the spy loads the artifact on the CPU)."""
    import qcompile.runtime.cli as cli
    seen = []
    load = Engine.load.__func__

    def spy(cls, path, device, **kw):
        seen.append((device, kw["cuda_graphs"]))
        return load(cls, path, "cpu")
    monkeypatch.setattr(cli, "parse_device", lambda text: torch.device("cuda"))
    monkeypatch.setattr(Engine, "load", classmethod(spy))
    assert run_main([str(artifact), "-p", "hi", "--max-new-tokens", "2", "--device", "cuda",
                     *flags]) == 0
    assert seen == [(torch.device("cuda"), want)]
    assert eval_main([str(artifact), "--seqs", "1", "--seq-len", "8", "--json",
                      "--device", "cuda"]) == 0
    assert seen[1] == (torch.device("cuda"), False)  # qeval only scores: no graphs


# ---- qeval -----------------------------------------------------------------------------

def _qeval_json(capsys, argv) -> dict:
    assert eval_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_file_scores_as_the_same_text_by_default(artifact, tmp_path, capsys):
    """The pydoc text written to a file scores exactly as the default set does."""
    f = tmp_path / "pydoc.txt"
    f.write_text(pydoc_text(), encoding="utf-8")
    small = ["--seqs", "2", "--seq-len", "64"]
    default = _qeval_json(capsys, [str(artifact), *small])
    mine = _qeval_json(capsys, [str(artifact), *small, "--text", str(f)])
    assert default["text"] == "pydoc_data.topics" and mine["text"] == str(f)
    assert mine["perplexity"] == default["perplexity"] > 1
    assert mine["tokens"] == 2 * 63 and mine["sequences"] == 2 and mine["precision"] == "fp16"


def test_short_text_uses_the_windows_it_has(artifact, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 12, encoding="utf-8")
    r = _qeval_json(capsys, [str(artifact), "--text", str(f), "--seq-len", "64"])
    assert 1 <= r["sequences"] < 24 and r["tokens"] == r["sequences"] * 63


@pytest.mark.parametrize("content,says", [
    (b"caf\xe9 latin-1", "is not UTF-8 (byte 3)"),
    ("tiny".encode(), "fewer than one window of 512"),
    (b"  \n", "is empty"),
])
def test_bad_text_files(artifact, tmp_path, capsys, content, says):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    assert eval_main([str(artifact), "--text", str(f)]) == 2
    _one_line_error(capsys, "qeval", says)


def test_missing_text_file(artifact, tmp_path, capsys):
    assert eval_main([str(artifact), "--text", str(tmp_path / "nope.txt")]) == 2
    _one_line_error(capsys, "qeval", "no such file")


# ---- qcompile --------------------------------------------------------------------------

def test_qcompile_bug_is_one_line(make_tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import qcompile.compiler.compile as compile_mod

    def bug(*a, **k):
        raise TypeError("unsupported operand")
    monkeypatch.setattr(compile_mod, "compile_model", bug)
    ckpt = make_tiny_checkpoint("llama")
    capsys.readouterr()
    assert qcompile_cli.main([str(ckpt), "-o", str(tmp_path / "o")]) == 1
    _one_line_error(capsys, "qcompile", "internal error: TypeError", "QCOMPILE_TRACEBACK=1")


def test_qcompile_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit):
        qcompile_cli.main(["x.gguf", "--precision", "w3a3"])
    _one_line_error(capsys, "qcompile", "invalid choice", "qcompile --help")
