"""Accuracy table: perplexity of SmolLM2-135M-Instruct compiled at each precision, KV16 and KV4,
on several kinds of English text, none of which the calibration saw.

    python bench/accuracy.py [--rows REGEX] [--sources NAME,NAME,...] [--out DIR] [--stem NAME]
                             [--num-seqs 24] [--seq-len 512] [--kv fp16,int4] [--model PATH]
                             [--recipe PRECISION=STEPS ...]

Every row is compiled with qcompile's Python API (`compile_checkpoint`, `CompileConfig` with
`--dtype float32 --kernels skip`: the reference ops on the CPU) and scored with
`runtime/eval.py:perplexity` on each evaluation source (`runtime/texts.py: EVAL_SOURCES`:
pydoc, cpython-prose, package-readmes), by default 24 windows of 512 tokens from the front of
each, as `qeval` does. Calibration never reads a scored source: QoQ and the key means of
`--kv int4` calibrate on `CompileConfig.calib_source` (a `texts.CALIB_SOURCES` text), and a row
calibrated on a scored source (the `calibration` table's "pydoc" rows) has that cell left out
("calib"), so no figure here is measured on the calibration's own kind of text. The change is
against FP16 with the KV16 cache on the same source; the table shows each source's, their mean
and the worst (the figure the targets bound).

Rows are data (`MAIN`, `calibration_rows`, `kv_ablation`, `ablation`): a name and CompileConfig
keyword arguments; RTN rows ask for `quantizer="rtn"` (the compiler's default is the best
recipe); the QoQ recipe of each precision is `QOQ_RECIPE`, the compiler's `QOQ_RECIPES`
(`--recipe w4a8=rotate,smooth,clip,gptq` replaces one for a run). A row whose options this
checkout does not have is shown as "not implemented".

Results are cached in <out>/<stem>.json, one entry per (row config, KV format, source and the
sha256 of its text, eval size, model, qcompile git commit): a rerun skips what is done,
recomputes after a new commit or when a source's text changed (a package upgrade), and runs on
one cache merge their results (e.g. two `--rows` subsets). After every row it rewrites
<stem>.md (tables) and <stem>.png (chart). Progress goes to stdout.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
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
from qcompile.runtime.texts import EVAL_SOURCES, SourceMissing, read_source

ROOT = Path(__file__).resolve().parents[1]
KVS = ("fp16", "int4")
FIXED = dict(dtype="float32", kernels="skip")  # every row: reference ops, exact CPU numerics

# The QoQ recipe per precision: the compiler's own (`--quantizer auto`), so the table
# measures what a default compile ships; `--recipe` replaces one for a run.
QOQ_RECIPE = dict(QOQ_RECIPES)
LAST_IN_ABLATION = ("rotate", "gptq")  # added after the others, in this order
# Issue 14's bounds on the worst scored source, % over FP16 KV16: (row, KV format, bound).
TARGETS = (("W8A8 SmoothQuant", "fp16", 4.0), ("W4A8 QoQ g64", "int4", 12.0),
           ("W4A8 QoQ per-channel", "int4", 16.0))


@dataclass(frozen=True)
class Row:
    name: str
    options: dict = field(hash=False)  # CompileConfig kwargs (kv and FIXED are added)
    kvs: tuple[str, ...] = KVS
    table: str = "main"


# Every row's linears at its precision and its LM head float, as the rows measured before the
# defaults kept a share of W4A8 linears at W8A8 and made the head W8A8, unless it says otherwise
# (the "default" rows: the compiler's own choices, int8_linears None and lm_head auto).
PLAIN = {"int8_linears": 0.0, "lm_head": "float"}
DEFAULTS = {"int8_linears": None, "lm_head": "auto"}


def qoq(precision: str, steps: str | None = None, **options) -> dict:
    """The QoQ recipe (PLAIN unless `options` say otherwise)."""
    return dict(precision=precision, quantizer="qoq", qoq_steps=steps or QOQ_RECIPE[precision],
                **{**PLAIN, **options})


def rtn(precision: str, **options) -> dict:
    """Round-to-nearest, asked for explicitly: the compiler's default is the best recipe (PLAIN
    unless `options` say otherwise)."""
    return dict(precision=precision, quantizer="rtn", **{**PLAIN, **options})


def main_rows() -> list[Row]:
    return [
        Row("FP16", rtn("fp16")),
        Row("W8A8 RTN", rtn("w8a8")),
        Row("W8A8 SmoothQuant", qoq("w8a8")),
        Row("W4A16 g128 RTN", rtn("w4a16-g128")),
        Row("W4A8 RTN per-channel", rtn("w4a8")),
        Row("W4A8 QoQ per-channel", qoq("w4a8")),
        Row("W4A8 QoQ per-channel, default (20% W8A8)", qoq("w4a8", **DEFAULTS)),
        Row("W4A8 QoQ per-channel, W8A8 LM head", qoq("w4a8", lm_head="w8a8")),
        Row("W4A8 QoQ g128", qoq("w4a8-g128")),
        Row("W4A8 QoQ g64", qoq("w4a8-g64")),
        Row("W4A8 QoQ g64, default (30% W8A8)", qoq("w4a8-g64", **DEFAULTS)),
        Row("W4A4 FMPQ", qoq("w4a4")),
    ]


def fmpq_rows() -> list[Row]:
    """COMET's W4A4 (issue 15), KV4: the share of 8-bit activation blocks from none (every
    block int4, channels still permuted) to all (W4A8 with per-block scales), round to
    nearest with every block int4 (no calibration, no permutation), and the ablations of the
    fmpq step's parts (w_down's rotation, the 4-bit clip, the channel permutation)."""
    table = "FMPQ W4A4 KV4, int8 block share"
    return ([Row(f"{table}: RTN, all int4", rtn("w4a4"), ("int4",), table)]
            + [Row(f"{table}: {f:.1%}", qoq("w4a4", fmpq_int8_fraction=f), ("int4",), table)
               for f in (0.0, 0.125, 0.25, 0.5, 1.0)]
            # the ablations of w_down's run-time block rotation and of the 4-bit clip search
            # (compiler/fmpq.py)
            + [Row(f"{table}: {f:.1%}, no w_down rotation",
                   qoq("w4a4", fmpq_int8_fraction=f, fmpq_down_rotation="none",
                       fmpq_a4_clip="none"), ("int4",), table) for f in (0.0, 0.25)]
            + [Row(f"{table}: 25.0%, 4-bit clip {c}",
                   qoq("w4a4", fmpq_int8_fraction=0.25, fmpq_a4_clip=c), ("int4",), table)
               for c in ("none", "0.9")]
            # FMPQ's channel permutation (issue 15's ablation): the int8 blocks are then
            # whichever channels lead in the model's own order
            + [Row(f"{table}: 25.0%, no permutation",
                   qoq("w4a4", fmpq_int8_fraction=0.25, fmpq_permute="none"), ("int4",), table)])


def int8_rows() -> list[Row]:
    """W4A8 KV4 with the share of the decoder linears' weights kept at W8A8 where 4 bits cost
    the most (`--int8-linears`, compiler/sensitivity.py); 0% is the main table's plain row,
    the compiler's default share its "default" row."""
    table = "W4A8 KV4, int8 linear share"
    return [Row(f"{table}: {label}, {f:.0%}", qoq(p, int8_linears=f), ("int4",), table)
            for p, label, shares in (("w4a8", "per-channel", (0.1, 0.2, 0.3)),
                                     ("w4a8-g64", "g64", (0.1, 0.2, 0.3)))
            for f in shares]


