"""`-o` never destroys a user's files: it writes only to a new path, an empty directory or a
previous artifact (replaced atomically), checks the location before any work, and removes
the temp dirs of writers that were killed."""
import json
import os
import signal
import subprocess
import sys

import pytest

import qcompile.compiler.compile as compile_mod
from qcompile.compiler.artifact import MANIFEST, AtomicDir, OutputRefused, check_output
from qcompile.compiler.cli import main
from qcompile.compiler.config import CompileConfig

CFG = CompileConfig(precision="fp16", kv="fp16", dtype="float32", kernels="skip")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the checkpoint is loaded: the output must be refused before that."""
    def load(*a, **k):
        raise AssertionError("the checkpoint was loaded before the output path was checked")
    monkeypatch.setattr(compile_mod, "load_checkpoint", load)


def _user_tree(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("mine")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


def _fake_artifact(root, extra=()):
    root.mkdir()
    (root / "weights.safetensors").write_bytes(b"w")
    files = {"weights.safetensors": {"sha256": "0" * 64, "bytes": 1}}
    (root / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files,
                                             "compile": {}, "program": {}}))
    for name in extra:
        (root / name).write_text("user file")


@pytest.mark.parametrize("kind", ["file", "directory", "cwd"])
def test_output_holding_user_files_is_refused_before_loading(tmp_path, monkeypatch, no_load,
                                                           kind):
    if kind == "file":
        out = tmp_path / "report.txt"
        out.write_text("keep me")
        before = out.read_bytes()
    else:
        out = tmp_path / "project"
        before = _user_tree(out)
        if kind == "cwd":
            monkeypatch.chdir(out)
            out = compile_mod.Path(".")
    with pytest.raises(OutputRefused, match="refusing to replace .*--force") as err:
        compile_mod.compile_model(tmp_path / "model", CFG, out, progress=False)
    assert "\n" not in str(err.value)
    after = out.read_bytes() if kind == "file" else _tree(out)
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [("report.txt" if kind == "file"
                                                           else "project")]


def test_artifact_with_user_files_in_it_is_refused(tmp_path):
    _fake_artifact(tmp_path / "art", extra=["my-notes.md"])
    with pytest.raises(OutputRefused, match="files a qcompile artifact does not have"):
        check_output(tmp_path / "art")
    _fake_artifact(tmp_path / "clean")
    check_output(tmp_path / "clean")  # a previous artifact may be replaced
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "data").symlink_to(tmp_path / "clean")  # a folder of only a link
    with pytest.raises(OutputRefused, match="not empty"):
        check_output(tmp_path / "links")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text('{"manifest_version": 3}')  # not ours
    with pytest.raises(OutputRefused, match="not empty"):
        check_output(tmp_path / "other")


def test_unwritable_location_is_refused_before_loading(tmp_path, no_load):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputRefused, match="not a writable directory"):
        compile_mod.compile_model(tmp_path / "model", CFG, tmp_path / "a-file" / "sub" / "art",
                                  progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputRefused, match="not a writable directory"):
            check_output(ro / "art")
    finally:
        ro.chmod(0o755)


def test_force_replaces_but_never_a_folder_holding_cwd_or_source(tmp_path, monkeypatch):
    out = tmp_path / "project"
    _user_tree(out)
    check_output(out, force=True)
    with pytest.raises(OutputRefused, match="it holds"):
        check_output(out, force=True, protect=[out / "src" / "main.py"])
    monkeypatch.chdir(out / "src")
    with pytest.raises(OutputRefused, match="it holds"):
        check_output(out, force=True)


def test_force_replaces_a_file(tmp_path):
    out = tmp_path / "art"
    out.write_text("old")
    with AtomicDir(out, force=True) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_swap_rechecks_the_destination(tmp_path):
    """The compile takes minutes: a user file that appears meanwhile is not replaced."""
    out = tmp_path / "art"
    with pytest.raises(OutputRefused):
        with AtomicDir(out) as tmp:
            (tmp / "x").write_text("new")
            out.write_text("appeared while compiling")
    assert out.read_text() == "appeared while compiling"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_killed_writer_temp_dir_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "art"
    code = ("import sys, time; from qcompile.compiler.artifact import AtomicDir\n"
            f"with AtomicDir({str(out)!r}) as t:\n"
            "    (t / 'weights').write_bytes(b'0' * 4096); print(t, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    left = tmp_path / os.path.basename(proc.stdout.readline().strip())
    assert left.is_dir() and f".tmp-{proc.pid}-" in left.name
    live = tmp_path / f".art.tmp-{os.getpid()}-0123abcd"  # a writer that still runs
    live.mkdir()
    legacy = tmp_path / ".art.tmp-89abcdef"  # qcompile before PIDs were recorded
    legacy.mkdir()
    unrelated = tmp_path / ".art.tmp-notes"
    unrelated.mkdir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with AtomicDir(out) as tmp:
        (tmp / "x").write_text("new")
    assert not left.exists() and not legacy.exists()
    assert live.is_dir() and unrelated.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["art", live.name, unrelated.name])


def test_cli_refuses_in_one_line_and_force_overrides(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data.bin"
    out.write_bytes(b"precious")
    assert main([str(tmp_path / "model"), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qcompile: error: refusing to replace") and "\n" not in err
    assert out.read_bytes() == b"precious"
    seen = {}
    monkeypatch.setattr(compile_mod, "compile_model",
                        lambda *a, **k: seen.update(k))
    assert main([str(tmp_path / "model"), "-o", str(out), "-q", "--force"]) == 0
    assert seen["force"] is True


def test_compile_into_empty_dir_then_over_previous_artifact(make_tiny_checkpoint, tmp_path):
    ckpt, out = make_tiny_checkpoint("llama"), tmp_path / "art"
    out.mkdir()
    compile_mod.compile_model(ckpt, CFG, out, progress=False)
    first = json.loads((out / MANIFEST).read_text())
    cfg = CompileConfig(**{**CFG.to_json(), "max_seq_len": 128})
    compile_mod.compile_model(ckpt, cfg, out, progress=False)  # replaces the previous artifact
    assert json.loads((out / MANIFEST).read_text())["max_seq_len"] == 128 != first["max_seq_len"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
