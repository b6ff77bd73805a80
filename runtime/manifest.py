"""The schema of an artifact's manifest.json, checked before any other file is opened.

A manifest is untrusted input: every key the loader uses is required, typed and
range-checked, enums are checked against the compiler's tables, the parts that describe one
thing (kv format, block size, layers, target) must agree, and the file table must list every
file the loader opens, each under a plain relative name (no absolute path, no `..`), with its
size and sha256. Any violation is one `ArtifactError` line naming the manifest and the field.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from qcompile.compiler.artifact import FORMAT_VERSION, PROGRAM, WEIGHTS
from qcompile.compiler.capture import INPUT_NAMES
from qcompile.compiler.config import (KV_BLOCK_SIZES, KV_FORMATS, MAX_SEQ_LEN, MIN_SEQ_LEN,
                                      TARGETS, CompileConfig)
from qcompile.models.config import ModelConfig, RopeScaling


class ArtifactError(RuntimeError):
    """An artifact that cannot be served, with what is wrong and what to do."""


REQUIRED = ("format_version", "files", "model", "compile", "target", "max_seq_len", "kv",
            "program", "kernels")
INFORMATIONAL = ("qcompile_version", "torch_version", "source", "passes", "qoq",
                 "compile_seconds")  # written for people; the loader never reads them
MAX_FILES = 100_000
MAX_INT = (1 << 31) - 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """(field, problem) of the first violation; check_manifest makes it an ArtifactError."""


def check_manifest(manifest, where: Path) -> None:
    """Raise ArtifactError, naming `where` and the field, unless `manifest` is well-formed."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} must hold a JSON object, not {type(manifest).__name__}: "
                            "it is damaged or not a qcompile manifest; recompile the model")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(one_line(f"{where} has artifact format version {version!r:.40}, "
                                     f"this qcompile reads version {FORMAT_VERSION}: recompile "
                                     "the model with this qcompile"))
    try:
        _check(manifest)
    except _Bad as e:
        field, problem = e.args
        raise ArtifactError(one_line(f"{where}: field '{field}' {problem}; the manifest is "
                                     "damaged or not from this qcompile: recompile the "
                                     "model")) from None


def one_line(text: str, limit: int = 1000) -> str:
    """`text` as one printable line (errors quote untrusted names and torch's messages)."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check(m) -> None:
    _keys(m, "", REQUIRED, INFORMATIONAL)
    model = _dataclass(ModelConfig, m["model"], "model")
    cfg = _dataclass(CompileConfig, m["compile"], "compile")
    _enum(m["target"], "target", tuple(TARGETS))
    if m["target"] != cfg.target:
        raise _Bad("target", f"is {m['target']!r} but compile.target is {cfg.target!r}")
    _int(m["max_seq_len"], "max_seq_len", MIN_SEQ_LEN, MAX_SEQ_LEN)
    _check_kv(m["kv"], model, cfg)
    _check_program(m["program"])
    kernels = _list(m["kernels"], "kernels", str)
    _check_files(m["files"], [WEIGHTS, PROGRAM]
                 + ([f"kernels/{cfg.target}/kernels.json"] if kernels else []))


def _keys(d, name: str, required, optional=()) -> None:
    prefix = f"{name}." if name else ""
    if not isinstance(d, dict):
        raise _Bad(name, f"must be a JSON object, got {type(d).__name__}")
    for k in required:
        if k not in d:
            raise _Bad(prefix + k, "is missing")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise _Bad(prefix + unknown[0][:60], "is not a field qcompile writes")


def _int(v, field: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(field, f"must be an integer from {lo} to {hi}, got {v!r:.40}")
    return v


def _enum(v, field: str, choices) -> None:
    if not isinstance(v, str) or v not in choices:
        raise _Bad(field, f"must be one of {', '.join(choices)}, got {v!r:.40}")


def _list(v, field: str, kind, limit: int = MAX_FILES) -> list:
    if not isinstance(v, list) or len(v) > limit or not all(type(x) is kind for x in v):
        raise _Bad(field, f"must be a list of {kind.__name__} (at most {limit})")
    return v


# dataclass field type (as annotated) -> check of a JSON value for it
_FIELD_TYPES = {
    "int": lambda v: type(v) is int and 0 <= v <= MAX_INT,
    "int | None": lambda v: v is None or (type(v) is int and 0 <= v <= MAX_INT),
    "float": lambda v: type(v) in (int, float) and math.isfinite(v),
    "float | None": lambda v: v is None or (type(v) in (int, float) and math.isfinite(v)),
    "bool": lambda v: type(v) is bool,
    "str": lambda v: isinstance(v, str) and len(v) <= 4096,
    "str | None": lambda v: v is None or (isinstance(v, str) and len(v) <= 4096),
    "tuple[int, ...]": lambda v: (isinstance(v, list) and len(v) <= 64
                                  and all(type(x) is int and 0 <= x <= MAX_INT for x in v)),
    "RopeScaling | None": lambda v: v is None or _is_rope(v),
}


def _is_rope(v) -> bool:
    names = [f.name for f in dataclasses.fields(RopeScaling)]
    return (isinstance(v, dict) and set(v) == set(names)
            and all(type(v[n]) in (int, float) and math.isfinite(v[n]) and v[n] > 0
                    for n in names))


def _dataclass(cls, d, name: str):
    """Check a config's JSON against the dataclass's own field types, then build it (its
    __post_init__ checks choices and ranges)."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    legacy = getattr(cls, "LEGACY_FIELDS", {})  # older artifacts' options, which from_json maps
    _keys(d, name, required, [f.name for f in fields] + list(legacy))
    for f in fields:
        if f.name in d and not _FIELD_TYPES[f.type](d[f.name]):
            raise _Bad(f"{name}.{f.name}", f"must be a {f.type}, got {d[f.name]!r:.40}")
    for key, kind in legacy.items():
        if key in d and not _FIELD_TYPES[kind](d[key]):
            raise _Bad(f"{name}.{key}", f"must be a {kind}, got {d[key]!r:.40}")
    try:
        return cls.from_json(d)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise _Bad(name, f"is invalid ({str(e).splitlines()[0][:200]})") from None


