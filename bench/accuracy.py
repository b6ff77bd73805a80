"""Accuracy table: perplexity of SmolLM2-135M-Instruct compiled at each precision, KV16 and KV4.

    python bench/accuracy.py [--rows REGEX] [--out DIR] [--stem NAME] [--num-seqs 24]
                             [--seq-len 512] [--kv fp16,int4] [--model PATH]
                             [--recipe PRECISION=STEPS ...]

Every row is compiled with qcompile's Python API (`compile_checkpoint`, `CompileConfig` with
`--dtype float32 --kernels skip`: the reference ops on the CPU) and scored with
`runtime/eval.py:perplexity`, by default on 24 x 512 tokens of pydoc text, as `qeval` does.
Rows are data (`MAIN`, `kv_ablation`, `ablation`): a name and CompileConfig keyword
arguments; RTN rows ask for `quantizer="rtn"` (the compiler's default is the best recipe);
the QoQ recipe of each precision is `QOQ_RECIPE`, the compiler's `QOQ_RECIPES` (`--recipe
w4a8=rotate,smooth,clip,gptq` replaces one for a run, e.g. to compare recipes). A row whose options this checkout does
not have (e.g. a step not in `compiler.config.QOQ_STEPS`) is shown as "not implemented".

Results are cached in <out>/<stem>.json, one entry per (row config, KV format, eval size,
model, qcompile git commit): a rerun skips what is done and recomputes after a new commit;
runs on one cache merge their results (e.g. two `--rows` subsets, one per core).
After every result it rewrites <stem>.md (main table: perplexity per KV format, change
against FP16 with the KV16 cache, compile seconds; ablation tables) and <stem>.png (grouped
bars KV16 / KV4 with FP16 and the targets as lines; the ablations beside). Progress goes to
stdout.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qcompile.compiler.config import QOQ_RECIPES

ROOT = Path(__file__).resolve().parents[1]
KVS = ("fp16", "int4")
FIXED = dict(dtype="float32", kernels="skip")  # every row: reference ops, exact CPU numerics

# The QoQ recipe per precision: the compiler's own (`--quantizer auto`), so the table
# measures what a default compile ships; `--recipe` replaces one for a run. Why each recipe
# (e.g. no smooth_attention) is in compiler/config.py and README's ablations.
QOQ_RECIPE = dict(QOQ_RECIPES)
LAST_IN_ABLATION = ("rotate", "gptq")  # added after the others, in this order
# (label, perplexity, KV format it applies to) drawn as dashed lines on the chart.
TARGETS = (("W8A8 KV16 target", 14.5, "fp16"), ("W4A8KV4 group target", 15.6, "int4"),
           ("W4A8KV4 per-channel target", 16.5, "int4"))


@dataclass(frozen=True)
class Row:
    name: str
    options: dict = field(hash=False)  # CompileConfig kwargs (kv and FIXED are added)
    kvs: tuple[str, ...] = KVS
    table: str = "main"


def qoq(precision: str, steps: str | None = None) -> dict:
    return dict(precision=precision, quantizer="qoq", qoq_steps=steps or QOQ_RECIPE[precision])


def rtn(precision: str, **options) -> dict:
    """Round-to-nearest, asked for explicitly: the compiler's default is the best recipe."""
    return dict(precision=precision, quantizer="rtn", **options)


def main_rows() -> list[Row]:
    return [
        Row("FP16", rtn("fp16")),
        Row("W8A8 RTN", rtn("w8a8")),
        Row("W8A8 SmoothQuant", qoq("w8a8")),
        Row("W4A16 g128 RTN", rtn("w4a16-g128")),
        Row("W4A8 RTN per-channel", rtn("w4a8")),
        Row("W4A8 QoQ per-channel", qoq("w4a8")),
        Row("W4A8 QoQ g128", qoq("w4a8-g128")),
        Row("W4A8 QoQ g64", qoq("w4a8-g64")),
    ]


def kv_ablation() -> list[Row]:
    """FP16 weights, KV4: the key rotation and the key centering (the default --kv int4),
    each alone and together."""
    table = "ablation KV4 keys, FP16 weights"
    return [Row(f"{table}: {name}", rtn("fp16", kv_rotation=rot, kv_key_centering=c),
                ("int4",), table)
            for name, rot, c in (("plain", "none", "none"), ("key rotation", "hadamard", "none"),
                                 ("key centering", "none", "mean"),
                                 ("key rotation + centering", "hadamard", "mean"))]


