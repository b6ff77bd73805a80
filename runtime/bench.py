"""`qbench ARTIFACT`: the serving benchmark, in the manner of `vllm bench throughput`
(`qbench --url URL` drives a running server instead: runtime/bench_client.py).

N synthetic prompts of `--input-len` random token ids (seeded), each generating exactly
`--output-len` tokens (EOS ignored, greedy), all submitted at once to one engine with
continuous batching (`--max-seqs` sequences at a time). Reported: output and total tokens/s,
time to first token and time per output token per request (p50 / p99: TTFT includes the
queueing of a throughput run), the wall time of each decode-only step (p50 / p99) and its batch,
the KV cache's capacity and the peak memory. `--peer hf` runs HF transformers on the artifact's
source checkpoint (or `--hf PATH`) with the same prompts, eager and with a static cache and
torch.compile, and prints our throughput over theirs. Writes `qbench-<artifact>.json` and a
plot to `--out`.
"""
from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .cli import add_compile_args, add_invariance_arg, compile_arg

PEERS = ("hf", "hf-eager", "hf-static")


@dataclass
class Result:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    batch: int              # sequences at a time
    wall_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_ms: dict = field(default_factory=dict)   # p50, p99
    tpot_ms: dict = field(default_factory=dict)
    step_ms: dict = field(default_factory=dict)   # decode-only steps: p50, p99, mean batch
    kv_capacity_tokens: int | None = None
    peak_mem_gib: float = 0.0
    load_s: float | None = None  # Engine.load to ready (Inductor's compile or its cache)
    # steps with a prompt chunk (prefill, or prefill and decode rows): their wall time, and
    # the prompt tokens over their summed time (ours only: where TTFT goes)
    prefill_ms: dict = field(default_factory=dict)
    prefill_tok_s: float | None = None


def percentiles(xs: list[float]) -> dict:
    """p50 and p99 (nearest rank) of xs in the units given; {} for no samples."""
    if not xs:
        return {}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "mean": sum(s) / len(s)}