def calibration_rows() -> list[Row]:
    """The W4A8 KV4 recipes calibrated on each calibration text (the default's is the main
    table's row), and on pydoc: the old default, whose pydoc cell is left out."""
    from qcompile.compiler.config import CALIB_CHOICES, CompileConfig
    default = CompileConfig().calib_source
    table = "calibration, W4A8 KV4"
    return [Row(f"{table}: {label}, {src}", qoq(p, calib_source=src), ("int4",), table)
            for p, label in (("w4a8", "per-channel"), ("w4a8-g64", "g64"))
            for src in CALIB_CHOICES if src != default]


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
    return (main_rows() + fmpq_rows() + int8_rows() + calibration_rows() + kv_ablation()
            + ablation("w4a8", "W4A8 per-channel KV4") + ablation("w4a8-g64", "W4A8 g64 KV4"))


MAIN, ROWS = main_rows(), all_rows()


def config_of(row: Row, kv: str):
    """The row's CompileConfig, or the reason it cannot be built in this checkout."""
    from qcompile.compiler.config import CompileConfig
    try:
        return CompileConfig(**row.options, kv=kv, **FIXED)
    except (ValueError, TypeError) as e:
        return f"not implemented ({e})"


def calibrated_on(cfg) -> str | None:
    """The text source the compile calibrates on, or None where nothing calibrates (RTN
    weights with the KV16 cache or without key centering)."""
    if cfg.quantizer == "qoq" or cfg.centers_keys:
        return cfg.calib_text or cfg.calib_source
    return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def result_key(cfg, source: str, digest: str, num_seqs: int, seq_len: int, model: str,
               commit: str) -> str:
    return json.dumps({"config": cfg.to_json(), "source": source, "text_sha256": digest,
                       "num_seqs": num_seqs, "seq_len": seq_len, "model": model,
                       "commit": commit}, sort_keys=True)


