"""`qcompile MODEL --target sm80 --precision w4a8 --kv int4 -o OUT`: checkpoint in, artifact
out. `qcompile export-onnx ARTIFACT -o FILE.onnx`: an artifact's program as ONNX
(compiler/onnx_export.py).

The flags are generated from CompileConfig's fields (help, choices, defaults), so the CLI
and the config stored in the artifact cannot drift. Errors are one line (compiler/cli_errors.py).
`export-onnx` is a word before the flags rather than a flag of the compile: it starts from an
artifact, not a checkpoint, and shares none of the compile's options (a checkpoint named
`export-onnx` is passed as `./export-onnx`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .cli_errors import OneLineParser, run_cli
from .config import CompileConfig

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct GGUF, fetched on first use (models/default_model.py)
EXPORT_ONNX = "export-onnx"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="qcompile",
        description="Compile a Llama-family checkpoint into a qcompile artifact: the model "
                    "captured with torch.export, quantized by the chosen scheme, its graph "
                    "rewritten to quantized GEMM and paged-KV ops, and the GPU kernels it uses "
                    "built. Serve it with qrun, score it with qeval. Compiling needs no GPU.",
        epilog=f"qcompile {EXPORT_ONNX} ARTIFACT -o FILE.onnx writes an artifact's program as "
               f"ONNX for onnxruntime (see qcompile {EXPORT_ONNX} --help).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF folder (config.json + safetensors), .gguf file, or model.pt; "
                        f"'{DEFAULT_MODEL}' (default) is SmolLM2-135M-Instruct, downloaded on "
                        "first use (98 MB, sha256-checked; $QCOMPILE_DEFAULT_MODEL names a local "
                        "copy)")
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
            kind = {"int": int, "float": float, "float | None": float}.get(
                getattr(f.type, "__name__", f.type), str)
            p.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                           help=f"{f.metadata['help']} (default: {f.default})")
    return p


def resolve_model(name: str) -> Path:
    if name == DEFAULT_MODEL:
        from qcompile.models.loaders import default_model_path
        return default_model_path()
    return Path(name)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [EXPORT_ONNX]:
        return export_onnx_main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_cli("qcompile", lambda: _compile(args),
                   interrupted="interrupted; no artifact written")


def export_onnx_parser() -> argparse.ArgumentParser:
    from .onnx_lowering import PRECISIONS
    p = OneLineParser(
        prog=f"qcompile {EXPORT_ONNX}",
        description="Write an artifact's program as one ONNX file (weights inside; past 2 GB "
                    "in a .data file beside it) that onnxruntime runs on the CPU: input_ids and "
                    "a typed KV cache per layer in, logits and the updated cache out. Int8 "
                    "GEMMs become MatMulInteger. The file is checked with onnx.checker. "
                    f"Precisions: {', '.join(PRECISIONS)}; KV formats fp16 and int4 (the "
                    "cache is stored decoded). Interface and numerics: "
                    "compiler/onnx_export.py.")
    p.add_argument("artifact", type=Path, help="directory written by qcompile")
    p.add_argument("-o", "--output", type=Path,
                   help="ONNX file to write (default: <artifact name>.onnx); replaced if it "
                        "exists")
    return p


def export_onnx_main(argv=None) -> int:
    args = export_onnx_parser().parse_args(argv)
    return run_cli(f"qcompile {EXPORT_ONNX}", lambda: _export_onnx(args),
                   interrupted="interrupted; no ONNX file written")


def _export_onnx(args) -> int:
    from .onnx_export import export_onnx
    out = args.output or Path(f"{args.artifact.name}.onnx")
    r = export_onnx(args.artifact, out)
    print(f"qcompile {EXPORT_ONNX}: wrote {r.path} ({r.bytes / 2**20:.1f} MiB, "
          f"{r.seconds:.0f} s)")
    return 0


def _compile(args) -> int:
    cfg = CompileConfig(**{f.name: getattr(args, f.name)
                           for f in dataclasses.fields(CompileConfig)})
    source = resolve_model(args.model)
    out = args.output or Path(f"{Path(args.model).stem}-{cfg.precision}-kv{cfg.kv}")
    from .compile import compile_model
    compile_model(source, cfg, out, trust_pickle=args.trust_pickle, progress=not args.quiet,
                  force=args.force)
    print(f"qcompile: wrote {out}")
    return 0
