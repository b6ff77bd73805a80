"""Read an artifact's program.pt2 without unpickling anything and without running code from it.

torch.export.load is unsafe on untrusted files: a payload config with `use_pickle`, a
legacy `data/weights/model.pt` or `data/constants/model.pt`, non-empty sample inputs, and the
pre-2.8 layout (top-level `version`, `serialized_*.pt`) all reach `torch.load(weights_only=
False)`; and the program JSON itself is evaluated: every `expr_str` goes through
`sympy.sympify` (Python `eval`) and `guards_code` is `exec`-ed by `ExportedProgram.module()`.

So this module never hands the file to torch. It reads the zip with `zipfile`, accepts only
the entries qcompile writes (the graph-only pt2 layout below, whatever folder a hostile entry
is put in), checks the strings torch would evaluate against a small grammar, deserializes the
JSON program with torch's serde functions (weights, constants and example inputs supplied as
empty Python objects, so no payload is ever read), and checks that the graph calls only aten
and qcompile operators, none of which touch files.

The layout torch.export.save (2.11 to 2.13) writes for qcompile's programs, under one top-level
folder: archive_format ("pt2"), archive_version ("0"), models/model.json (the graph), empty
weight and constant configs, an empty sample-inputs record, and the zip writer's bookkeeping
(byteorder, .data/version, .data/serialization_id).
"""
from __future__ import annotations

import contextlib
import json
import operator
import re
import typing
import zipfile
from pathlib import Path

import torch

MODEL_JSON = "models/model.json"
EMPTY_CONFIG = {"config": {}}
# entry (below the top-level folder) -> check of its bytes; entries marked required must exist
ENTRIES = {
    "archive_format": lambda b: b == b"pt2",
    "archive_version": lambda b: b == b"0",
    MODEL_JSON: None,  # parsed, then checked by deserialize()
    "data/weights/model_weights_config.json": lambda b: _json(b) == EMPTY_CONFIG,
    "data/constants/model_constants_config.json": lambda b: _json(b) == EMPTY_CONFIG,
    "data/sample_inputs/model.pt": lambda b: b == b"",
    "byteorder": lambda b: b in (b"little", b"big"),
    ".data/version": lambda b: re.fullmatch(rb"\d{1,3}\n?", b) is not None,
    ".data/serialization_id": lambda b: re.fullmatch(rb"\d{1,64}", b) is not None,
}
REQUIRED = ("archive_format", "archive_version", MODEL_JSON)

# Strings torch evaluates. expr_str is sympy's srepr ("Mul(Integer(2), Symbol('s52',
# positive=True, integer=True))"); guards are comparisons of input sizes
# ("L['query_start'].size()[0] == (1 + L['block_tables'].size()[0])"). Neither grammar has
# attribute access, subscripts on anything but L[...], dunders, '**' or big literals.
SYMPY_NAMES = frozenset((
    "Symbol", "Integer", "Add", "Mul", "Max", "Min", "Mod", "FloorDiv", "CleanDiv", "CeilToInt",
    "PythonMod", "ModularIndexing", "Where", "IntTrueDiv", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "And", "Or", "Not", "Rational", "floor", "ceiling",
    "True", "False", "true", "false", "oo", "positive", "negative", "nonnegative", "nonpositive",
    "integer", "real", "finite", "nonzero", "zero"))
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z]+)|'[a-z]{1,3}\d{1,6}'|-?\d{1,18}(?!\d)|[(),=-])")
_GUARD_TOKEN = re.compile(
    r"\s*(?:L\['[A-Za-z_][A-Za-z0-9_]{0,63}'\]\.size\(\)\[\d{1,2}\]|\d{1,18}(?!\d)|==|!=|<=|>=|<|>"
    r"|\+|-|\*|//|%|\(|\)|and\b|or\b|not\b)")
MAX_EXPR = 4096

ALLOWED_NAMESPACES = ("aten", "qcompile")
PURE_PYTHON_TARGETS = frozenset((operator.getitem, operator.add, operator.sub, operator.mul,
                                 operator.floordiv, operator.mod, operator.neg, operator.eq,
                                 operator.ne, operator.lt, operator.le, operator.gt,
                                 operator.ge))


class ProgramRefused(ValueError):
    """program.pt2 holds something qcompile does not write (the loader wraps it in one line)."""