def synthetic_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` token ids drawn uniformly below the vocabulary (as vLLM's random
    dataset does); seeded so every engine and peer gets the same ones."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (host RSS)


def bench_engine(engine, prompts: list[list[int]], output_len: int, name: str = "qcompile",
                 progress: bool = True) -> Result:
    """All prompts at once through engine.step(); per-request first/last token times and the
    wall time of every decode-only step (no prefill chunk in it)."""
    from tqdm import tqdm

    from .sampler import SamplingParams
    params = SamplingParams(max_new_tokens=output_len, stop_on_eos=False)
    dev = engine.device
    # warm-up outside the timed region (first launches, allocator, lazy loads)
    engine.generate([prompts[0][:8]], max_new_tokens=2, stop_on_eos=False)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sched = engine.scheduler
    t0 = time.perf_counter()
    reqs = engine.submit(prompts, params)
    first, last, steps, prefill = {}, {}, [], []
    bar = tqdm(total=len(prompts) * output_len, desc=f"qbench {name}", unit="tok",
               disable=not progress, leave=False)
    while any(r.finish_reason is None for r in reqs):
        # every running request past its prompt: one token each (a recomputation too)
        decode_only = not sched.waiting and all(
            r.computed >= len(r.prompt) for r in sched.running)
        batch = len(sched.running)
        ts = time.perf_counter()
        events = engine.step()  # ends with the host read of the sampled ids: synchronised
        now = time.perf_counter()
        if decode_only:
            steps.append((now - ts, batch))
        else:
            prefill.append(now - ts)
        for req, _ in events:
            first.setdefault(req.id, now)
            last[req.id] = now
        bar.update(len(events))
    bar.close()
    wall = time.perf_counter() - t0
    n_out = sum(len(r.out) for r in reqs)
    ttft = [(first[r.id] - t0) * 1e3 for r in reqs]
    tpot = [(last[r.id] - first[r.id]) * 1e3 / (len(r.out) - 1) for r in reqs if len(r.out) > 1]
    step = percentiles([s * 1e3 for s, _ in steps])
    if steps:
        step["batch"] = sum(b for _, b in steps) / len(steps)
    n_in = sum(map(len, prompts))
    return Result(name, len(prompts), len(prompts[0]), output_len, sched.max_seqs, wall,
                  n_out / wall, (n_out + n_in) / wall, percentiles(ttft),
                  percentiles(tpot), step, engine.cache.capacity_tokens, _peak_gib(dev),
                  prefill_ms=percentiles([s * 1e3 for s in prefill]),
                  prefill_tok_s=n_in / sum(prefill) if prefill else None)


def bench_hf(model_path: Path, prompts: list[list[int]], output_len: int, batch: int,
             device: torch.device, static: bool, progress: bool = True) -> Result:
    """HF transformers `generate` on the same prompts, `batch` at a time (equal lengths: no
    padding), exactly output_len greedy tokens each. static=True: a static KV cache, whose
    decode forward `generate` compiles ("reduce-overhead": CUDA graphs), HF's fast path."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              pad_token_id=0)
    caches: dict[int, object] = {}  # batch size -> its static cache
    if static:  # HF compiles the decode forward itself for a static cache (its own
        # CUDA-graph bookkeeping); compiling model.forward on top replays graphs whose outputs
        # the cache update then reads ("tensor output of CUDAGraphs ... overwritten", H200).
        # One cache of one length for every call: a cache sized per call (the TTFT probe's
        # 1 token, the run's output_len) recompiles inside the timed region (H100: 381 tok/s).
        from transformers import CompileConfig as HFCompileConfig
        from transformers import StaticCache
        length = len(prompts[0]) + output_len
        for size in {len(prompts[i:i + batch]) for i in range(0, len(prompts), batch)}:
            caches[size] = StaticCache(config=model.config, max_cache_len=length)
        kw["compile_config"] = HFCompileConfig(fullgraph=True, mode="reduce-overhead")
    name = "hf static+compile" if static else "hf eager"
    ids = torch.tensor(prompts, device=device)

    def generate(chunk, new_tokens):
        cache = caches.get(len(chunk))
        if cache is None:
            return model.generate(chunk, **{**kw, "max_new_tokens": new_tokens,
                                            "min_new_tokens": new_tokens})
        cache.reset()
        with warnings.catch_warnings():  # transformers 5.2x renames it `cache`; older: only this
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            return model.generate(chunk, past_key_values=cache, **{
                **kw, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
    with torch.inference_mode():  # warm-up (and compile: prefill and decode) untimed
        for size in caches or (batch,):  # each batch size a static cache is compiled for
            generate(ids[:size], output_len if static else 4)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ttft, tpot, wall = [], [], 0.0
        for i in tqdm(range(0, len(prompts), batch), desc=f"qbench {name}",
                      disable=not progress, leave=False):
            chunk = ids[i:i + batch]
            ts = time.perf_counter()  # a prefill probe, untimed in the throughput: TTFT
            generate(chunk, 1)
            _sync(device)
            t_first = time.perf_counter() - ts
            ts = time.perf_counter()
            out = generate(chunk, output_len)
            _sync(device)
            t_all = time.perf_counter() - ts
            if out.shape[1] != chunk.shape[1] + output_len:
                raise RuntimeError(f"HF generated {out.shape[1] - chunk.shape[1]} tokens, "
                                   f"not {output_len}")
            # a request of this batch waited for the batches before it, as in our queue
            ttft += [(wall + t_first) * 1e3] * len(chunk)
            tpot += [max(t_all - t_first, 0.0) * 1e3 / max(output_len - 1, 1)] * len(chunk)
            wall += t_all
    n_out = len(prompts) * output_len
    return Result(name, len(prompts), len(prompts[0]), output_len, batch, wall, n_out / wall,
                  (n_out + sum(map(len, prompts))) / wall, percentiles(ttft),
                  percentiles(tpot), {}, None, _peak_gib(device))


def table(results: list[Result]) -> str:
    head = ("| engine | prompts x in/out | batch | output tok/s | total tok/s | TTFT p50/p99 ms "
            "| TPOT p50/p99 ms | decode step p50/p99 ms | prefill step p50/p99 ms "
            "| prefill tok/s | KV tokens | peak GiB | load s | ours / it |")
    rows = [head, "|" + "---|" * 14]
    ours = results[0].output_tok_s
    for r in results:
        f = lambda d: f"{d['p50']:.1f} / {d['p99']:.1f}" if d else "-"  # noqa: E731
        rows.append(f"| {r.name} | {r.num_prompts} x {r.input_len}/{r.output_len} | {r.batch} "
                    f"| {r.output_tok_s:,.0f} | {r.total_tok_s:,.0f} | {f(r.ttft_ms)} "
                    f"| {f(r.tpot_ms)} | {f(r.step_ms)} | {f(r.prefill_ms)} "
                    f"| {'-' if r.prefill_tok_s is None else f'{r.prefill_tok_s:,.0f}'} "
                    f"| {r.kv_capacity_tokens or '-'} "
                    f"| {r.peak_mem_gib:.2f} | {'-' if r.load_s is None else f'{r.load_s:.1f}'} "
                    f"| {ours / r.output_tok_s:.2f} |")
    return "\n".join(rows)


def plot(results: list[Result], path: Path) -> None:
    """Output tokens/s per engine, and the TPOT p50 beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r.name for r in results]
    a.barh(names, [r.output_tok_s for r in results], color="tab:blue")
    a.set_xlabel("output tokens/s")
    b.barh(names, [r.tpot_ms.get("p50", 0) for r in results], color="tab:orange")
    b.set_xlabel("time per output token, p50 (ms)")
    r0 = results[0]
    fig.suptitle(f"qbench: {r0.num_prompts} prompts x {r0.input_len} in / {r0.output_len} out")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: list[Result], out: Path, stem: str, meta: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{stem}.json", out / f"{stem}.png"
    js.write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=1))
    plot(results, png)
    return js, png


def parser():
    from qcompile.compiler.cli_errors import OneLineParser
    p = OneLineParser(prog="qbench", description="Serving throughput and latency of an artifact "
                      "on synthetic prompts (EOS ignored, greedy), optionally beside HF "
                      "transformers on the same checkpoint and prompts.")
    p.add_argument("artifact", type=Path, nargs="?",
                   help="directory written by qcompile (not with --url)")
    p.add_argument("--url", help="client mode: drive the OpenAI-compatible server at this "
                   "base URL (e.g. http://127.0.0.1:8000/v1) instead of loading an artifact")
    p.add_argument("--model", help="client mode: model id (default: the server's first)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="client mode: Poisson arrivals, requests/s (default inf: all at once)")
    p.add_argument("--prompt-ids", type=int, default=1000,
                   help="client mode: prompt token ids are drawn below this (default 1000)")
    p.add_argument("--slo-ttft-ms", type=float, default=float("inf"),
                   help="client mode: goodput counts requests with TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=float("inf"),
                   help="client mode: goodput counts requests with TPOT at most this")
    p.add_argument("--device", default="cuda", help="cuda[:N] (default) or cpu")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens (default 1024)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests (default 64)")
    p.add_argument("--max-seqs", type=int, default=64,
                   help="sequences decoded at a time, ours and the peers' batch (default 64)")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="tokens per engine step (prefill chunking; default 4096)")
    p.add_argument("--kv-cache-gib", type=float,
                   help="KV cache size (default: 85%% of free GPU memory, 1 GiB on CPU)")
    p.add_argument("--peer", action="append", choices=PEERS, default=[],
                   help="also run HF transformers: hf-eager, hf-static (static cache + "
                        "torch.compile) or hf (both); repeatable")
    p.add_argument("--hf", type=Path,
                   help="HF checkpoint folder of the peers (default: the artifact's source)")
    add_compile_args(p, "no Inductor on the program's glue (default on cuda: compiled, its "
                        "compile time part of the load, not of the measurement)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="read each step's sampled ids before launching the next (default on "
                        "cuda: overlapped, the host's scheduling hidden behind the GPU's step)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly (default on cuda: CUDA graphs per "
                        "decode batch size, captured at load)")
    add_invariance_arg(p)
    p.add_argument("--seed", type=int, default=0, help="of the synthetic prompts (default 0)")
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder of qbench-<artifact>.json and .png (default .)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _peers(args) -> list[str]:
    names = []
    for p in args.peer:
        names += ["hf-eager", "hf-static"] if p == "hf" else [p]
    return list(dict.fromkeys(names))


def _run(args) -> int:
    if args.url:
        from .bench_client import run
        return run(args)
    if args.artifact is None:
        raise ValueError("give an ARTIFACT to load, or --url of a running server")
    from .device import parse_device
    from .engine import Engine
    for flag in ("input_len", "output_len", "num_prompts", "max_seqs", "max_batch_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, flag)}")
    if args.kv_cache_gib is not None and not args.kv_cache_gib > 0:
        raise ValueError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
    device = parse_device(args.device)
    if not args.artifact.is_dir():
        raise FileNotFoundError(f"{args.artifact}: no such artifact directory (make one with "
                                "`qcompile MODEL -o DIR`)")
    kv = int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None
    t_load = time.perf_counter()
    engine = Engine.load(args.artifact, device=device, kv_cache_bytes=kv, max_seqs=args.max_seqs,
                         max_batch_tokens=args.max_batch_tokens,
                         compile=compile_arg(args), batch_invariant=args.batch_invariant,
                         overlap=None if args.overlap else False,
                         cuda_graphs=None if device.type == "cuda" and not args.no_cuda_graphs
                         else False)
    load_s = time.perf_counter() - t_load
    if args.input_len + args.output_len > engine.max_seq_len:
        raise ValueError(f"--input-len + --output-len = {args.input_len + args.output_len} "
                         f"exceeds the artifact's {engine.max_seq_len} tokens per sequence: "
                         "shorten them or recompile with a larger --max-seq-len")
    peers = _peers(args)
    hf = args.hf or Path(engine.artifact.manifest.get("source", ""))
    if peers and not (hf / "config.json").is_file():
        raise FileNotFoundError(f"--peer needs a Hugging Face checkpoint folder; {hf} has no "
                                "config.json: pass --hf PATH")
    print(f"qbench: loaded {args.artifact} in {load_s:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in engine.load_times.items()) + ")", file=sys.stderr)
    prompts = synthetic_prompts(args.num_prompts, args.input_len,
                                engine.artifact.model.vocab_size, args.seed)
    c = engine.artifact.compile
    results = [bench_engine(engine, prompts, args.output_len,
                            f"qcompile {c.precision} kv {c.kv}"
                            + {True: " inductor", "aot": " aot"}.get(engine.compiled, "")
                            + (" overlap" if engine.overlap else "")
                            + (" batch-invariant" if engine.batch_invariant else ""),
                            progress=not args.quiet)]
    results[0].load_s = load_s
    del engine
    for peer in peers:  # a peer that fails costs its row, not our measurement
        try:
            results.append(bench_hf(hf, prompts, args.output_len, args.max_seqs, device,
                                    static=peer == "hf-static", progress=not args.quiet))
        except Exception as e:  # noqa: BLE001  (transformers / torch.compile errors of any kind)
            print(f"qbench: peer {peer} failed, left out: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    meta = dict(artifact=str(args.artifact), device=name, torch=torch.__version__)
    js, png = write(results, args.out, f"qbench-{args.artifact.name}"
                    + ("-invariant" if args.batch_invariant else ""), meta)
    print(f"{name}, torch {torch.__version__}; ours / it = our output tok/s over its\n")
    print(table(results))
    print(f"\nwrote {js} and {png}")
    return 0


def main(argv=None) -> int:
    from qcompile.compiler.cli_errors import run_cli
    args = parser().parse_args(argv)
    return run_cli("qbench", lambda: _run(args))
