"""Open an artifact and check it before trusting any byte of it: format version, every
file's size and sha256, the target against the GPU, and that program.pt2 holds only the
graph (torch.export.load unpickles tensor payloads; ours has none, so any is refused)."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from qcompile.compiler.artifact import FORMAT_VERSION, MANIFEST, PROGRAM, WEIGHTS, sha256_file
from qcompile.compiler.config import TARGETS, CompileConfig
from qcompile.models.config import ModelConfig


class ArtifactError(RuntimeError):
    """An artifact that cannot be served, with what is wrong and what to do."""


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
    _check_files(path, manifest)
    cfg = CompileConfig.from_json(manifest["compile"])
    check_target(cfg.target, device)
    return Artifact(path, manifest, ModelConfig.from_json(manifest["model"]), cfg)


def _read_manifest(path: Path) -> dict:
    f = path / MANIFEST
    if not f.is_file():
        raise ArtifactError(f"{path} is not a qcompile artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{f} is corrupt ({e}); recompile the model with qcompile") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format version {version}, this qcompile reads "
                            f"version {FORMAT_VERSION}: recompile it with this qcompile")
    return manifest


def _check_files(path: Path, manifest: dict) -> None:
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{path}: {rel} is missing; the artifact is incomplete, "
                                "recompile it")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactError(f"{path}: {rel} is truncated or altered ({size} bytes, manifest "
                                f"says {meta['bytes']}); recompile the artifact")
        if sha256_file(f) != meta["sha256"]:
            raise ArtifactError(f"{path}: {rel} does not match its sha256 in the manifest "
                                "(corrupt or modified); recompile the artifact")


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


def _payload_free(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """True for archive entries that cannot carry a pickled tensor: everything outside
    data/, empty files, and weight/constant configs that list nothing."""
    name = info.filename.split("/", 1)[-1]
    if not name.startswith("data/") or info.file_size == 0:
        return True
    if name.endswith("_config.json"):
        try:
            return json.loads(z.read(info)).get("config") == {}
        except (json.JSONDecodeError, AttributeError):
            return False
    return False


def load_program(path: Path) -> torch.export.ExportedProgram:
    f = path / PROGRAM
    try:
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if not _payload_free(z, info):
                    raise ArtifactError(f"{f} carries a tensor payload ({info.filename}); qcompile "
                                        "programs hold the graph only, refusing to unpickle it")
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{f} is not a valid program archive ({e}); recompile") from e
    return torch.export.load(f)


def load_weights(art: Artifact, device: torch.device) -> list[torch.Tensor]:
    """The program's weight inputs, in call order."""
    tensors = safetensors.torch.load_file(art.path / WEIGHTS, device=str(device))
    names = art.manifest["program"]["weights"]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ArtifactError(f"{art.path}: weights missing from {WEIGHTS}: {missing[:5]}")
    return [tensors[n] for n in names]