def evaluate(ckpt, cfg, sources: dict[str, str], num_seqs: int, seq_len: int) -> dict:
    """Compile into a temporary directory, score on each source, clean up:
    {source: result}."""
    from qcompile.compiler.compile import compile_checkpoint
    from qcompile.runtime.engine import Engine
    from qcompile.runtime.eval import perplexity
    out = {}
    with tempfile.TemporaryDirectory(prefix="qacc-") as tmp:
        art = compile_checkpoint(ckpt, cfg, Path(tmp) / "art", progress=False)
        manifest = json.loads((art / "manifest.json").read_text())
        engine = Engine.load(art)
        for name, text in sources.items():
            r = perplexity(engine, num_seqs, seq_len, progress=False, text=text, name=name)
            out[name] = {"perplexity": r.perplexity, "tokens": r.tokens,
                         "eval_seconds": round(r.seconds, 1),
                         "compile_seconds": manifest["compile_seconds"],
                         "qoq": manifest.get("qoq")}
        del engine
        gc.collect()
    return out


# ------------------------------------------------------------------------------------ reports

def _fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def _pct(p, ref) -> float | None:
    return None if p is None or ref is None else 100 * (p / ref - 1)


def _cell(cells: dict, row: Row, kv: str, src: str):
    """(perplexity or None, text for the table)."""
    c = cells.get((row.name, kv, src))
    if c is None:
        return None, "" if kv in row.kvs else "-"
    if "error" in c:
        return None, c["error"]
    return c["perplexity"], f"{c['perplexity']:.2f}"


def _spread(cells, row, kv, sources, refs):
    """(per-source change %, mean change, (worst change, its source)) against FP16 KV16."""
    ch = {s: _pct(_cell(cells, row, kv, s)[0], refs.get(s)) for s in sources}
    known = {s: v for s, v in ch.items() if v is not None}
    if not known:
        return ch, None, (None, "")
    worst = max(known, key=known.get)
    return ch, sum(known.values()) / len(known), (known[worst], worst)


def _seconds(cells, row, kv, sources) -> str:
    secs = {cells.get((row.name, kv, s), {}).get("compile_seconds") for s in sources} - {None}
    return _fmt(min(secs), ".0f") if secs else ""