def _json(data: bytes):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_program_json(path: Path) -> dict:
    """The serialized program (models/model.json) of an archive whose every entry is allowed."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        if not infos:
            raise ProgramRefused("is an empty archive")
        root = infos[0].filename.split("/", 1)[0]
        seen = set()
        for info in infos:
            name = _entry_name(info, root)
            if name in seen:
                raise ProgramRefused(f"has the entry {info.filename!r} twice")
            seen.add(name)
            data = z.read(info)
            if name == MODEL_JSON:
                program = _json(data)
            elif not ENTRIES[name](data):
                raise ProgramRefused(f"entry {info.filename!r} is not what qcompile writes "
                                     "(a payload or an unknown format)")
        missing = [n for n in REQUIRED if n not in seen]
        if missing:
            raise ProgramRefused(f"lacks the entries {missing}")
    if not isinstance(program, dict):
        raise ProgramRefused(f"{MODEL_JSON} is not a JSON object")
    return program


def _entry_name(info: zipfile.ZipInfo, root: str) -> str:
    """The entry's name below the archive's folder; refuses any name outside the allow-list
    (e.g. a `serialized_constants.pt` or a `data/weights/weight_0` payload, in any folder)."""
    prefix, _, name = info.filename.partition("/")
    if prefix != root or name not in ENTRIES:
        raise ProgramRefused(f"holds {info.filename!r}, which qcompile never writes (qcompile "
                             "programs hold the graph only; refusing to read the archive)")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise ProgramRefused(f"entry {info.filename!r} is compressed or encrypted; torch "
                             "writes stored entries")
    return name


def check_evaluated_strings(node) -> None:
    """Every string torch's deserializer or `.module()` evaluates as Python, checked against
    its grammar (walks the JSON: expr_str values anywhere, guards_code at the top)."""
    for guard in node.get("guards_code") or []:
        _check_tokens(guard, _GUARD_TOKEN, "guard", lambda m: True)
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "expr_str" in x:
                _check_tokens(x["expr_str"], _EXPR_TOKEN, "symbolic expression",
                              lambda m: m.group(1) is None or m.group(1) in SYMPY_NAMES)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _check_tokens(text, token: re.Pattern, what: str, name_ok) -> None:
    if not isinstance(text, str) or len(text) > MAX_EXPR or "**" in text or "__" in text:
        raise ProgramRefused(f"has a {what} qcompile does not write: {str(text)[:60]!r}")
    pos = 0
    while pos < len(text.rstrip()):
        m = token.match(text, pos)
        if m is None or m.end() == pos or not name_ok(m):
            raise ProgramRefused(f"has a {what} qcompile does not write: {text[:60]!r}")
        pos = m.end()


def deserialize(program: dict) -> torch.export.ExportedProgram:
    """torch's deserializer on the checked JSON, with no weights, constants or example inputs
    (qcompile's programs take their weights as inputs), so it has no payload to unpickle; then
    the checks a loaded program must pass before the engine calls `.module()`."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    check_evaluated_strings(program)
    with _cached_type_hints():
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
    ep = ExportedProgramDeserializer().deserialize(serialized, {}, {}, None)
    check_graph_ops(ep)
    ep.module()  # unlifting reads the call signature (40 ms); its failures must surface here
    return ep


class _CachedTyping:
    """The `typing` module with get_type_hints cached per (class, namespace): torch's serde
    asks it again for every dataclass it builds (29,188 calls for a 16-layer program, over a
    third of the load); the schema's classes do not change while it reads."""

    def __init__(self):
        self._hints: dict = {}

    def __getattr__(self, name):
        return getattr(typing, name)

    def get_type_hints(self, obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        hints = self._hints.get(key)
        if hints is None:
            hints = self._hints[key] = typing.get_type_hints(obj, globalns, localns,
                                                             include_extras)
        return hints


@contextlib.contextmanager
def _cached_type_hints():
    """torch's serde module reads `typing` through its own global: swap in _CachedTyping for
    the read (the same answers, computed once per class)."""
    from torch._export.serde import serialize
    real = getattr(serialize, "typing", None)
    if real is not typing:  # not the layout this was written for: leave torch alone
        yield
        return
    serialize.typing = _CachedTyping()
    try:
        yield
    finally:
        serialize.typing = real


def check_graph_ops(ep: torch.export.ExportedProgram) -> None:
    """The graph holds inputs, one output and calls of aten / qcompile operators (none with a
    `filename` argument, i.e. not aten::save or aten::from_file) or of pure integer
    arithmetic: no Python functions, modules, attributes or higher-order operators."""
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            raise ProgramRefused(f"holds a submodule {type(gm).__name__}")
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op != "call_function" or not _allowed_target(node.target):
                raise ProgramRefused(f"calls {node.op} {node.target!r}, which qcompile "
                                     "programs never do")


def _allowed_target(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return (target.namespace in ALLOWED_NAMESPACES
                and all(a.name != "filename" for a in target._schema.arguments))
    return target in PURE_PYTHON_TARGETS
