"""The artifact: a directory written atomically, loadable without executing pickled code.

```
manifest.json        format version, model config, CompileConfig, target, KV spec, program
                     signature, kernel table, passes run, sha256 and size of every file
weights.safetensors  every tensor the program reads (packed weights, scales, norms, ...)
program.pt2          torch.export.save of the lowered program; weights are its inputs, so it
                     holds the graph only (checked on load: no pickled payload)
kernels/<target>/kernels.json   GEMM kernels the graph uses (cubins beside it)
tokenizer/           tokenizer files
```
"""
from __future__ import annotations

import hashlib
import json
import os
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
    """Write into a hidden sibling temp dir; on success swap it in with renames, on any
    failure (including Ctrl-C) delete it. The destination is never half-written."""

    def __init__(self, dest: Path):
        self.dest = Path(dest).resolve()
        self.tmp = self.dest.parent / f".{self.dest.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _fsync_tree(self.tmp)
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