def write_markdown(path: Path, rows: list[Row], cells: dict, meta: dict) -> None:
    sources = meta["sources"]
    refs = {s: _cell(cells, Row("FP16", {}), "fp16", s)[0] for s in sources}
    head = "| " + " | ".join(sources) + " |"
    out = [f"# Accuracy: {meta['model']}", "",
           f"Perplexity on {meta['num_seqs']} x {meta['seq_len']} tokens of each source "
           f"(`runtime/eval.py`, as `qeval --text`; sources in `runtime/texts.py`: "
           + "; ".join(f"{s}: {meta['source_tokens'].get(s, '?')} tokens, sha256 "
                       f"{meta['source_sha256'].get(s, '?')[:12]}" for s in sources)
           + f"), `--dtype float32 --kernels skip` (reference ops, CPU), qcompile "
           f"{meta['commit']}, {meta['date']}. Calibration never reads a scored source (a "
           "cell that would is `calib`). Change is against FP16 with the KV16 cache on the same "
           "source (" + ", ".join(f"{s} {_fmt(refs[s])}" for s in sources) + "); `worst` is "
           "the largest change over the sources. QoQ recipes: "
           + "; ".join(f"{p}: {s}" for p, s in QOQ_RECIPE.items()) + ".", "",
           "| precision | KV |" + head.removeprefix("|").removesuffix(" |")
           + " | mean | worst | compile s |",
           "|---|---|" + "---|" * len(sources) + "---|---|---|"]
    for row in [r for r in rows if r.table == "main"]:
        for kv, label in (("fp16", "16"), ("int4", "4")):
            if kv not in row.kvs:
                continue
            ch, mean, (worst, wsrc) = _spread(cells, row, kv, sources, refs)
            texts = []
            for s in sources:
                text = _cell(cells, row, kv, s)[1]
                texts.append(f"{text} ({ch[s]:+.1f}%)" if ch[s] is not None else text)
            out.append(f"| {row.name} | {label} | " + " | ".join(texts)
                       + f" | {_fmt(mean, '+.1f')}{'%' if mean is not None else ''} | "
                       + (f"{worst:+.1f}% {wsrc}" if worst is not None else "")
                       + f" | {_seconds(cells, row, kv, sources)} |")
    for table in dict.fromkeys(r.table for r in rows if r.table != "main"):
        out += ["", f"## {table[0].upper()}{table[1:]}", "",
                "| step | QoQ steps |" + head.removeprefix("|").removesuffix(" |")
                + " | mean | vs previous | worst | compile s |",
                "|---|---|" + "---|" * len(sources) + "---|---|---|---|"]
        prev = None
        for row in [r for r in rows if r.table == table]:
            ch, mean, (worst, wsrc) = _spread(cells, row, "int4", sources, refs)
            qoq_run = row.options.get("quantizer") == "qoq"
            steps = row.options.get("qoq_steps", "") if qoq_run else ""
            steps = steps or ("FP16" if row.options["precision"] == "fp16" else "RTN")
            extra = [f"{k.removeprefix('kv_')} {row.options[k]}"
                     for k in ("kv_rotation", "kv_key_centering", "calib_source")
                     if k in row.options]
            texts = [f"{ch[s]:+.1f}%" if ch[s] is not None else _cell(cells, row, "int4", s)[1]
                     for s in sources]
            step = f"{mean - prev:+.1f}" if mean is not None and prev is not None else ""
            out.append(f"| {row.name.split(': ', 1)[1]} | {', '.join([steps] + extra)} | "
                       + " | ".join(texts) + f" | {_fmt(mean, '+.1f')} | {step} | "
                       + (f"{worst:+.1f}% {wsrc}" if worst is not None else "")
                       + f" | {_seconds(cells, row, 'int4', sources)} |")
            prev = mean if mean is not None else prev
    path.write_text("\n".join(out) + "\n")


