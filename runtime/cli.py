"""`qrun ARTIFACT -p "..."` (generate) and `qeval ARTIFACT [--text FILE]` (perplexity).

Every argument is checked before the artifact loads (the device, sampling values, the text
file), so a mistake costs a one-line message, not a model load and a traceback."""
from __future__ import annotations

import json
from pathlib import Path

from qcompile.compiler.cli_errors import OneLineParser, run_cli

from .device import parse_device


def _common(p: OneLineParser) -> None:
    p.add_argument("artifact", type=Path, help="directory written by qcompile")
    p.add_argument("--device", default="cpu",
                   help="cpu (the PyTorch reference ops, any artifact) or cuda[:N] (the "
                        "artifact's CUTLASS kernels; the GPU must match its --target)")
    add_compile_args(p, "on cuda, no TorchInductor on the program's glue (default: compiled "
                        "once and cached on disk; the first load of an artifact takes minutes)")


def add_compile_args(p, no_compile_help: str) -> None:
    """--no-compile and --aot, shared by qrun, qeval, qbench and qserve (`compile_arg`)."""
    p.add_argument("--no-compile", dest="compile", action="store_false", help=no_compile_help)
    p.add_argument("--aot", action="store_true",
                   help="compile the glue with AOTInductor instead of torch.compile: once "
                        "per program, torch and GPU into a cached package (later loads skip "
                        "tracing)")


def add_invariance_arg(p) -> None:
    """--batch-invariant, shared by qserve and qbench (Engine.load's batch_invariant)."""
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens do not depend on the other requests it is batched "
                        "with (server load, a preemption): fixed attention key splits, a "
                        "fixed-size float LM head; CUDA, Inductor, integer-GEMM precisions "
                        "(w8a8, w4a8*); costs some speed (qbench measures it)")


def compile_arg(args) -> bool | str | None:
    """Engine.load's compile from --no-compile / --aot."""
    return "aot" if args.aot else None if args.compile else False


def _load(args, cuda_graphs: bool):
    device = parse_device(args.device)
    if not args.artifact.is_dir():
        raise FileNotFoundError(f"{args.artifact}: no such artifact directory (make one with "
                                "`qcompile MODEL -o DIR`)")
    from .engine import Engine
    return Engine.load(args.artifact, device=device,
                       cuda_graphs=None if cuda_graphs and device.type == "cuda" else False,
                       compile=compile_arg(args))


def run_parser() -> OneLineParser:
    p = OneLineParser(prog="qrun", description="Generate text with a qcompile artifact. One "
                      "prompt streams as it is generated; several run as one continuously "
                      "batched request set and print when done.")
    _common(p)
    p.add_argument("-p", "--prompt", action="append", required=True,
                   help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="most tokens generated per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, >= 0; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens only (default 0: off)")
    p.add_argument("--seed", type=int, help="seed of the sampler (prompt i uses seed + i)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is (default: the model's chat template, if it has one)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly (default on cuda: CUDA graphs per "
                        "decode batch size, captured at load)")
    return p


def run_main(argv=None) -> int:
    args = run_parser().parse_args(argv)
    return run_cli("qrun", lambda: _run(args))


def _run(args) -> int:
    from .sampler import SamplingParams
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed)  # checked before the load
    engine = _load(args, cuda_graphs=not args.no_cuda_graphs)
    chat = not args.raw and bool(getattr(engine.tokenizer, "chat_template", None))
    sampling = dict(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                    top_p=params.top_p, top_k=params.top_k, seed=params.seed, chat=chat)
    if len(args.prompt) == 1 and not args.no_stream:
        for ev in engine.stream(args.prompt, **sampling):
            print(ev.text, end="", flush=True)
        print()
    else:
        for prompt, c in zip(args.prompt, engine.generate(args.prompt, **sampling)):
            print(f">>> {prompt}\n{c.text}\n")
    return 0


def eval_parser() -> OneLineParser:
    p = OneLineParser(prog="qeval", description="Perplexity of an artifact on a text: the "
                      "English text of Python's documentation (pydoc_data.topics, the "
                      "project's standing metric) or any UTF-8 file (--text). Windows of "
                      "--seq-len tokens from the front of the text, one prefill each.")
    _common(p)
    p.add_argument("--text", type=Path,
                   help="UTF-8 text file to score (default: pydoc_data.topics); as many "
                        "windows as it holds, up to --seqs")
    p.add_argument("--seqs", type=int, default=24, help="number of windows (default 24)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (for scripts) instead of the table")
    return p


def eval_main(argv=None) -> int:
    args = eval_parser().parse_args(argv)
    return run_cli("qeval", lambda: _eval(args))


def _eval(args) -> int:
    from .eval import PYDOC, perplexity, read_text
    for flag in ("seqs", "seq_len", "batch"):
        if getattr(args, flag) < 1 or (flag == "seq_len" and args.seq_len < 2):
            raise ValueError(f"--{flag.replace('_', '-')} must be at least "
                             f"{2 if flag == 'seq_len' else 1}, got {getattr(args, flag)}")
    text = read_text(args.text) if args.text else None
    name = str(args.text) if args.text else PYDOC
    engine = _load(args, cuda_graphs=False)  # scoring is one prefill: nothing to replay
    r = perplexity(engine, args.seqs, args.seq_len, args.batch, progress=not args.json,
                   text=text, name=name)
    c = engine.artifact.compile
    row = dict(artifact=str(args.artifact), precision=c.precision, kv=c.kv, dtype=c.dtype,
               device=args.device, text=name, **r.to_json())
    if args.json:
        print(json.dumps(row))
        return 0
    print(f"| artifact | precision | kv | dtype | text | perplexity | tokens | seconds |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {args.artifact} | {c.precision} | {c.kv} | {c.dtype} | {name} | "
          f"{r.perplexity:.3f} | {r.tokens} | {r.seconds:.1f} |")
    return 0
