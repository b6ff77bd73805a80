"""Open an artifact and check it before trusting any byte of it: the manifest's schema
(runtime/manifest.py), that the directory holds exactly the files the manifest lists (regular
files, no symbolic links) with their sizes and sha256, and the target against the GPU. The
program is read by runtime/program_archive.py, which never unpickles."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from qcompile.compiler.artifact import MANIFEST, PROGRAM, WEIGHTS, sha256_file
from qcompile.compiler.config import TARGETS, CompileConfig
from qcompile.models.config import ModelConfig

from .manifest import ArtifactError, check_manifest, one_line
from .program_archive import deserialize, read_program_json

MAX_MANIFEST_BYTES = 64 << 20
RECOMPILE = "recompile the artifact with qcompile"


@dataclass
class Artifact:
    path: Path
    manifest: dict
    model: ModelConfig
    compile: CompileConfig

    @property
    def max_seq_len(self) -> int:
        return self.manifest["max_seq_len"]


def open_artifact(path, device: torch.device) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory (make one with `qcompile`)")
    manifest = _read_manifest(path)
    check_manifest(manifest, path / MANIFEST)
    _check_files(path, manifest["files"])
    cfg = CompileConfig.from_json(manifest["compile"])
    check_target(cfg.target, device)
    return Artifact(path, manifest, ModelConfig.from_json(manifest["model"]), cfg)


def _read_manifest(path: Path):
    f = path / MANIFEST
    if f.is_symlink() or not f.is_file():
        raise ArtifactError(f"{path} is not a qcompile artifact: {MANIFEST} is missing (or not "
                            "a regular file)")
    if f.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{f} is over {MAX_MANIFEST_BYTES >> 20} MiB; {RECOMPILE}")
    try:
        return json.loads(f.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise ArtifactError(one_line(f"{f} is corrupt ({e}); {RECOMPILE}")) from None


def _check_files(path: Path, table: dict) -> None:
    """The directory holds exactly the files of the table, each the size and sha256 it says.
    Only files found by walking the directory (never following links) are opened, so a name
    in the table can never make the loader read outside the artifact."""
    present = _regular_files(path)
    for rel in table:
        if rel not in present:
            raise ArtifactError(one_line(f"{path}: {rel} is missing; the artifact is "
                                         f"incomplete, {RECOMPILE}"))
    extra = sorted(set(present) - set(table))
    if extra:
        raise ArtifactError(one_line(f"{path}: {extra[0]} is not listed in {MANIFEST} (every file "
                                     f"the loader may read must be hashed); remove it or "
                                     f"{RECOMPILE}"))
    for rel, meta in table.items():
        size = present[rel].stat(follow_symlinks=False).st_size
        if size != meta["bytes"]:
            raise ArtifactError(one_line(f"{path}: {rel} is truncated or altered ({size} bytes, "
                                         f"manifest says {meta['bytes']}); {RECOMPILE}"))
        if sha256_file(Path(present[rel].path)) != meta["sha256"]:
            raise ArtifactError(one_line(f"{path}: {rel} does not match its sha256 in the "
                                         f"manifest (corrupt or modified); {RECOMPILE}"))


def _regular_files(root: Path) -> dict[str, os.DirEntry]:
    """'/'-joined relative name -> entry of every regular file under root but the manifest;
    a symbolic link or special file anywhere is refused."""
    found, stack = {}, [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                rel = prefix + e.name
                if e.is_symlink() or not (e.is_dir() or e.is_file()):
                    raise ArtifactError(one_line(
                        f"{root}: {rel} is a symbolic link or special file; artifacts hold "
                        f"regular files only, {RECOMPILE}"))
                if e.is_dir():
                    stack.append((Path(e.path), rel + "/"))
                elif rel != MANIFEST:
                    found[rel] = e
    return found


def check_target(target: str, device: torch.device) -> None:
    """CPU runs the reference ops and serves any target; a GPU must be the target's arch."""
    if device.type != "cuda":
        return
    have = torch.cuda.get_device_capability(device)
    want = TARGETS[target]
    if have[0] != want[0]:
        name = torch.cuda.get_device_name(device)
        raise ArtifactError(
            f"artifact built for {target} but this GPU is {name} (sm{have[0]}{have[1]}): "
            f"recompile with --target sm{have[0]}0")


def load_program(path: Path) -> torch.export.ExportedProgram:
    """The artifact's program, read without unpickling (runtime/program_archive.py). Any
    failure, torch's own included, is one ArtifactError line: the file is untrusted input."""
    f = Path(path) / PROGRAM
    try:
        return deserialize(read_program_json(f))
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, json, torch serde: all untrusted input)
        raise ArtifactError(one_line(f"{f} is not a program qcompile wrote "
                                     f"({type(e).__name__}: {e}); {RECOMPILE}")) from None


def load_weights(art: Artifact, device: torch.device) -> list[torch.Tensor]:
    """The program's weight inputs, in call order."""
    f = art.path / WEIGHTS
    try:
        tensors = safetensors.torch.load_file(f, device=str(device))
    except safetensors.SafetensorError as e:
        raise ArtifactError(one_line(f"{f} is not a valid safetensors file ({e}); "
                                     f"{RECOMPILE}")) from None
    names = art.manifest["program"]["weights"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ArtifactError(one_line(f"{art.path}: weights missing from {WEIGHTS}: "
                                     f"{missing[:5]}; {RECOMPILE}"))
    return [tensors[n] for n in names]
