"""pyproject.toml installs the whole source tree: every package folder (one with __init__.py)
is listed with its folder, and every non-Python file a package needs at run time (kernel
templates, the passes' README) is package data. A wheel built from a list that misses a
folder fails only when a user imports it (`qcompile.runtime.ops` once did); .ci/run also
builds the wheel and runs it from a fresh environment."""
import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folders() -> dict[str, str]:
    """import name -> folder, for every folder with __init__.py under the mapped roots."""
    roots = {name: folder for name, folder in SETUPTOOLS["package-dir"].items() if "/" not in folder}
    found = {}
    for name, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found[".".join([name, *rel.parts])] = init.parent.relative_to(ROOT).as_posix()
    return found


def test_every_package_folder_is_listed_with_its_folder():
    found = _package_folders()
    assert "qcompile.runtime.ops" in found
    assert sorted(SETUPTOOLS["packages"]) == sorted(found)
    for name, folder in found.items():
        assert SETUPTOOLS["package-dir"].get(name, folder) == folder, name


def test_every_data_file_is_package_data():
    data = SETUPTOOLS["package-data"]
    missing = []
    for name, folder in _package_folders().items():
        for f in (ROOT / folder).iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc"):
                if not any(fnmatch.fnmatch(f.name, pat) for pat in data.get(name, [])):
                    missing.append(f.relative_to(ROOT).as_posix())
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
    assert {"*.cu", "*.cuh"} <= set(data["qcompile.cutlass_templates"])
