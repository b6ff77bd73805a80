"""Helpers that build hostile artifacts and watch what loading them does.

* `payload(marker)`: a pickle whose unpickling creates the file `marker`.
* `zip_entries(data)` / `write_zip(path, entries)`: read and write archives entry by entry.
* `rehash(art, rel)`: update the manifest's size and sha256 of one file, as an attacker would.
* `OpenSpy`: records every path Python opens (audit hook) and every class pickle looks up.
"""
from __future__ import annotations

import builtins
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

from qcompile.compiler.artifact import MANIFEST, sha256_file


class _Marker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Marker(marker))


def zip_entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_zip(path: Path, entries) -> Path:
    """entries: a dict or a list of (name, bytes) pairs (repeated names allowed)."""
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(path, "w") as z:
        for name, data in items:
            z.writestr(name, data)
    return path


def rehash(art: Path, rel: str) -> None:
    m = json.loads((art / MANIFEST).read_text())
    f = art / rel
    m["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (art / MANIFEST).write_text(json.dumps(m))


class OpenSpy:
    """While active, records the paths of Python-level opens (builtins.open, io.open_code,
    os.open, zipfile, ...) and every pickle.find_class. An audit hook cannot be removed, so
    one hook is installed per session and switched on and off."""
    active: "OpenSpy | None" = None
    installed = False

    def __init__(self):
        self.opened: list[str] = []
        self.unpickled: list[str] = []

    def __enter__(self):
        if not OpenSpy.installed:
            sys.addaudithook(OpenSpy._hook)
            OpenSpy.installed = True
        OpenSpy.active = self
        return self

    def __exit__(self, *exc):
        OpenSpy.active = None
        return False

    @staticmethod
    def _hook(event, args):
        spy = OpenSpy.active
        if spy is None:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
            spy.opened.append(str(args[0]))
        elif event == "pickle.find_class":
            spy.unpickled.append(f"{args[0]}.{args[1]}")
