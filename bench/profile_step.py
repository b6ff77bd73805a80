"""Where a decode step's GPU time goes: one artifact served on CUDA, `--batch` prompts of
`--input-len` random token ids prefilled, then one decode step profiled with torch.profiler:
replaying its CUDA graph, eagerly with the attention kernels, and eagerly with the attention
reference (same engine, consecutive steps); then one prefill step of fresh prompts (the
scheduler's token budget), where a serving benchmark's time to first token goes.

    python bench/profile_step.py ARTIFACT --batch 64 --input-len 1024 --out OUT [--compile]

Prints the load time, the unprofiled decode step (20 steps; the profiler itself about doubles
a replayed graph's wall time), and per profiled step: wall ms, GPU kernel ms by family
(attention = qc_attn*, GEMM = qc_w*, the rest: the glue), attention share, GPU busy fraction
(union of kernel intervals / wall; and for the unprofiled step, the first row's kernel time
over its wall, issue 13's "GPU busy"), kernel launches in all and per decoder layer, host
synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / blocking cudaMemcpy calls),
and the glue's kernels by GPU time (what fusion should remove). `--compile` loads with
Inductor on the glue (issue 13 item 4), to compare. Writes profile-step.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _family(name: str) -> str:
    if name.startswith("qc_attn"):
        if name.endswith(("_encode", "_encode_strided", "_store")):
            return "kv write"  # the records' encode and their store into pages
        return "attention"
    return "gemm" if name.startswith("qc_w") else "other"


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def profile_step(engine) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    times, spans, syncs, other, sync_calls = {}, [], 0, {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            fam = _family(e.name)
            us = e.time_range.elapsed_us()
            times[fam] = times.get(fam, 0.0) + us / 1e3
            spans.append((e.time_range.start, e.time_range.end))
            if fam == "other":  # the glue: which kernels, how many, how long
                n, t = other.get(e.name, (0, 0.0))
                other[e.name] = (n + 1, t + us)
        elif e.name in SYNCS:
            syncs += 1
            sync_calls[e.name] = sync_calls.get(e.name, 0) + 1
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    gpu = sum(times.values())
    top = sorted(other.items(), key=lambda kv: -kv[1][1])[:15]
    return {"wall_ms": wall, "gpu_ms": times, "attention_share": times.get("attention", 0) / gpu,
            "gpu_busy": busy / 1e3 / wall, "launches": len(spans), "host_syncs": syncs,
            # by call: this function's own cudaDeviceSynchronize (ending the timed region) is
            # one of them, the step's read of its sampled ids (cudaEventSynchronize) another
            "host_sync_calls": sync_calls,
            "other_kernels": [{"name": k[:120], "count": n, "us": round(t, 1)}
                              for k, (n, t) in top]}


def unprofiled_step_ms(engine, steps: int = 20) -> float:
    """Mean wall time of `steps` decode steps without the profiler (which slows a replayed
    graph's step about 2x)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--compile", action="store_true",
                   help="load with Inductor on the program's glue (Engine.load(compile=True))")
    args = p.parse_args(argv)
    from qcompile.runtime.engine import Engine
    from qcompile.runtime.sampler import SamplingParams
    t0 = time.perf_counter()
    engine = Engine.load(args.artifact, device="cuda", max_seqs=args.batch,
                         compile=args.compile)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 1000, (args.batch, args.input_len), generator=gen).tolist()
    reqs = engine._submit(prompts, False, SamplingParams(max_new_tokens=96, stop_on_eos=False))
    t0 = time.perf_counter()
    while any(r.computed < len(r.prompt) for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    for _ in range(2):
        engine.step()
    graphs, rows = engine.graphs, {}
    step_ms = unprofiled_step_ms(engine)
    if graphs is not None:
        rows["kernels, CUDA graph"] = profile_step(engine)
    engine.graphs = None  # eager steps: the same launches, one by one
    rows["kernels"] = profile_step(engine)
    engine.kernels.attention_on = False  # the reference attention (fallback path)
    rows["reference attention"] = profile_step(engine)
    engine.kernels.attention_on, engine.graphs = True, graphs
    # a prefill step (warm: the first prefill above compiled or tuned whatever it needed):
    # the scheduler's token budget of fresh prompts, one chunk each
    for r in reqs:
        engine.abort(r)
    n = max(1, engine.scheduler.max_batch_tokens // args.input_len)
    more = engine._submit(prompts[:n], False, SamplingParams(max_new_tokens=4,
                                                             stop_on_eos=False))
    prefill = profile_step(engine)
    prefill_tokens = n * min(args.input_len, engine.scheduler.max_batch_tokens)
    for r in more:
        engine.abort(r)
    layers = engine.artifact.model.num_layers
    print(f"load {load_s:.1f} s (compile={args.compile}); prefill of {args.batch} x "
          f"{args.input_len}: {prefill_s:.1f} s; decode step {step_ms:.2f} ms unprofiled "
          f"({'CUDA graphs' if graphs is not None else 'eager'})")
    print("| step | step ms (profiled) | GPU ms: attention / KV write / GEMM / other | attention "
          "share | GPU busy | launches | per layer | host syncs |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        g = r["gpu_ms"]
        print(f"| {name} | {r['wall_ms']:.1f} | {g.get('attention', 0):.2f} / "
              f"{g.get('kv write', 0):.2f} / {g.get('gemm', 0):.2f} / {g.get('other', 0):.2f} | "
              f"{r['attention_share']:.1%} | {r['gpu_busy']:.0%} | {r['launches']} | "
              f"{r['launches'] / layers:.0f} | {r['host_syncs']} "
              f"({', '.join(f'{k} {v}' for k, v in r['host_sync_calls'].items())}) |")
    # the profiler about doubles a replayed graph's wall, not its kernels' GPU time: busy
    # fraction of an unprofiled step = the first row's kernel time over the unprofiled wall
    busy_unprofiled = sum(next(iter(rows.values()))["gpu_ms"].values()) / step_ms
    print(f"\nGPU kernel time of the first row over the unprofiled step: "
          f"{sum(next(iter(rows.values()))['gpu_ms'].values()):.2f} / {step_ms:.2f} ms = "
          f"{busy_unprofiled:.0%} busy (one stream: kernels do not overlap)")
    g = prefill["gpu_ms"]
    print(f"\nprefill step ({prefill_tokens} tokens: {n} prompts): {prefill['wall_ms']:.1f} ms "
          f"profiled, GPU ms attention {g.get('attention', 0):.2f} / KV write "
          f"{g.get('kv write', 0):.2f} / GEMM {g.get('gemm', 0):.2f} / other "
          f"{g.get('other', 0):.2f}, GPU busy {prefill['gpu_busy']:.0%}, "
          f"{prefill['launches']} launches; its glue by GPU time:")
    for k in prefill["other_kernels"][:8]:
        print(f"  {k['us']:8.0f} us  x{k['count']:<4} {k['name'][:90]}")
    first = next(iter(rows.values()))
    print("\nglue kernels (\"other\") of the first row, by GPU time:\n| kernel | count | us |"
          "\n|---|---|---|")
    for k in first["other_kernels"]:
        print(f"| {k['name'][:90]} | {k['count']} | {k['us']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-step.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "artifact": str(args.artifact),
         "batch": args.batch, "input_len": args.input_len, "prefill_s": prefill_s,
         "load_s": load_s, "compile": args.compile, "step_ms_unprofiled": step_ms,
         "gpu_busy_unprofiled": busy_unprofiled,
         "rows": rows, "prefill": {"tokens": prefill_tokens, **prefill}}, indent=1))


if __name__ == "__main__":
    main()
