"""`qcompile` end to end: load, export, run the passes, re-export the lowered graph with its
weights as inputs, and write the artifact atomically."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

from qcompile.models.config import ModelConfig
from qcompile.models.decoder import Decoder
from qcompile.models.loaders import Checkpoint, load_checkpoint
from qcompile.passes.base import Lowering

from .artifact import PROGRAM, WEIGHTS, AtomicDir, check_output, write_manifest
from .capture import INPUT_NAMES, KVSpec, capture, dynamic_shapes, example_inputs
from .config import MAX_SEQ_LEN, MIN_SEQ_LEN, SPECS, CompileConfig
from .fmpq import input_rotations
from .kernels import graph_kernel_requests, write_kernels
from .pipeline import run_pipeline

OUTPUT_NAMES = ("logits", "new_kv")


def export_lowered(lowering: Lowering, kv: KVSpec) -> torch.export.ExportedProgram:
    """The final program: flat inputs (weights..., tokens, ..., logits_indices)."""
    weights = tuple(lowering.weights.values())
    dyn = (None,) * len(weights) + dynamic_shapes()
    with torch.no_grad():
        ep = torch.export.export(lowering.gm, weights + example_inputs(kv), dynamic_shapes=dyn)
    ep.example_inputs = None  # else torch.export.save pickles them (a copy of every weight)
    return ep


def compile_model(source, cfg: CompileConfig, out, *, trust_pickle: bool = False,
                  progress: bool = True, force: bool = False) -> Path:
    """Load a checkpoint (HF folder, .gguf, model.pt) and compile it to `out`. The output path
    and the calibration text are checked before the checkpoint is loaded; `force` lets `out`
    replace something that is not a previous artifact (compiler/artifact.py: check_output)."""
    check_inputs(cfg, out, force, protect=(source,))
    return compile_checkpoint(load_checkpoint(source, trust_pickle=trust_pickle,
                                              progress=progress), cfg, out,
                              progress=progress, force=force, consume=True)


def check_inputs(cfg: CompileConfig, out, force: bool, protect=()) -> None:
    """What would otherwise fail only after minutes of work."""
    check_output(Path(out), force, protect)
    if cfg.calib_text is not None and not Path(cfg.calib_text).is_file():
        raise FileNotFoundError(f"--calib-text {cfg.calib_text}: no such file")


def served_length(cfg: CompileConfig, mcfg: ModelConfig) -> int:
    """The artifact's max_seq_len: --max-seq-len, or the model's context; a warning past it."""
    max_seq_len = cfg.max_seq_len or mcfg.max_position_embeddings
    if not MIN_SEQ_LEN <= max_seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"the model's context ({max_seq_len} tokens) is outside {MIN_SEQ_LEN}.."
                         f"{MAX_SEQ_LEN}: pass --max-seq-len")
    if cfg.max_seq_len > mcfg.max_position_embeddings:
        warnings.warn(f"--max-seq-len {cfg.max_seq_len} is beyond the model's trained context "
                      f"({mcfg.max_position_embeddings} tokens): quality past it is untested",
                      stacklevel=3)
    return max_seq_len


def compile_checkpoint(ckpt: Checkpoint, cfg: CompileConfig, out, *,
                       progress: bool = True, force: bool = False, consume: bool = False) -> Path:
    """`consume`: the caller hands ckpt over: its weights are emptied once the program is
    captured, so that each float weight is freed as soon as its packed form exists (peak host
    memory about the checkpoint plus the packed weights, not twice the checkpoint)."""
    out, t0 = Path(out), time.perf_counter()
    check_inputs(cfg, out, force, protect=(ckpt.source,))
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.source} has no tokenizer files; the artifact needs one to serve "
                         "text (add tokenizer.json / tokenizer_config.json next to the weights)")
    mcfg = ckpt.config
    max_seq_len = served_length(cfg, mcfg)
    weights, quantized, key_mean, qoq_report = ckpt.weights, {}, None, None
    if cfg.quantizer == "qoq":
        from .qoq import apply_qoq
        weights, quantized, key_mean, qoq_report = apply_qoq(ckpt, cfg, progress)
    if cfg.centers_keys and key_mean is None:  # QoQ's calibration did not measure them
        from .calibrate import calibration_sequences
        from .calibrate import key_mean as measure_key_mean
        seqs = calibration_sequences(ckpt.tokenizer, cfg.key_calib_samples, cfg.calib_seq_len,
                                     cfg.calib_text, cfg.calib_source)
        key_mean = measure_key_mean(mcfg, weights, seqs, progress)
    bar = tqdm(total=4, desc="qcompile", disable=not progress, unit="step")

    bar.set_postfix_str("torch.export")
    decoder = Decoder(mcfg, weights, cfg.torch_dtype)
    lowering = Lowering.from_exported(
        capture(decoder, KVSpec.of(mcfg, "fp16", cfg.kv_block_size, cfg.torch_dtype)))
    del decoder, weights
    if consume:  # the lowering holds the only references now (swap_gemm frees them one by one)
        ckpt.weights = {}
    bar.update()

    bar.set_postfix_str("passes")
    table = SPECS[cfg.precision].linear_table  # w4a4: FMPQ's block and 8-bit blocks per linear
    linear_args = table(mcfg, qoq_report, cfg.target) if table else None
    rotations = input_rotations(mcfg, qoq_report)  # w4a4: w_down's input, rotated at run time
    results = run_pipeline(lowering, cfg, quantized, key_mean, linear_args,  # GPTQ's codes as is
                           cfg.linear_schemes(qoq_report), rotations)
    bar.update()

    bar.set_postfix_str("export lowered program")
    kv = KVSpec.of(mcfg, cfg.kv, cfg.kv_block_size, cfg.torch_dtype)
    program = export_lowered(lowering, kv)
    bar.update()

    bar.set_postfix_str("write artifact")
    with AtomicDir(out, force) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in lowering.weights.items()},
                                    tmp / WEIGHTS)
        torch.export.save(program, tmp / PROGRAM)
        ckpt.tokenizer.save_pretrained(tmp / "tokenizer")
        kdir = tmp / "kernels" / cfg.target
        requests = graph_kernel_requests(lowering.gm, cfg.target) if cfg.kernels == "build" \
            else []
        kernels = write_kernels(requests, cfg.target, kdir, progress)
        write_manifest(tmp, {
            "qcompile_version": qcompile_version(),
            "torch_version": torch.__version__,
            "source": str(ckpt.source),
            "model": mcfg.to_json(),
            "compile": cfg.to_json(),
            "target": cfg.target,
            "max_seq_len": max_seq_len,
            "kv": {"format": kv.fmt, "num_layers": kv.num_layers, "block_size": kv.block_size,
                   "record_bytes": kv.record_bytes, "key_centering": cfg.centers_keys},
            "program": {"weights": list(lowering.weights), "inputs": list(INPUT_NAMES),
                        "outputs": list(OUTPUT_NAMES)},
            "kernels": [k["name"] for k in kernels],
            "passes": [{"name": r.name, "matches": r.matches, "seconds": round(r.seconds, 3)}
                       for r in results],
            "qoq": qoq_report,
            "compile_seconds": round(time.perf_counter() - t0, 2),
        })
    bar.update()
    bar.close()
    return out


def qcompile_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qcompile-llm")
    except PackageNotFoundError:
        return "dev"
