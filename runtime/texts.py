"""English text already on the machine, by source: what perplexity is measured on and what
QoQ calibrates on, never the same source for both.

A QoQ recipe fits its rounding (GPTQ, clipping, smoothing) to the calibration text, so a
perplexity measured on that kind of text flatters it: calibrated on pydoc, W4A8 QoQ cost
+10% on pydoc and up to twice that on other English text (issue 14). The sources here are
kept apart by name: `EVAL_SOURCES` for scoring, `CALIB_SOURCES` for calibration.

Every source is text that ships with CPython or with the packages qcompile installs, so no
data set is downloaded:

| name | what | role |
|---|---|---|
| pydoc | the topics of Python's language reference (`pydoc_data.topics`) | eval |
| cpython-prose | IDLE's user guide (`idlelib/help.html`, tags stripped), IDLE's release notes, history, readme and to-do list, CPython's LICENSE.txt: prose about a program, not a reference | eval |
| package-readmes | the long descriptions (READMEs) of the packages qcompile depends on (torch, transformers, ...): project introductions in Markdown | eval |
| stdlib-docstrings | the docstrings of the standard library's modules, classes and functions (read with `ast`, nothing imported) | calibration |

A source a machine lacks (a distribution that strips idlelib, say) raises `SourceMissing`
with its name; the callers report it rather than score something else.
"""
from __future__ import annotations

import ast
import functools
import html.parser
import importlib.metadata
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class SourceMissing(FileNotFoundError):
    """A text source this machine does not have."""


@dataclass(frozen=True)
class Source:
    name: str
    about: str
    read: Callable[[], str]


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


class _Text(html.parser.HTMLParser):
    """The text of an HTML page without its scripts, styles and markup."""

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


CPYTHON_PROSE = ("idlelib/help.html", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt",
                 "idlelib/HISTORY.txt", "idlelib/README.txt", "idlelib/TODO.txt", "LICENSE.txt")


def cpython_prose() -> str:
    root, parts = _stdlib(), []
    for rel in CPYTHON_PROSE:
        path = root / rel
        if not path.is_file():
            raise SourceMissing(f"cpython-prose: {path} is not on this machine")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".html":
            page = _Text()
            page.feed(text)
            text = re.sub(r"\n\s*\n+", "\n\n", "".join(page.parts)).strip()
        parts.append(text)
    return "\n\n".join(parts)


# qcompile's dependencies and theirs with a README of some length, in a fixed order.
README_PACKAGES = ("torch", "transformers", "tqdm", "nvidia-cutlass", "huggingface_hub",
                   "tokenizers", "regex", "sympy", "mpmath", "networkx", "numpy", "fsspec",
                   "matplotlib", "requests", "gguf", "safetensors", "accelerate", "onnx")


# README lines that are pictures, badges or raw HTML, not text. They matter beyond their
# share: SmolLM2 fed a window that starts inside a Markdown image link ("![PyTorch Logo](...)",
# torch's first line) loses the whole window, 5.5 nats/token in float against ~2.6 for the others.
_NOT_PROSE = re.compile(r"\s*(!\[|\[!\[|<)")


def package_readmes() -> str:
    parts = []
    for name in README_PACKAGES:
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""
        lines = [line for line in body.splitlines() if not _NOT_PROSE.match(line)]
        if sum(map(len, lines)) > 500:
            parts.append("\n".join(lines).strip())
    if not parts:
        raise SourceMissing("package-readmes: none of the packages has a README here")
    return "\n\n".join(parts)


def package_licenses() -> str:
    """The licence files the packages of README_PACKAGES ship in their metadata, each text
    once (torch alone bundles ~100 third-party licences, many the same Apache or BSD text)."""
    seen, parts = set(), []
    for name in README_PACKAGES:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in sorted(files, key=str):
            low = str(f).lower()
            if ".dist-info/" not in low or not ("licen" in low or "copying" in low
                                                or "notice" in low):
                continue
            path = Path(f.locate())
            text = path.read_text(encoding="utf-8", errors="replace").strip() \
                if path.is_file() else ""
            key = re.sub(r"\s+", " ", text)
            if len(text) > 200 and key not in seen:
                seen.add(key)
                parts.append(text)
    if not parts:
        raise SourceMissing("package-licenses: none of the packages ships a licence here")
    return "\n\n".join(parts)


# standard library folders whose docstrings are not the library's own API
_NOT_API = {"test", "tests", "idlelib", "site-packages", "dist-packages", "pydoc_data",
            "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_docstrings() -> str:
    root, docs = _stdlib(), []
    files = sorted(p for p in root.rglob("*.py")
                   if not _NOT_API & set(p.relative_to(root).parts))
    if not files:
        raise SourceMissing(f"stdlib-docstrings: no Python files under {root}")
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return "\n\n".join(docs)


SOURCES = {s.name: s for s in (
    Source("pydoc", "the topics of Python's language reference (pydoc_data.topics)", pydoc_text),
    Source("cpython-prose", "IDLE's user guide, release notes and history, CPython's licence",
           cpython_prose),
    Source("package-readmes", "the READMEs of the packages qcompile depends on",
           package_readmes),
    Source("package-licenses", "the licences shipped with those packages, each once",
           package_licenses),
    Source("stdlib-docstrings", "docstrings of the standard library's API", stdlib_docstrings),
)}
EVAL_SOURCES = ("pydoc", "cpython-prose", "package-readmes", "package-licenses")
CALIB_SOURCES = ("stdlib-docstrings",)


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """The text of source `name` (KeyError for an unknown name, SourceMissing where the
    machine lacks it)."""
    if name not in SOURCES:
        raise KeyError(f"unknown text source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name].read()
