"""An artifact exported to ONNX against its reference path: export time and file size, then on
a few prompts the prefill logits of onnxruntime (CPU) against the program with the reference
ops (`Engine.score`), greedy tokens of both (onnxruntime feeding its presents back, the engine
with its paged cache), and the latency of each.

Beside onnxruntime, the exported module itself run by PyTorch eagerly (`OnnxDecoder`: the same
ops as the reference, float32 rounded to the activation dtype, attention batched as 4-D) is a
control: what the reference's own numbers do when only summation orders change.

    python bench/onnx_export.py ARTIFACT [ARTIFACT ...] --out DIR --new-tokens 16
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ("The capital of France is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Quantization of neural networks reduces memory because",
           "Once upon a time, in a small village by the sea, there lived")


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_greedy(sess, model, dtype, ids: list[int], new: int):
    """(prefill logits [S, V], greedy tokens, prefill seconds, per-decode-step seconds)."""
    names = [o.name.replace("present", "past_key_values") for o in sess.get_outputs()]
    past = np.zeros((1, model.num_kv_heads, 0, model.head_dim), dtype=dtype)
    feeds = {"input_ids": np.array([ids]), **{i.name: past for i in sess.get_inputs()[1:]}}
    t0 = time.perf_counter()
    out = sess.run(None, feeds)
    prefill = time.perf_counter() - t0
    first, tokens, steps = out[0][0], [], []
    for _ in range(new):
        tokens.append(int(out[0][0, -1].argmax()))
        if len(tokens) == new:
            break
        feeds = {"input_ids": np.array([[tokens[-1]]]), **dict(zip(names[1:], out[1:]))}
        t0 = time.perf_counter()
        out = sess.run(None, feeds)
        steps.append(time.perf_counter() - t0)
    return first, tokens, prefill, steps


def kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per row, in nats."""
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


def bench(artifact: Path, out_dir: Path, new: int, threads: int, export: bool = True) -> dict:
    from qcompile.compiler.onnx_export import export_onnx
    from qcompile.compiler.onnx_lowering import load_decoder
    from qcompile.runtime.engine import Engine
    onnx_path = out_dir / f"{artifact.name}.onnx"
    exp = export_onnx(artifact, onnx_path) if export else None
    engine = Engine.load(artifact)
    decoder, art = load_decoder(artifact)
    m, act = art.model, art.compile.torch_dtype
    t0 = time.perf_counter()
    sess = ort_session(onnx_path, threads)
    load = time.perf_counter() - t0
    rows = []
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        ref = engine.score([ids])[0].numpy()
        with torch.no_grad():
            eager = decoder(torch.tensor([ids]), [torch.zeros(1, m.num_kv_heads, 0, m.head_dim,
                                                              dtype=act)] * (2 * m.num_layers))
        eager = eager[0][0].numpy()
        got, tokens, prefill, steps = ort_greedy(sess, m, np.dtype(str(act).split(".")[1]),
                                                 ids, new)
        t0 = time.perf_counter()
        want = engine.generate([ids], max_new_tokens=new, temperature=0.0,
                               stop_on_eos=False)[0].token_ids
        ref_s = time.perf_counter() - t0
        split = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), None)
        margin = None
        if split is not None:  # the reference's top-2 gap where the two first differ
            top = np.sort(engine.score([ids + want[:split]])[0][-1].numpy())
            margin = float(top[-1] - top[-2])
        rows.append(dict(tokens=len(ids), diff=float(np.abs(got - ref).max()),
                         eager_diff=float(np.abs(eager - ref).max()),
                         scale=float(np.abs(ref).max()),
                         argmax=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                         kl=float(kl(ref, got).max()),
                         equal=sum(a == b for a, b in zip(tokens, want)), split=split,
                         margin=margin, prefill_ms=prefill * 1e3,
                         decode_ms=statistics.median(steps) * 1e3,
                         ref_ms_token=ref_s * 1e3 / new))
    return dict(artifact=artifact.name, seconds=exp and exp.seconds,
                mib=onnx_path.stat().st_size / 2**20, load_s=load, ops=exp and exp.ops,
                rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for the .onnx files")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--no-export", action="store_true",
                   help="time the .onnx files already in --out (no export)")
    p.add_argument("--threads", type=int, default=2,
                   help="onnxruntime intra-op threads and torch threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for art in args.artifacts:
        r = bench(art, args.out, args.new_tokens, args.threads, not args.no_export)
        took = "" if r["seconds"] is None else f"export {r['seconds']:.0f} s, "
        print(f"\n## {r['artifact']}: {took}{r['mib']:.1f} MiB, session load "
              f"{r['load_s']:.1f} s", flush=True)
        if r["ops"]:
            print("ops:", ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items(),
                                                                  key=lambda kv: -kv[1])))
        print(f"\n| prompt tokens | max abs logit | max abs diff, ORT | max abs diff, eager "
              f"module | argmax agree | max KL (nats) | greedy equal of {args.new_tokens} | "
              "first split (ref top-2 gap) | ORT prefill ms | ORT decode ms/token | "
              "reference generate ms/token |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for x in r["rows"]:
            split = "-" if x["split"] is None else f"{x['split']} ({x['margin']:.3f})"
            print(f"| {x['tokens']} | {x['scale']:.1f} | {x['diff']:.4f} | "
                  f"{x['eager_diff']:.4f} | {x['argmax']:.3f} | {x['kl']:.2e} | {x['equal']} | "
                  f"{split} | {x['prefill_ms']:.0f} | {x['decode_ms']:.1f} | "
                  f"{x['ref_ms_token']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