def ablation(precision: str, label: str) -> list[Row]:
    """KV4 rows: RTN without the key centering, then with it (`+center`), then the recipe's
    steps added one at a time, rotation and then GPTQ last; the last row is the whole
    recipe."""
    recipe = QOQ_RECIPE[precision].split(",")
    table = f"ablation {label}"
    rows, steps = [Row(f"{table}: RTN", rtn(precision, kv_key_centering="none"), ("int4",),
                       table),
                   Row(f"{table}: +center", rtn(precision), ("int4",), table)], []
    late = [s for s in LAST_IN_ABLATION if s in recipe]
    for step in [s for s in recipe if s not in late] + late:
        steps.append(step)
        order = [s for s in recipe if s in steps]  # the recipe's order
        rows.append(Row(f"{table}: +{step}", qoq(precision, ",".join(order)), ("int4",), table))
    return rows


def all_rows() -> list[Row]:
    return (main_rows() + kv_ablation() + ablation("w4a8", "W4A8 per-channel KV4")
            + ablation("w4a8-g64", "W4A8 g64 KV4"))


MAIN, ROWS = main_rows(), all_rows()


def config_of(row: Row, kv: str):
    """The row's CompileConfig, or the reason it cannot be built in this checkout."""
    from qcompile.compiler.config import CompileConfig
    try:
        return CompileConfig(**row.options, kv=kv, **FIXED)
    except (ValueError, TypeError) as e:
        return f"not implemented ({e})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def result_key(cfg, num_seqs: int, seq_len: int, model: str, commit: str) -> str:
    return json.dumps({"config": cfg.to_json(), "num_seqs": num_seqs, "seq_len": seq_len,
                       "model": model, "commit": commit}, sort_keys=True)


def evaluate(ckpt, cfg, num_seqs: int, seq_len: int) -> dict:
    """Compile into a temporary directory, score, clean up."""
    from qcompile.compiler.compile import compile_checkpoint
    from qcompile.runtime.engine import Engine
    from qcompile.runtime.eval import perplexity
    with tempfile.TemporaryDirectory(prefix="qacc-") as tmp:
        art = compile_checkpoint(ckpt, cfg, Path(tmp) / "art", progress=False)
        manifest = json.loads((art / "manifest.json").read_text())
        engine = Engine.load(art)
        r = perplexity(engine, num_seqs, seq_len, progress=False)
        del engine
        gc.collect()
    return {"perplexity": r.perplexity, "tokens": r.tokens, "eval_seconds": round(r.seconds, 1),
            "compile_seconds": manifest["compile_seconds"], "qoq": manifest.get("qoq")}


# ------------------------------------------------------------------------------------ reports

def _fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def _delta(p, ref) -> str:
    return "" if p is None or ref is None else f"{100 * (p / ref - 1):+.1f}%"


def _cell(cells: dict, row: Row, kv: str):
    """(perplexity or None, text for the table)."""
    c = cells.get((row.name, kv))
    if c is None:
        return None, "" if kv in row.kvs else "-"
    if "error" in c:
        return None, c["error"]
    return c["perplexity"], f"{c['perplexity']:.2f}"


def write_markdown(path: Path, rows: list[Row], cells: dict, meta: dict) -> None:
    ref = cells.get(("FP16", "fp16"), {}).get("perplexity")
    out = [f"# Accuracy: {meta['model']}", "",
           f"Perplexity on {meta['num_seqs']} x {meta['seq_len']} tokens of pydoc text "
           f"(`runtime/eval.py`, as `qeval`), `--dtype float32 --kernels skip` (reference ops, "
           f"CPU), qcompile {meta['commit']}, {meta['date']}. Change is against FP16 with the "
           f"KV16 cache ({_fmt(ref)}). QoQ recipes: "
           + "; ".join(f"{p}: {s}" for p, s in QOQ_RECIPE.items()) + ".", "",
           "| precision | KV16 ppl | KV4 ppl | KV16 vs FP16 | KV4 vs FP16 "
           "| compile s (KV16 / KV4) |",
           "|---|---|---|---|---|---|"]
    for row in [r for r in rows if r.table == "main"]:
        (p16, t16), (p4, t4) = _cell(cells, row, "fp16"), _cell(cells, row, "int4")
        secs = " / ".join(_fmt(cells.get((row.name, kv), {}).get("compile_seconds"), ".0f")
                          for kv in KVS)
        out.append(f"| {row.name} | {t16} | {t4} | {_delta(p16, ref)} | {_delta(p4, ref)} | "
                   f"{secs if secs != ' / ' else ''} |")
    for table in dict.fromkeys(r.table for r in rows if r.table != "main"):
        out += ["", f"## {table[0].upper()}{table[1:]}", "",
                "| step | QoQ steps | KV4 ppl | vs previous | vs FP16 | compile s |",
                "|---|---|---|---|---|---|"]
        prev = None
        for row in [r for r in rows if r.table == table]:
            p, text = _cell(cells, row, "int4")
            c = cells.get((row.name, "int4"), {})
            qoq_run = row.options.get("quantizer") == "qoq"
            steps = row.options.get("qoq_steps", "") if qoq_run else ""
            steps = steps or ("FP16" if row.options["precision"] == "fp16" else "RTN")
            kv = [f"{k.removeprefix('kv_')} {row.options[k]}"
                  for k in ("kv_rotation", "kv_key_centering") if k in row.options]
            out.append(f"| {row.name.split(': ', 1)[1]} | {', '.join([steps] + kv)} | {text} | "
                       f"{_delta(p, prev)} | {_delta(p, ref)} | "
                       f"{_fmt(c.get('compile_seconds'), '.0f')} |")
            prev = p if p is not None else prev
    path.write_text("\n".join(out) + "\n")


