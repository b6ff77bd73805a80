"""The nvcc driver and kernel cache: template + tile config + target -> a loadable binary.

Each template in this folder (`ALL_KINDS` in `configs.py`, `ATTN_KINDS` in
`attention_configs.py`: kind -> (template file, ...)) is
compiled with `config.defines(kind)` into one binary holding the `extern "C"` entry
`config.name(kind)` (split-K configs also `config.name(kind) + "_reduce"`, `config.entries`).

Binaries are **fatbins** (`nvcc -fatbin`), which `cuModuleLoadData` loads like a cubin:

| target | what the fatbin holds | why |
|---|---|---|
| `sm80` | `sm_80` SASS + `compute_80` PTX | a cubin holds one SASS arch and no PTX; the PTX lets the driver JIT the same kernels for sm_86/89/90 (sm_80 SASS does not run on sm_90) |
| `sm90` | `sm_90a` SASS | wgmma / TMA need the arch-specific `sm_90a`; runs on H100 and H200 (any template, the sm80 ones included) |

The cache key is the sha256 of the template source, every header it includes from the
template folder (recursively), the defines, the target's flags, the nvcc version and the
CUTLASS version; a hit skips nvcc. Cache writes are atomic (temp file + rename), so parallel
builds and interrupted builds never leave a truncated binary behind. No GPU is needed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

TEMPLATE_DIR = Path(__file__).resolve().parent
SUFFIX = ".fatbin"
TABLE_NAME = "kernels.json"
COMMON_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo")

# target -> nvcc -gencode flags (see the module docstring for why)
TARGETS: dict[str, tuple[str, ...]] = {
    "sm80": ("-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_80,code=compute_80"),
    "sm90": ("-gencode", "arch=compute_90a,code=sm_90a"),
}


class KernelBuildError(RuntimeError):
    """nvcc failed; the message holds the command and the tail of its stderr."""


class NvccNotFoundError(KernelBuildError):
    """No nvcc on PATH (nor $QCOMPILE_NVCC, $CUDA_HOME/bin)."""


class KernelTableError(ValueError):
    """A kernels.json that does not match the files beside it."""


@dataclass(frozen=True)
class KernelBinary:
    path: Path               # the fatbin (in the cache)
    entries: tuple[str, ...]  # extern "C" names (the kernel first)
    kind: str
    config: Any              # a configs.TileConfig
    target: str
    smem_bytes: int          # dynamic shared memory of the main entry
    threads: int
    sha256: str              # of the file's bytes
    nvcc: str                # `nvcc --version` release line

    @property
    def name(self) -> str:
        return self.entries[0]


def find_nvcc() -> str:
    """$QCOMPILE_NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH)."""
    explicit = os.environ.get("QCOMPILE_NVCC")
    candidates = [explicit] if explicit else []
    candidates.append(shutil.which("nvcc"))
    candidates += [str(Path(os.environ[v]) / "bin" / "nvcc")
                   for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise NvccNotFoundError(
        "nvcc not found: kernels are compiled ahead of time with nvcc (no GPU needed). Install "
        "the CUDA toolkit (12.x or 13.0) and put its bin/ on PATH, or set QCOMPILE_NVCC or "
        f"CUDA_HOME. Looked at: $QCOMPILE_NVCC={explicit!r}, PATH, $CUDA_HOME, $CUDA_PATH.")


@functools.lru_cache(maxsize=8)
def _nvcc_version(nvcc: str, mtime_ns: int) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    release = [ln for ln in lines if "release" in ln]
    # "Cuda compilation tools, release 13.0, V13.0.88" + the build line identify the compiler
    return " | ".join(release + lines[-1:]) if release else " | ".join(lines)


def nvcc_version(nvcc: str | None = None) -> str:
    nvcc = nvcc or find_nvcc()
    return _nvcc_version(nvcc, os.stat(nvcc).st_mtime_ns)


def cutlass_include() -> Path | None:
    """<site-packages>/cutlass_library/source/include of the nvidia-cutlass package, if present."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if inc.is_dir() else None


def _cutlass_version() -> str:
    try:
        return importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        return "none"


_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


