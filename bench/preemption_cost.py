"""What exact recomputation of preempted requests costs: one artifact served on a KV cache of
`--pages` pages with `--requests` requests at once, with the scheduler's recomputation (the
first computation's chunks again: prompt chunks, then one generated token per step) and with
the previous one (the whole history as one prefill chunk): steps, tokens computed,
preemptions and wall time of each, and whether the tokens agree.

    python bench/preemption_cost.py ARTIFACT --requests 100 --new-tokens 24 --pages 20
"""
from __future__ import annotations

import argparse
import time

import torch


def run(artifact, args, one_chunk: bool) -> dict:
    from qcompile.runtime.engine import Engine
    from qcompile.runtime.sampler import SamplingParams
    block = Engine.load(artifact).cache
    engine = Engine.load(artifact, kv_cache_bytes=block.bytes_per_block(block.spec) * args.pages)
    if one_chunk:  # the previous recomputation: everything not cached, one chunk
        engine.scheduler._next_end = lambda req, budget: min(req.num_tokens,
                                                             req.computed + budget)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(4 + i % 8)]
               for i in range(args.requests)]
    reqs = engine._submit(prompts, False, SamplingParams(max_new_tokens=args.new_tokens,
                                                         stop_on_eos=False))
    schedule, steps = engine.scheduler.schedule, []  # tokens computed per step

    def counted():
        chunks = schedule()
        steps.append(sum(c.end - c.start for c in chunks))
        return chunks
    engine.scheduler.schedule = counted
    t0 = time.perf_counter()
    while any(r.finish_reason is None for r in reqs):
        engine.step()
    return dict(steps=len(steps), tokens=sum(steps), seconds=time.perf_counter() - t0,
                preemptions=sum(r.preemptions for r in reqs), out=[r.out for r in reqs])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--pages", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| recomputation | steps | tokens computed | preemptions | seconds |\n"
          "|---|---|---|---|---|")
    results = {}
    for name, one_chunk in (("first computation's chunks", False), ("one chunk", True)):
        r = results[name] = run(args.artifact, args, one_chunk)
        print(f"| {name} | {r['steps']} | {r['tokens']} | {r['preemptions']} | "
              f"{r['seconds']:.1f} |")
    same = len({str(r["out"]) for r in results.values()}) == 1
    print(f"tokens {'equal' if same else 'differ'}")


if __name__ == "__main__":
    main()
