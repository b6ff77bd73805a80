"""Where a decode step's GPU time goes: one artifact served on CUDA, `--batch` prompts of
`--input-len` random token ids prefilled, then one decode step profiled with torch.profiler:
replaying its CUDA graph, eagerly with the attention kernels, and eagerly with the attention
reference (same engine, consecutive steps).

    python bench/profile_step.py ARTIFACT --batch 64 --input-len 1024 --out OUT

Prints per step: wall ms, GPU kernel ms by family (attention = qc_attn*, GEMM = qc_w*, the
rest), attention share, GPU busy fraction (union of kernel intervals / wall), kernel launches,
and host synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize / blocking
cudaMemcpy calls). Writes profile-step.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _family(name: str) -> str:
    if name.startswith("qc_attn"):
        return "encode" if name.endswith("_encode") else "attention"
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
    times, spans, syncs = {}, [], 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            fam = _family(e.name)
            times[fam] = times.get(fam, 0.0) + e.time_range.elapsed_us() / 1e3
            spans.append((e.time_range.start, e.time_range.end))
        elif e.name in SYNCS:
            syncs += 1
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    gpu = sum(times.values())
    return {"wall_ms": wall, "gpu_ms": times, "attention_share": times.get("attention", 0) / gpu,
            "gpu_busy": busy / 1e3 / wall, "launches": len(spans), "host_syncs": syncs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    from qcompile.runtime.engine import Engine
    from qcompile.runtime.sampler import SamplingParams
    engine = Engine.load(args.artifact, device="cuda", max_seqs=args.batch)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 1000, (args.batch, args.input_len), generator=gen).tolist()
    reqs = engine._submit(prompts, False, SamplingParams(max_new_tokens=64, stop_on_eos=False))
    t0 = time.perf_counter()
    while any(r.computed < len(r.prompt) for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    for _ in range(2):
        engine.step()
    graphs, rows = engine.graphs, {}
    if graphs is not None:
        rows["kernels, CUDA graph"] = profile_step(engine)
    engine.graphs = None  # eager steps: the same launches, one by one
    rows["kernels"] = profile_step(engine)
    engine.kernels.attention_on = False  # the reference attention (fallback path)
    rows["reference attention"] = profile_step(engine)
    engine.kernels.attention_on, engine.graphs = True, graphs
    print(f"prefill of {args.batch} x {args.input_len}: {prefill_s:.1f} s")
    print("| step | step ms | GPU ms: attention / encode / GEMM / other | attention share "
          "| GPU busy | launches | host syncs |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        g = r["gpu_ms"]
        print(f"| {name} | {r['wall_ms']:.1f} | {g.get('attention', 0):.2f} / "
              f"{g.get('encode', 0):.2f} / {g.get('gemm', 0):.2f} / {g.get('other', 0):.2f} | "
              f"{r['attention_share']:.1%} | {r['gpu_busy']:.0%} | {r['launches']} | "
              f"{r['host_syncs']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-step.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "artifact": str(args.artifact),
         "batch": args.batch, "input_len": args.input_len, "prefill_s": prefill_s,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