def write_plot(path: Path, rows: list[Row], cells: dict, meta: dict) -> None:
    """Left: the main rows' change against FP16 KV16 on each source (KV16 and KV4 bars side by
    side, the worst source marked), with the targets. Right: the ablations' mean and worst."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sources = meta["sources"]
    refs = {s: _cell(cells, Row("FP16", {}), "fp16", s)[0] for s in sources}
    main = [r for r in rows if r.table == "main"]
    abl = [r for r in rows if r.table != "main"]
    fig, axes = plt.subplots(1, 2 if abl else 1, figsize=(16 if abl else 10, 6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if abl else [1]})
    ax, width = axes[0][0], 0.8 / (2 * len(sources))
    cap = 60.0  # % (W4A8 RTN is ~+100%: capped so that the good rows stay readable)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
    for j, kv in enumerate(KVS):
        for k, s in enumerate(sources):
            xs = [i + (j * len(sources) + k) * width - 0.4 + width / 2 for i in range(len(main))]
            vals = [_spread(cells, r, kv, sources, refs)[0][s] for r in main]
            ax.bar(xs, [min(v, cap) if v is not None else 0 for v in vals], width,
                   color=colors[k % len(colors)], alpha=0.55 if kv == "fp16" else 1.0,
                   label=f"{s} {'KV16' if kv == 'fp16' else 'KV4'}")
            for x, v in zip(xs, vals):
                if v is not None and v > cap:
                    ax.text(x, cap, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
    for (name, kv, bound), color in zip(TARGETS, ("tab:green", "tab:purple", "tab:red")):
        ax.axhline(bound, color=color, ls="--", lw=1,
                   label=f"{name} {'KV16' if kv == 'fp16' else 'KV4'} worst <= +{bound:.0f}%")
    ax.set_xticks(range(len(main)))
    ax.set_xticklabels([r.name for r in main], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("perplexity change vs FP16 KV16, % (light: KV16, dark: KV4)")
    ax.set_ylim(0, cap * 1.08)
    ax.set_title(f"{meta['model']}: {meta['num_seqs']} x {meta['seq_len']} tokens per source, "
                 "calibration on none of them")
    ax.legend(fontsize=6, loc="upper left", framealpha=0.9, ncol=2)
    if abl:
        ax2 = axes[0][1]
        names = [r.name.removeprefix("ablation ") for r in abl]
        spread = [_spread(cells, r, "int4", sources, refs) for r in abl]
        means = [m if m is not None else 0 for _, m, _ in spread]
        ax2.barh(range(len(abl)), [min(m, cap) for m in means], color="tab:gray",
                 label="mean over the sources")
        ax2.scatter([min(w, cap) if w is not None else 0 for _, _, (w, _) in spread],
                    range(len(abl)), color="tab:red", marker="|", s=80, label="worst source")
        ax2.set_yticks(range(len(abl)))
        ax2.set_yticklabels(names, fontsize=6)
        ax2.invert_yaxis()
        ax2.set_xlim(0, cap * 1.05)
        ax2.set_xlabel("KV4 perplexity change vs FP16 KV16, % (capped)")
        ax2.set_title("calibration and QoQ ablations")
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", help="regex (case-insensitive) on row names; default: every row")
    p.add_argument("--sources", default=",".join(EVAL_SOURCES),
                   help="text sources to score (runtime/texts.py), comma-separated")
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


def _texts(names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = read_source(name)
        except (KeyError, SourceMissing) as e:
            raise SystemExit(f"accuracy: --sources: {e}") from None
    return out


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
    names = [s for s in args.sources.split(",") if s]
    if set(kvs) - set(KVS) or not rows or not names:
        print(f"accuracy: nothing to run (rows {args.rows!r}, kv {args.kv!r}, sources "
              f"{args.sources!r})", file=sys.stderr)
        return 2
    if args.list:
        for r in rows:
            print(f"{r.name:45s} kv={','.join(r.kvs):10s} {r.options}")
        return 0
    texts = _texts(names)
    from qcompile.models.loaders import default_model_path, load_checkpoint
    model = args.model or default_model_path()
    commit = args.commit or git_commit()
    digests = {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()}
    meta = {"model": model.stem if model.suffix else model.name, "num_seqs": args.num_seqs,
            "seq_len": args.seq_len, "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "sources": names, "source_sha256": digests, "source_tokens": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / f"{args.stem}.json"
    results = _load_cache(cache_path)
    ckpt, cells, failed = None, {}, 0
    todo = [(r, kv) for r in rows for kv in r.kvs if kv in kvs]
    for i, (row, kv) in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {row.name} kv={kv}"
        cfg = config_of(row, kv)
        if isinstance(cfg, str):
            for s in names:
                cells[(row.name, kv, s)] = {"error": "not implemented"}
            print(f"{tag}: {cfg}", flush=True)
            continue
        calib = calibrated_on(cfg)
        keys = {s: result_key(cfg, s, digests[s], args.num_seqs, args.seq_len, meta["model"],
                              commit) for s in names if s != calib}
        for s in names:
            if s == calib:  # never scored on its own calibration text
                cells[(row.name, kv, s)] = {"error": "calib"}
            elif keys[s] in results:
                cells[(row.name, kv, s)] = results[keys[s]]
        todo_src = {s: texts[s] for s in keys if keys[s] not in results}
        if not todo_src:
            print(f"{tag}: cached, ppl " + ", ".join(
                f"{s} {results[k]['perplexity']:.3f}" for s, k in keys.items()), flush=True)
            continue
        if args.report:
            print(f"{tag}: not in the cache ({', '.join(todo_src)})", flush=True)
            continue
        print(f"{tag}: compiling ...", flush=True)
        ckpt = ckpt or load_checkpoint(model)
        t0 = time.perf_counter()
        try:
            res = evaluate(ckpt, cfg, todo_src, args.num_seqs, args.seq_len)
        except Exception as e:  # noqa: BLE001 -- report the row as failed, run the others
            failed += 1
            for s in todo_src:
                cells[(row.name, kv, s)] = {"error": f"error: {type(e).__name__}"}
            print(f"{tag}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        for s, r in res.items():
            failed += not math.isfinite(r["perplexity"])
            r.update(row=row.name, kv=kv, source=s, config=cfg.to_json(), commit=commit)
            results[keys[s]] = cells[(row.name, kv, s)] = r
        _save_cache(cache_path, results, meta)
        print(f"{tag}: ppl " + ", ".join(f"{s} {r['perplexity']:.3f}" for s, r in res.items())
              + f" (compile {next(iter(res.values()))['compile_seconds']:.0f} s, total "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        write_markdown(args.out / f"{args.stem}.md", rows, cells, meta)
    if ckpt is not None:
        meta["source_tokens"] = {s: len(ckpt.tokenizer.encode(t)) for s, t in texts.items()}
    _save_cache(cache_path, results, meta)
    write_markdown(args.out / f"{args.stem}.md", rows, cells, meta)
    write_plot(args.out / f"{args.stem}.png", rows, cells, meta)
    print((args.out / f"{args.stem}.md").read_text(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