def _check_kv(kv, model: ModelConfig, cfg: CompileConfig) -> None:
    from qcompile.runtime.ops import kv_record_bytes
    _keys(kv, "kv", ("format", "num_layers", "block_size", "record_bytes"), ("key_centering",))
    _enum(kv["format"], "kv.format", KV_FORMATS)
    if type(kv["block_size"]) is not int or kv["block_size"] not in KV_BLOCK_SIZES:
        raise _Bad("kv.block_size", f"must be one of {KV_BLOCK_SIZES}, got "
                   f"{kv['block_size']!r:.40}")
    want = {"format": cfg.kv, "block_size": cfg.kv_block_size, "num_layers": model.num_layers,
            "record_bytes": kv_record_bytes(cfg.kv, model.num_kv_heads, model.head_dim,
                                            cfg.torch_dtype),
            "key_centering": cfg.centers_keys}
    for k, v in want.items():
        if k in kv and (type(kv[k]) is not type(v) or kv[k] != v):
            raise _Bad(f"kv.{k}", f"is {kv[k]!r:.40} but the model and compile config give "
                       f"{v!r}")


def _check_program(p) -> None:
    _keys(p, "program", ("weights", "inputs", "outputs"))
    weights = _list(p["weights"], "program.weights", str)
    if len(set(weights)) != len(weights):
        raise _Bad("program.weights", "names a weight twice")
    if p["inputs"] != list(INPUT_NAMES):
        raise _Bad("program.inputs", f"must be {list(INPUT_NAMES)}")
    _list(p["outputs"], "program.outputs", str, 16)


def _check_files(files, required: list[str]) -> None:
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
        raise _Bad("files", f"must be a non-empty JSON object of at most {MAX_FILES} files")
    for rel, meta in files.items():
        field = f"files[{rel!r:.80}]"
        check_relative_name(rel, field)
        _keys(meta, field, ("sha256", "bytes"))
        if not isinstance(meta["sha256"], str) or not _SHA256.fullmatch(meta["sha256"]):
            raise _Bad(f"{field}.sha256", "must be 64 lowercase hex digits")
        _int(meta["bytes"], f"{field}.bytes", 0, 1 << 50)
    for rel in required:
        if rel not in files:
            raise _Bad("files", f"does not list {rel}, which the loader reads")
    if not any(rel.startswith("tokenizer/") for rel in files):
        raise _Bad("files", "lists no tokenizer/ file, which the loader reads")


def check_relative_name(rel, field: str) -> None:
    """A name inside the artifact: relative, '/'-separated, no '', '.' or '..' component."""
    if not isinstance(rel, str) or not 0 < len(rel) <= 1024 or "\\" in rel or "\0" in rel:
        raise _Bad(field, "must be a relative path of at most 1024 characters")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        raise _Bad(field, "must stay inside the artifact (no absolute path, no '..')")
    if rel == "manifest.json":
        raise _Bad(field, "cannot hash the manifest itself")
