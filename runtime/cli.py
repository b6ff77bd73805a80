"""`qrun ARTIFACT -p "..."` (generate) and `qeval ARTIFACT` (perplexity)."""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="directory written by qcompile")
    p.add_argument("--device", default="cpu", help="cpu (reference ops) or cuda[:N]")


def run_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qrun", description="Generate text with a qcompile artifact.")
    _common(p)
    p.add_argument("-p", "--prompt", action="append", required=True,
                   help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is (default: the model's chat template, if it has one)")
    p.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    args = p.parse_args(argv)
    from .engine import Engine
    try:
        engine = Engine.load(args.artifact, device=args.device)
        chat = not args.raw and bool(getattr(engine.tokenizer, "chat_template", None))
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, chat=chat)
        if len(args.prompt) == 1 and not args.no_stream:
            for ev in engine.stream(args.prompt, **sampling):
                print(ev.text, end="", flush=True)
            print()
        else:
            for prompt, c in zip(args.prompt, engine.generate(args.prompt, **sampling)):
                print(f">>> {prompt}\n{c.text}\n")
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"qrun: error: {e}", file=sys.stderr)
        return 2
    return 0


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qeval",
                                description="Perplexity of an artifact on pydoc_data.topics text.")
    _common(p)
    p.add_argument("--seqs", type=int, default=24, help="number of sequences (default 24)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward")
    args = p.parse_args(argv)
    from .engine import Engine
    from .eval import perplexity
    try:
        engine = Engine.load(args.artifact, device=args.device)
        r = perplexity(engine, args.seqs, args.seq_len, args.batch)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"qeval: error: {e}", file=sys.stderr)
        return 2
    c = engine.artifact.compile
    print(f"| artifact | precision | kv | dtype | perplexity | tokens | seconds |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {args.artifact} | {c.precision} | {c.kv} | {c.dtype} | {r.perplexity:.3f} | "
          f"{r.tokens} | {r.seconds:.1f} |")
    return 0
