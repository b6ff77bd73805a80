"""`qbench --url URL`: drive a running OpenAI-compatible server (qserve, vLLM, ...) at a request
rate, in the manner of `vllm bench serve`.

`--num-prompts` synthetic prompts of `--input-len` random token ids (below `--prompt-ids`, so
any vocabulary fits), sent to `/v1/completions` as streams, arrivals a Poisson process of
`--request-rate` requests/s (inf: all at once), each asking for exactly `--output-len` tokens
(`ignore_eos`, the vLLM extension qserve accepts too; greedy). Measured per request: time to
first token (first streamed text), time per output token after it, end-to-end latency (the
streams read with httpx, see `drive`); reported as p50 / p99 with request and output-token
throughput and the goodput: requests/s that met `--slo-ttft-ms` and `--slo-tpot-ms`. Writes
qbench-serve-<model>.json and a CDF plot of TTFT and TPOT.
"""
import asyncio
import json
import math
import random
import time
from pathlib import Path

from .bench import percentiles, synthetic_prompts


async def _one(client, model: str, prompt: list[int], output_len: int) -> dict:
    """One streamed completion: its TTFT, TPOT, latency and token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, text = None, 0, 0
    async with client.stream("POST", "completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error'].get('message')}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                text += 1
                if first is None:
                    first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    tokens = tokens or text
    return {"ttft_ms": (first - t0) * 1e3, "latency_ms": (end - t0) * 1e3, "tokens": tokens,
            "tpot_ms": (end - first) * 1e3 / (tokens - 1) if tokens > 1 else 0.0}


async def drive(url: str, model: str | None, prompts: list[list[int]], output_len: int,
                rate: float, seed: int = 0, progress: bool = True) -> tuple[str, list, float]:
    """(model id, per-request records, wall seconds): every prompt sent at Poisson arrivals
    of `rate` requests/s (math.inf: at once). The streams are read with httpx and parsed by
    hand, as vLLM's benchmark client does with aiohttp: the `openai` client's per-chunk
    models cost ~0.4 ms of client CPU per token, so with 64 streams the client, not the
    server, set the pace (2,100 tok/s; bench/serve_overhead.py)."""
    import httpx
    from tqdm import tqdm
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    client = httpx.AsyncClient(base_url=url.rstrip("/") + "/", timeout=3600, limits=limits)
    if model is None:
        model = (await client.get("models")).raise_for_status().json()["data"][0]["id"]
    rng = random.Random(seed)
    bar = tqdm(total=len(prompts), desc="qbench serve", unit="req", disable=not progress)

    async def tracked(p):
        try:
            return await _one(client, model, p, output_len)
        except Exception as e:  # noqa: BLE001  (an HTTP or server error: that request failed)
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            bar.update()
    t0 = time.perf_counter()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(tracked(p)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    records = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    bar.close()
    await client.aclose()
    return model, records, wall


def summarize(records: list[dict], wall: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    ok = [r for r in records if "error" not in r]
    good = [r for r in ok if r["ttft_ms"] <= slo_ttft_ms and r["tpot_ms"] <= slo_tpot_ms]
    out = sum(r["tokens"] for r in ok)
    return {"requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
            "wall_s": wall, "request_per_s": len(ok) / wall, "output_tok_s": out / wall,
            "output_tokens": out, "goodput_req_s": len(good) / wall,
            "ttft_ms": percentiles([r["ttft_ms"] for r in ok]),
            "tpot_ms": percentiles([r["tpot_ms"] for r in ok]),
            "latency_ms": percentiles([r["latency_ms"] for r in ok]),
            "errors": sorted({r["error"] for r in records if "error" in r})[:5]}


def run(args) -> int:
    for flag in ("input_len", "output_len", "num_prompts"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    prompts = synthetic_prompts(args.num_prompts, args.input_len, args.prompt_ids, args.seed)
    model, records, wall = asyncio.run(drive(args.url, args.model, prompts, args.output_len,
                                             args.request_rate, args.seed, not args.quiet))
    s = summarize(records, wall, args.slo_ttft_ms, args.slo_tpot_ms)
    f = lambda d: f"{d['p50']:.1f} / {d['p99']:.1f}" if d else "-"  # noqa: E731
    print(f"{args.url} ({model}): {s['completed']} of {s['requests']} requests at "
          f"{args.request_rate} req/s, {args.input_len} in / {args.output_len} out\n")
    print("| req/s | output tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | latency p50/p99 ms | "
          "goodput req/s |\n|---|---|---|---|---|---|")
    print(f"| {s['request_per_s']:.2f} | {s['output_tok_s']:,.0f} | {f(s['ttft_ms'])} | "
          f"{f(s['tpot_ms'])} | {f(s['latency_ms'])} | {s['goodput_req_s']:.2f} |")
    if s["failed"]:
        print(f"\n{s['failed']} requests failed: {'; '.join(s['errors'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"qbench-serve-{model.replace('/', '_')}"
    stem.with_suffix(".json").write_text(json.dumps({
        "url": args.url, "model": model, "request_rate": args.request_rate,
        "input_len": args.input_len, "output_len": args.output_len,
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, **s,
        "records": records}, indent=1))
    _plot(records, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.json and .png")
    return 0 if not s["failed"] else 1


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
        xs = sorted(r[key] for r in ok)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set(xlabel=key.replace("_ms", " (ms)").upper(), ylabel="fraction of requests",
               title=f"{key.split('_')[0].upper()} CDF")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