def write_plot(path: Path, rows: list[Row], cells: dict, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main = [r for r in rows if r.table == "main"]
    abl = [r for r in rows if r.table != "main"]
    fig, axes = plt.subplots(1, 2 if abl else 1, figsize=(16 if abl else 10, 6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if abl else [1]})
    ax = axes[0][0]
    ref = cells.get(("FP16", "fp16"), {}).get("perplexity")
    values = [v for r in main for kv in KVS if (v := _cell(cells, r, kv)[0]) is not None]
    top, low = (max(values), min(values)) if values else (1.0, 0.0)
    cap = min(top, 2.2 * ref) * 1.08 if ref else top * 1.08  # keep the good rows readable
    floor = 0.9 * min(low, *(t[1] for t in TARGETS)) if values else 0.0  # perplexity >= 1
    width = 0.38
    for j, (kv, label) in enumerate((("fp16", "KV16"), ("int4", "KV4"))):
        xs = [i + (j - 0.5) * width for i in range(len(main))]
        vals = [_cell(cells, r, kv)[0] for r in main]
        bars = ax.bar(xs, [min(v, cap) - floor if v is not None else 0 for v in vals], width,
                      bottom=floor, label=label, color=("tab:blue", "tab:orange")[j])
        for b, v in zip(bars, vals):
            if v is not None:
                ax.text(b.get_x() + b.get_width() / 2, min(v, cap), f"{v:.1f}", ha="center",
                        va="bottom", fontsize=7)
    for i, r in enumerate(main):
        if all(_cell(cells, r, kv)[0] is None for kv in KVS):
            text = _cell(cells, r, "fp16")[1] or _cell(cells, r, "int4")[1] or "not run"
            ax.text(i, floor, f" {text}", rotation=90, ha="center", va="bottom", fontsize=7)
    if ref:
        ax.axhline(ref, color="black", lw=1, label=f"FP16 KV16 ({ref:.2f})")
    for (label, value, _), color in zip(TARGETS, ("tab:green", "tab:purple", "tab:red")):
        ax.axhline(value, color=color, ls="--", lw=1, label=f"{label} <= {value}")
    ax.set_xticks(range(len(main)))
    ax.set_xticklabels([r.name for r in main], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"perplexity (lower is better; axis from {floor:.1f})")
    ax.set_ylim(floor, cap * 1.05)
    ax.set_title(f"{meta['model']}: {meta['num_seqs']} x {meta['seq_len']} pydoc tokens")
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    if abl:
        ax2 = axes[0][1]
        names = [r.name.removeprefix("ablation ") for r in abl]
        vals = [_cell(cells, r, "int4")[0] for r in abl]
        colors = ["tab:cyan" if "per-channel" in r.table else
                  "tab:gray" if "FP16 weights" in r.table else "tab:olive" for r in abl]
        known = [v for v in vals if v is not None]
        left = 0.9 * min(known + ([ref] if ref else [])) if known else 0.0
        ax2.barh(range(len(abl)), [v - left if v is not None else 0 for v in vals], left=left,
                 color=colors)
        for i, v in enumerate(vals):
            if v is not None:
                ax2.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax2.set_yticks(range(len(abl)))
        ax2.set_yticklabels(names, fontsize=7)
        ax2.invert_yaxis()
        if ref:
            ax2.axvline(ref, color="black", lw=1)
        ax2.set_xlabel(f"KV4 perplexity (axis from {left:.1f})")
        ax2.set_title("QoQ ablation (steps added one at a time)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="regex (case-insensitive) on row names; default: every row")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "accuracy", help="output folder")
    p.add_argument("--stem", default="accuracy", help="file name stem of .json/.md/.png")
    p.add_argument("--num-seqs", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kv", default=",".join(KVS), help="KV formats to run (fp16,int4)")
    p.add_argument("--model", type=Path, help="checkpoint (HF folder, .gguf) with its tokenizer; "
                   "default: the bundled SmolLM2-135M-Instruct GGUF")
    p.add_argument("--recipe", action="append", default=[], metavar="PRECISION=STEPS",
                   help="replace QOQ_RECIPE[PRECISION] for this run (repeatable), e.g. "
                   "w4a8=rotate,smooth,clip,gptq")
    p.add_argument("--commit", help="qcompile commit the results are keyed by (default: HEAD); "
                   "e.g. to finish or report a table that runs started at that commit while "
                   "others committed unrelated files")
    p.add_argument("--report", action="store_true", help="compile nothing: write the table "
                   "and chart from the cached results (rows without one stay empty)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    return p.parse_args(argv)


def _load_cache(path: Path) -> dict:
    return json.loads(path.read_text())["results"] if path.exists() else {}


def _save_cache(path: Path, results: dict, meta: dict) -> None:
    """Merge into the file's results under a lock: two runs (e.g. `--rows` halves on two
    cores) may share one cache."""
    import fcntl
    folder = os.open(path.parent, os.O_RDONLY)  # the lock: no lock file left behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        results.update({k: v for k, v in _load_cache(path).items() if k not in results})
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        os.close(folder)  # releases the lock


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = ROWS
    if args.recipe:
        for item in args.recipe:
            precision, _, steps = item.partition("=")
            if precision not in QOQ_RECIPE or not steps:
                print(f"accuracy: bad --recipe {item!r} (precisions: {', '.join(QOQ_RECIPE)})",
                      file=sys.stderr)
                return 2
            QOQ_RECIPE[precision] = steps
        rows = all_rows()
    rows = [r for r in rows if not args.rows or re.search(args.rows, r.name, re.IGNORECASE)]
    kvs = [k for k in args.kv.split(",") if k]
    if set(kvs) - set(KVS) or not rows:
        print(f"accuracy: nothing to run (rows {args.rows!r}, kv {args.kv!r})", file=sys.stderr)
        return 2
    if args.list:
        for r in rows:
            print(f"{r.name:45s} kv={','.join(r.kvs):10s} {r.options}")
        return 0
    from qcompile.models.loaders import default_model_path, load_checkpoint
    model = args.model or default_model_path()
    commit = args.commit or git_commit()
    meta = {"model": model.stem if model.suffix else model.name, "num_seqs": args.num_seqs,
            "seq_len": args.seq_len, "commit": commit, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / f"{args.stem}.json"
    results = _load_cache(cache_path)
    ckpt, cells, failed = None, {}, 0
    todo = [(r, kv) for r in rows for kv in r.kvs if kv in kvs]
    for i, (row, kv) in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {row.name} kv={kv}"
        cfg = config_of(row, kv)
        if isinstance(cfg, str):
            cells[(row.name, kv)] = {"error": "not implemented"}
            print(f"{tag}: {cfg}", flush=True)
            continue
        key = result_key(cfg, args.num_seqs, args.seq_len, meta["model"], commit)
        if key in results:
            cells[(row.name, kv)] = results[key]
            print(f"{tag}: cached, ppl {results[key]['perplexity']:.3f}", flush=True)
            continue
        if args.report:
            print(f"{tag}: not in the cache", flush=True)
            continue
        print(f"{tag}: compiling ...", flush=True)
        ckpt = ckpt or load_checkpoint(model)
        t0 = time.perf_counter()
        try:
            res = evaluate(ckpt, cfg, args.num_seqs, args.seq_len)
        except Exception as e:  # noqa: BLE001 -- report the row as failed, run the others
            failed += 1
            cells[(row.name, kv)] = {"error": f"error: {type(e).__name__}"}
            print(f"{tag}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        if not math.isfinite(res["perplexity"]):
            failed += 1
        res.update(row=row.name, kv=kv, config=cfg.to_json(), commit=commit)
        results[key] = cells[(row.name, kv)] = res
        _save_cache(cache_path, results, meta)
        print(f"{tag}: ppl {res['perplexity']:.3f} (compile {res['compile_seconds']:.0f} s, "
              f"eval {res['eval_seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s)",
              flush=True)
        write_markdown(args.out / f"{args.stem}.md", rows, cells, meta)
    _save_cache(cache_path, results, meta)
    write_markdown(args.out / f"{args.stem}.md", rows, cells, meta)
    write_plot(args.out / f"{args.stem}.png", rows, cells, meta)
    print((args.out / f"{args.stem}.md").read_text(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