def local_headers(source: Path, template_dir: Path) -> list[Path]:
    """Every file `source` includes, directly or not, that lives in template_dir (sorted).
    Conditional includes count too: the key may change more often than needed, never less."""
    template_dir = template_dir.resolve()
    source = source.resolve()
    seen: set[Path] = set()
    todo = [source]
    while todo:
        current = todo.pop()
        for inc in _INCLUDE.findall(current.read_text(errors="replace")):
            for base in (current.parent, template_dir):  # nvcc's order: own folder, then -I
                p = (base / inc).resolve()
                if p.is_file():
                    if p.is_relative_to(template_dir) and p != source and p not in seen:
                        seen.add(p)
                        todo.append(p)
                    break
    return sorted(seen)


def _defines(config, kind: str) -> list[str]:
    return [d if d.startswith("-") else f"-D{d}" for d in config.defines(kind)]


def _default_kinds() -> Mapping[str, tuple]:
    from qcompile.cutlass_templates.attention_configs import ATTN_KINDS
    from qcompile.cutlass_templates.configs import ALL_KINDS
    return {**ALL_KINDS, **ATTN_KINDS}


@dataclass(frozen=True)
class _Job:
    kind: str
    config: Any
    target: str
    source: Path
    template_dir: Path
    cache_dir: Path
    nvcc: str


def _job(kind, config, target, cache_dir, template_dir, kinds, nvcc) -> _Job:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")
    kinds = _default_kinds() if kinds is None else kinds
    if kind not in kinds:
        raise ValueError(f"unknown kernel kind {kind!r}; known: {sorted(kinds)}")
    template_dir = Path(template_dir or TEMPLATE_DIR)
    source = template_dir / kinds[kind][0]
    if not source.is_file():
        raise FileNotFoundError(f"template {source} for kind {kind!r} does not exist")
    cache = Path(cache_dir or os.environ.get("QCOMPILE_CACHE")
                 or Path.home() / ".cache" / "qcompile" / "kernels")
    return _Job(kind, config, target, source, template_dir, cache, nvcc or find_nvcc())


def _key(job: _Job) -> str:
    h = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    put("template", job.source.read_bytes())
    for header in local_headers(job.source, job.template_dir):
        put(f"header {header.relative_to(job.template_dir.resolve()).as_posix()}",
            header.read_bytes())
    put("defines", json.dumps(_defines(job.config, job.kind)).encode())
    put("flags", json.dumps([*COMMON_FLAGS, "-fatbin", *TARGETS[job.target]]).encode())
    put("nvcc", nvcc_version(job.nvcc).encode())
    put("cutlass", _cutlass_version().encode())
    return h.hexdigest()


def kernel_key(kind: str, config, target: str, *, template_dir=None, kinds=None,
               nvcc: str | None = None) -> str:
    """The cache key of a kernel (no compilation)."""
    return _key(_job(kind, config, target, None, template_dir, kinds, nvcc))


def _command(job: _Job, out: Path) -> list[str]:
    inc = cutlass_include()
    includes = ([f"-I{inc}"] if inc else []) + [f"-I{job.template_dir}"]
    return [job.nvcc, "-fatbin", *TARGETS[job.target], *COMMON_FLAGS, *includes,
            *_defines(job.config, job.kind), "-o", str(out), str(job.source)]


