"""The HTTP layer's own ceiling: qserve's app (runtime/server.py) around a stand-in engine whose
step costs a fixed time, driven by `qbench --url`'s client in another process.

On an H100, qserve on the 1B shape served 64 x 1024/128 at 16 req/s against ~90 offline with
the same engine, its step 18.6 ms on average in the server against ~4.7 offline
(bench/results/gpu-h100-2026-12-07e.md, before the server changes it measured). This
separates what the server adds from the engine: the stand-in holds the GIL for --cpu-ms a
step (the engine's host work) and releases it for --gpu-ms (waiting on the GPU), emits one
random token per running request and step, and finishes a request after its max_tokens.
Needs no GPU and no model: only a tokenizer (an artifact's, for realistic detokenization).

    python bench/serve_overhead.py ARTIFACT [--num-prompts 64 --output-len 128 --cpu-ms 0.5
        --gpu-ms 1.5 --stream-interval 1]

Prints the client's table (req/s, TTFT / TPOT) beside the ideal (every step at cpu + gpu ms)
and the server's mean step time (its /metrics).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace


class StandInEngine:
    """What runtime/server.py's EngineLoop and app use of an Engine, with a fixed step cost."""

    def __init__(self, tokenizer, cpu_s: float, gpu_s: float, max_seqs: int):
        self.tokenizer, self.cpu_s, self.gpu_s, self.max_seqs = tokenizer, cpu_s, gpu_s, max_seqs
        self.max_seq_len = 1 << 20
        self.scheduler = SimpleNamespace(waiting=[], running=[])
        self.cache = SimpleNamespace(num_blocks=1 << 16, free_blocks=1 << 16)
        self.ids = itertools.count()
        self.rng = random.Random(0)
        self.vocab = min(len(tokenizer), 32000)
        self.artifact = SimpleNamespace(model=SimpleNamespace(vocab_size=len(tokenizer)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def submit(self, prompts, params, chat: bool = False):
        reqs = [SimpleNamespace(id=next(self.ids), prompt=list(p), out=[], finish_reason=None,
                                preemptions=0, max_new=params.max_new_tokens) for p in prompts]
        self.scheduler.waiting.extend(reqs)
        return reqs

    def abort(self, req) -> None:
        if req.finish_reason is None:
            req.finish_reason = "abort"
        for q in (self.scheduler.waiting, self.scheduler.running):
            if req in q:
                q.remove(req)

    def step(self):
        s = self.scheduler
        while s.waiting and len(s.running) < self.max_seqs:
            s.running.append(s.waiting.pop(0))
        end = time.perf_counter() + self.cpu_s
        while time.perf_counter() < end:  # host work: holds the GIL
            pass
        time.sleep(self.gpu_s)            # the GPU's share: the GIL is free
        for r in list(s.running):
            r.out.append(self.rng.randrange(self.vocab))
            if len(r.out) >= r.max_new:
                r.finish_reason = "length"
                s.running.remove(r)
        return []


def stand_in(artifact: str, cpu_s: float, gpu_s: float, max_seqs: int) -> StandInEngine:
    from transformers import AutoTokenizer
    return StandInEngine(AutoTokenizer.from_pretrained(Path(artifact) / "tokenizer"), cpu_s,
                         gpu_s, max_seqs)


def serve(args) -> None:
    import functools

    import uvicorn

    from qcompile.runtime.engine_process import EngineProcess
    from qcompile.runtime.server import create_app
    make = functools.partial(stand_in, args.artifact, args.cpu_ms / 1e3, args.gpu_ms / 1e3,
                             args.num_prompts)
    engine = make() if args.engine_thread else EngineProcess(make)
    uvicorn.run(create_app(engine, "stand-in", stream_interval=args.stream_interval),
                host="127.0.0.1", port=args.port, log_level="warning")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (Linux /proc): the server
    and its engine process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir()
            for k in (t / "children").read_text().split()]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + \
        sum(_cpu_seconds(k) for k in kids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", help="a qcompile artifact (its tokenizer/ folder is used)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--cpu-ms", type=float, default=0.5, help="host time of a step (GIL held)")
    p.add_argument("--gpu-ms", type=float, default=1.5, help="GPU time of a step (GIL free)")
    p.add_argument("--port", type=int, default=8131)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk after the first (qserve's option)")
    p.add_argument("--engine-thread", action="store_true",
                   help="the stand-in on a thread of the server's process (qserve "
                        "--engine-thread), not in a process of its own")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
        return 0
    from qcompile.runtime.bench import synthetic_prompts
    from qcompile.runtime.bench_client import drive, summarize
    server = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--serve"],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        prompts = synthetic_prompts(args.num_prompts, args.input_len, 100, 0)
        cpu0, srv0 = time.process_time(), _cpu_seconds(server.pid)
        _, records, wall = asyncio.run(drive(base + "/v1", None, prompts, args.output_len,
                                             float("inf"), progress=False))
        s = summarize(records, wall, float("inf"), float("inf"))
        cpu = {"client": time.process_time() - cpu0, "server": _cpu_seconds(server.pid) - srv0}
        metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    finally:
        server.terminate()
        server.wait()
    m = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
         if ln and not ln.startswith("#")}
    steps = m["qcompile_step_seconds_count"]
    ideal = args.num_prompts / (args.output_len * (args.cpu_ms + args.gpu_ms) / 1e3)
    where = "a thread of the server" if args.engine_thread else "its own process"
    print(f"{args.num_prompts} x {args.input_len}/{args.output_len}, step {args.cpu_ms} ms host "
          f"+ {args.gpu_ms} ms GPU, the engine in {where}\n")
    print("| req/s | ideal req/s | output tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | "
          "server step ms (mean) | steps | CPU busy: server / client |\n"
          "|---|---|---|---|---|---|---|---|")
    if s["failed"]:
        print(f"{s['failed']} requests failed: {'; '.join(s['errors'])}")
    f = lambda d: f"{d['p50']:.1f} / {d['p99']:.1f}" if d else "-"  # noqa: E731
    print(f"| {s['request_per_s']:.1f} | {ideal:.1f} | {s['output_tok_s']:,.0f} | "
          f"{f(s['ttft_ms'])} | {f(s['tpot_ms'])} | "
          f"{1e3 * m['qcompile_step_seconds_sum'] / max(steps, 1):.2f} | {steps:.0f} | "
          f"{cpu['server'] / wall:.0%} / {cpu['client'] / wall:.0%} |")
    return 0 if not s["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
