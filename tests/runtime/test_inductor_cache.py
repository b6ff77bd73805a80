"""Engine.load(compile=True) keeps Inductor's caches under qcompile's cache folder (a warm
load finds its compiled glue after a reboot), unless the user set TORCHINDUCTOR_CACHE_DIR."""
from qcompile.runtime.engine import Engine


def test_inductor_cache_under_qcompile_cache(served_artifact, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    Engine.load(served_artifact, compile=True)  # torch.compile is lazy: nothing compiles yet
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    Engine.load(served_artifact, compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