def _compile(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _build(job: _Job) -> KernelBinary:
    name = job.config.name(job.kind)
    entries = job.config.entries(job.kind) if hasattr(job.config, "entries") else (name,)
    key = _key(job)
    path = job.cache_dir / job.target / f"{name}-{key[:20]}{SUFFIX}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            cmd = _command(job, Path(tmp))
            proc = _compile(cmd)
            if proc.returncode != 0:
                tail = "\n".join((proc.stderr or proc.stdout or "").splitlines()[-40:])
                hint = ("\n(hint: the CUTLASS headers come from the nvidia-cutlass package, "
                        "which is not installed)" if cutlass_include() is None
                        and re.search(r"cute/|cutlass/", tail) else "")
                raise KernelBuildError(
                    f"nvcc failed (exit {proc.returncode}) building {name} for {job.target}\n"
                    f"command: {shlex.join(cmd)}\n--- stderr (tail) ---\n{tail}{hint}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    data = path.read_bytes()
    return KernelBinary(path, entries, job.kind, job.config, job.target,
                        job.config.smem_bytes(job.kind), job.config.threads(),
                        hashlib.sha256(data).hexdigest(), nvcc_version(job.nvcc))


def build_kernel(kind: str, config, target: str, cache_dir=None, *, template_dir=None,
                 kinds: Mapping[str, tuple] | None = None) -> KernelBinary:
    """Compile (or take from the cache) one kernel. `template_dir` / `kinds` default to this
    folder and `configs.KINDS`; tests pass their own."""
    return _build(_job(kind, config, target, cache_dir, template_dir, kinds, None))


def build_kernels(requests: Iterable[tuple[str, Any]], target: str, jobs: int | None = None,
                  progress: bool = True, *, cache_dir=None, template_dir=None,
                  kinds: Mapping[str, tuple] | None = None) -> list[KernelBinary]:
    """Build the distinct (kind, config) requests in parallel, in first-seen order."""
    from tqdm import tqdm

    unique = list(dict.fromkeys((kind, config) for kind, config in requests))
    nvcc = find_nvcc()  # fail once, clearly, before starting threads
    todo = [_job(k, c, target, cache_dir, template_dir, kinds, nvcc) for k, c in unique]
    results: list[KernelBinary | None] = [None] * len(todo)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1))
    try:
        futures = {pool.submit(_build, job): i for i, job in enumerate(todo)}
        with tqdm(total=len(todo), desc=f"nvcc {target}", unit="kernel",
                  disable=not progress) as bar:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()  # the first failure raises
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]


def _entry(b: KernelBinary) -> dict:
    # the config's identity only (fields that take part in equality): launch choices such as
    # TileConfig.reduce are not properties of the binary
    config = {f.name: getattr(b.config, f.name) for f in dataclasses.fields(b.config)
              if f.compare}
    return {"name": b.name, "kind": b.kind, "config": config,
            "target": b.target, "file": f"{b.name}{SUFFIX}", "entries": list(b.entries),
            "smem_bytes": b.smem_bytes, "threads": b.threads, "sha256": b.sha256, "nvcc": b.nvcc}


def _atomic_write(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_kernel_table(binaries: Iterable[KernelBinary], dest_dir) -> Path:
    """Copy the binaries into dest_dir (e.g. an artifact's kernels/<target>/) as <name>.fatbin
    and write kernels.json listing them; returns the path of kernels.json."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    for b in binaries:
        e = _entry(b)
        if e["name"] in table:
            if table[e["name"]]["sha256"] != e["sha256"]:
                raise KernelTableError(f"two different binaries are both named {e['name']}")
            continue
        data = Path(b.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != b.sha256:
            raise KernelTableError(f"{b.path} changed since it was built (sha256 mismatch)")
        _atomic_write(dest / e["file"], data)
        table[e["name"]] = e
    out = dest / TABLE_NAME
    _atomic_write(out, (json.dumps(list(table.values()), indent=2) + "\n").encode())
    return out


_REQUIRED = ("name", "kind", "config", "target", "file", "entries", "smem_bytes", "threads",
             "sha256")


def read_kernel_table(directory) -> list[dict]:
    """The entries of directory/kernels.json, after checking every file's sha256."""
    directory = Path(directory)
    path = directory / TABLE_NAME
    if not path.is_file():
        raise KernelTableError(f"no {TABLE_NAME} in {directory}: not a kernel directory")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KernelTableError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(table, list):
        raise KernelTableError(f"{path} must hold a list of kernels, not {type(table).__name__}")
    for i, e in enumerate(table):
        missing = [k for k in _REQUIRED if not isinstance(e, dict) or k not in e]
        if missing:
            raise KernelTableError(f"{path}: entry {i} lacks {missing}")
        if Path(e["file"]).name != e["file"]:
            raise KernelTableError(f"{path}: entry {e['name']} names a file outside the "
                                   f"directory: {e['file']!r}")
        f = directory / e["file"]
        if not f.is_file():
            raise KernelTableError(f"{f} (kernel {e['name']}, listed in {path}) is missing")
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest != e["sha256"]:
            raise KernelTableError(f"{f} does not match {path}: sha256 {digest}, expected "
                                   f"{e['sha256']} (modified or corrupt; rebuild the kernels)")
    return table
