"""The artifact: a directory written atomically, loadable without executing pickled code.

```
manifest.json        format version, model config, CompileConfig, target, KV spec, program
                     signature, kernel table, passes run, sha256 and size of every file
weights.safetensors  every tensor the program reads (packed weights, scales, norms, ...)
program.pt2          torch.export.save of the lowered program; weights are its inputs, so it
                     holds the graph only (read on load without unpickling:
                     runtime/program_archive.py)
kernels/<target>/kernels.json   GEMM kernels the graph uses (cubins beside it)
tokenizer/           tokenizer files
```
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """relative path -> {sha256, bytes} for every file under root but the manifest."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p),
                                                     "bytes": p.stat().st_size}
    return table


class AtomicDir:
    """Write into a hidden sibling temp dir `.NAME.tmp-PID-XXXXXXXX`; on success swap it in with
    renames, on any failure (including Ctrl-C) delete it. The destination is never
    half-written, and it is replaced only if check_output allows it (checked again at the
    swap: the compile may take minutes). Temp dirs of writers that were killed (their PID is
    gone) are removed on entry."""

    def __init__(self, dest: Path, force: bool = False):
        self.dest = Path(dest).expanduser().absolute()
        self.force = force
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        check_output(self.dest, self.force)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.dest)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                check_output(self.dest, self.force)
                _fsync_tree(self.tmp)
                self._swap()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # already gone after a swap
        return False

    def _swap(self) -> None:
        old = None
        if self.dest.exists() or self.dest.is_symlink():
            old = self.dest.parent / f".{self.dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        if old is not None:
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_TEMP_NAME = r"\.{name}\.(?:tmp|old)-(?:(?P<pid>\d{{1,10}})-)?[0-9a-f]{{8}}"


def remove_stale_temps(dest: Path) -> list[Path]:
    """Delete the temp and old dirs AtomicDir left beside `dest` when its process was killed
    (SIGKILL, OOM, power loss): names carrying a PID that no longer runs, and names of
    qcompile versions that did not record one. Returns what was removed."""
    pattern = re.compile(_TEMP_NAME.format(name=re.escape(dest.name)))
    removed = []
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):
        m = pattern.fullmatch(p.name)
        if m and not p.is_symlink() and p.is_dir() and not _alive(m.group("pid")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: str | None) -> bool:
    """Whether the writer with this PID may still run (None: a name without a PID)."""
    if pid is None or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process; anything else: leave it alone
        return True
    return True


class OutputRefused(ValueError):
    """`-o` names something qcompile must not replace, or cannot write."""


def check_output(dest: Path, force: bool = False, protect=()) -> None:
    """Refuse, before any work, an output path that is neither absent, an empty directory nor
    a previous qcompile artifact (with `force`: anything but a folder holding the current
    directory or a path in `protect`, e.g. the checkpoint), or whose folder is not writable."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() or dest.is_symlink():
        what = _replaceable(dest)
        if what and not force:
            raise OutputRefused(f"refusing to replace {dest}: it is {what}, not a qcompile "
                                "artifact; choose a new -o path (or pass --force to replace it)")
        for keep in (Path.cwd(), *map(Path, protect)):
            if dest.is_dir() and not dest.is_symlink() and keep.resolve().is_relative_to(
                    dest.resolve()):
                raise OutputRefused(f"refusing to replace {dest}: it holds {keep}")
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputRefused(f"cannot write the artifact {dest}: {folder} is not a writable "
                            "directory; choose another -o path")


def _replaceable(dest: Path) -> str:
    """'' if dest may be replaced (empty directory, or a qcompile artifact and nothing else),
    else what it is, for the message."""
    if dest.is_symlink() or not dest.is_dir():
        return "a symbolic link" if dest.is_symlink() else "a file"
    names = {p.relative_to(dest).as_posix() for p in dest.rglob("*")
             if p.is_symlink() or not p.is_dir()}
    if not names:
        return ""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
        listed = set(manifest["files"]) | {MANIFEST}
        ok = isinstance(manifest["format_version"], int) and {"compile", "program"} <= set(manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return "a directory that is not empty"
    if not ok or not names <= listed:
        return "a directory with files a qcompile artifact does not have"
    return ""


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
