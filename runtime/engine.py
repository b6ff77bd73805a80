"""The serving API: `Engine.load(artifact, device=...)`, then `generate()` / `stream()` over
many prompts with continuous batching on a paged KV cache; `abort()` drops a request.

A step: the scheduler picks chunks, `flat_batch` lays them out, the step buffers copy them to
the device in one copy (block-table rows updated in place), then the device part runs: the
program, the KV write, sampling. On CUDA a step of single-token rows is padded to the
smallest decode bucket that holds it (padding rows are one token on the scratch page, their
ids ignored) and replays that bucket's CUDA graph; prefill and mixed steps run eagerly at
their exact size. Eager steps of single-token rows are padded the same way on CUDA, so
turning graphs off (`cuda_graphs=False`) changes launch costs, never the numbers. The host
reads the sampled ids once per step.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

import qcompile.runtime.ops  # noqa: F401  (registers the ops the program calls)
from qcompile.compiler.capture import KVSpec

from . import aot, compiled
from .artifact import Artifact, ArtifactError, load_program, load_weights, open_artifact
from .block_table import BlockTable
from .cuda_graphs import DecodeGraphs, bucket_for, decode_buckets
from .detokenize import IncrementalDecoder
from .flat_batch import FlatBatch, Span, flat_batch
from .kv_cache import PagedKVCache
from .ops.kv import PageLayout
from .sampler import SamplingParams, sample_rows
from .scheduler import Chunk, Request, Scheduler
from .step_buffers import SamplingRows, StepBuffers, StepInputs

CPU_KV_BYTES = 1 << 30  # default cache on CPU; on a GPU the cache takes free memory


class ContextLengthError(ValueError):
    pass


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class StreamEvent:
    index: int              # which prompt
    text: str               # newly decoded text
    token_id: int
    finish_reason: str | None


@dataclass
class _Launched:
    """A step on the device: the request sampled at each logits row (None: ignored), the
    sampled ids on the device, their pinned host copy and the event after that copy."""
    rows: list
    ids: torch.Tensor
    host: torch.Tensor
    done: "torch.cuda.Event | None"


class Engine:
    def __init__(self, art: Artifact, program, weights, tokenizer, cache: PagedKVCache,
                 device: torch.device, max_batch_tokens: int, max_seqs: int, kernels=None,
                 overlap: bool = False):
        from .gemm_kernels import Kernels
        # this engine's kernel table and launch / fallback counts, active while its program
        # runs (two engines in one process keep their own)
        self.kernels = kernels if kernels is not None else Kernels()
        self.artifact, self.weights = art, weights
        self.program = self.kernels.wrap(program)
        self._write = self.kernels.wrap(cache.write)  # the store kernel of this engine's table
        self.tokenizer, self.cache, self.device = tokenizer, cache, device
        self.scheduler = Scheduler(cache, max_batch_tokens, max_seqs)
        self.eos_ids = set(art.model.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        width = -(-art.max_seq_len // cache.block_size)  # pages of the longest sequence
        self.block_table = BlockTable(max_seqs, width, cache.scratch_page, device)
        # rows: one more than a single sequence for the padding row of compiled steps
        rows = max(max_seqs, 2)
        self.buffers = StepBuffers(max(max_batch_tokens, max_seqs) + 1, rows, max_seqs * width,
                                   device)
        self.decode_buckets = decode_buckets(max_seqs) if device.type == "cuda" else ()
        self._pad = Span([0], 0, [cache.scratch_page], row=self.block_table.scratch_row)
        self.graphs: DecodeGraphs | None = None
        # sampled ids' host copies (a step has at most max_seqs logits rows), two so that a
        # step's copy never overwrites the one in flight (overlap: step N + 1 is launched
        # before step N's ids are read)
        self._ids_host = [torch.zeros(rows, dtype=torch.int64,
                                      pin_memory=device.type == "cuda") for _ in range(2)]
        self._ids_slot = 0
        self.overlap = overlap
        self._inflight: _Launched | None = None
        self.compiled: bool | str = False  # Engine.load's compile: True (Inductor), "aot"
        self.load_times: dict[str, float] = {}  # Engine.load's phases, seconds
        self.batch_invariant = False  # Engine.load's; see _invariant
        self._logits_rows = 0  # > 0: every step computes this many logits rows (_invariant)
        # how the key / query rotation runs (compiled.rotation_mode; Engine.load sets it):
        # "kernel" inside the attention kernels, "0" the program's mm, "dense" / "1" Inductor
        self.rotation = "0"

    @classmethod
    def load(cls, path, device="cpu", *, kv_cache_bytes: int | None = None,
             max_batch_tokens: int = 4096, max_seqs: int = 64, compile: bool | str | None = None,
             cuda_graphs: bool | None = None, overlap: bool | None = None,
             batch_invariant: bool = False):
        """compile: TorchInductor on the program's glue (default: on CUDA, where it fuses each
        RMSNorm / SwiGLU with its activation quantization and takes a decode step of the 1B
        shape from 95 to 34 launches a layer and 5.5 to 3.1 ms on an H100; its compile is
        cached on disk, bench/results/gpu-h100-2026-12-07b.md; off on the CPU, where the
        reference ops are the point); "aot": AOTInductor instead, compiled once per program,
        torch and device into a cached package (runtime/aot.py: no re-tracing at each load).
        cuda_graphs: capture the decode step per batch bucket
        (default: on CUDA, falling back to eager steps with a warning when the program cannot
        be captured; True insists, False turns them off). overlap: launch each step before
        reading the previous one's sampled ids (see `step`; default: on CUDA, where it hides
        the host's ~0.5 ms between steps: 1B shape, batch 64 on an H100, with Inductor, decode
        step 3.1 -> 2.6 ms, 9,381 -> 10,739 output tok/s, bench/results/gpu-h100-2026-12-07c.md).
        batch_invariant: a request's logits, so its greedy tokens, do not depend on the other
        requests of its steps (server load, batch order, a preemption's recomputation): see
        `_invariant` for what it takes and costs. CUDA with Inductor (compile True or None)
        and an artifact whose linears run qcompile's integer GEMMs (w8a8, w4a8*).

        `engine.load_times` holds the seconds of each phase: artifact (checks and the program),
        weights, setup (tokenizer, KV cache, kernels; AOTInductor's compile or the map of its
        cached package), capture (the CUDA graphs; torch.compile's compile runs in their first
        forward), warm-up (CUDA: a short prefill, see _warm_up)."""
        from transformers import AutoTokenizer
        device = torch.device(device)
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, not {device}")
        t0 = time.perf_counter()
        art = open_artifact(path, device)
        if compile == "aot" and aot.package_path(art, device).is_file():
            program = None  # the cached package is the program: no need to read and check it
        else:
            program = load_program(art.path).module()
        t1 = time.perf_counter()
        weights = load_weights(art, device)
        t2 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(Path(art.path) / "tokenizer")
        kv = art.manifest["kv"]
        spec = KVSpec(kv["format"], kv["num_layers"], kv["block_size"], kv["record_bytes"])
        layout = PageLayout.of(kv["format"], art.model.num_kv_heads, art.model.head_dim,
                               art.compile.torch_dtype)
        cache = PagedKVCache(spec, _num_blocks(spec, device, kv_cache_bytes, art), device, layout)
        kernels = None
        if device.type == "cuda" and art.manifest["kernels"]:
            from .gemm_kernels import Kernels
            kernels = Kernels.load(art.path / "kernels" / art.compile.target, device)
        if compile is None:
            compile = device.type == "cuda"
        if compile not in (True, False, "aot"):
            raise ValueError(f"compile must be True, False, None or 'aot', not {compile!r}")
        if batch_invariant:
            _check_invariant(art, device, compile, kernels)
        from .attention_kernels import table_rotates
        rotation = compiled.rotation_mode(table_rotates(kernels, art.model.head_dim),
                                          batch_invariant)
        if rotation == "kernel" and compile is False:  # torch_compile folds it for Inductor
            compiled.fast_kv_rotation(program, weights, rotation)
        if compile:
            compiled.persistent_cache()
        if overlap is None:
            overlap = device.type == "cuda"
        engine = cls(art, program, weights, tokenizer, cache, device, max_batch_tokens, max_seqs,
                     kernels, overlap)
        engine.rotation = rotation
        if batch_invariant:
            engine._invariant()
        if compile is True:
            engine._use_inductor(program)
        elif compile == "aot":
            engine._use_aot(program)
        t3 = time.perf_counter()
        if device.type == "cuda" and cuda_graphs is not False:
            engine._capture(required=cuda_graphs is True)
        t4 = time.perf_counter()
        if device.type == "cuda":
            engine._warm_up()
        engine.load_times = {"artifact": t1 - t0, "weights": t2 - t1, "setup": t3 - t2,
                             "capture": t4 - t3, "warm-up": time.perf_counter() - t4}
        return engine

    def _warm_up(self) -> None:
        """One short prefill and a decode step, so that the first request does not pay the
        first launches of the prefill path (kernel modules, cuBLAS and Triton first calls;
        the CUDA graphs only warmed the decode path). qserve's first 64 requests waited
        ~1.5 s longer for their first token than qbench's, which warms up before timing
        (H100, bench/results/gpu-h100-2026-12-07d.md). The graphs' replay counts start after
        it: they count the served steps."""
        prompt = min(16, self.max_seq_len - 1)  # max_seq_len >= 2: a token and one more
        self.generate([[0] * prompt], max_new_tokens=min(2, self.max_seq_len - prompt),
                      stop_on_eos=False)
        if self.graphs is not None:
            self.graphs.replays.clear()

    def _invariant(self) -> None:
        """Batch invariance (Engine.load's batch_invariant; checked by _check_invariant): every
        kernel a request's row goes through computes it the same way whatever else is in the
        step. The integer GEMMs already do (exact accumulation, each tile config bitwise equal
        to the reference) and so does Inductor's glue (one graph for every step shape: each
        row's reductions in one fixed order). What changes:
        - attention cuts each sequence's keys at multiples of a fixed split size instead of
          into a split count chosen for the batch, and runs a decode row and a prefill chunk's
          rows in their own entries even when they share a step (plan_invariant; a
          batch-dependent plan chose kt, decode or prefill for the whole step);
        - the key / query rotation runs inside the attention kernels (an in-register
          Walsh-Hadamard transform per row; kernels built before it: a reduction Inductor
          fuses with RoPE, `dense_rotate`) rather than a cuBLAS mm whose algorithm follows
          its row count;
        - a float LM head (cuBLAS) always multiplies the same number of rows: each step
          computes max(max_seqs, 2) logits rows, the extra ones ignored.
        Costs: decode splits that do not adapt to the batch (a batch of 64 at ~1,100 keys
        runs three 512-key splits where one was faster; a single sequence fewer than its SMs
        wanted), the dense rotation's D^2 a row (heavy in prefill), a second attention launch
        in mixed steps, the padded float head. 1B shape on an H100, 64 x 1024 / 128: decode
        step 2.1 against 1.74 ms, 8,190 against 10,526 output tok/s
        (bench/results/gpu-h100-2026-12-07g.md)."""
        from qcompile.cutlass_templates.attention_configs import invariant_split_keys
        self.batch_invariant = True
        self.kernels.split_keys = invariant_split_keys(self.max_seq_len)
        if self.artifact.compile.head_scheme is None:
            self._logits_rows = max(self.scheduler.max_seqs, 2)

    def _use_inductor(self, program) -> None:
        """torch.compile on `program` as this engine's program; no dimension of one in its
        steps (decode buckets from 2, see _layout)."""
        self.program = self.kernels.wrap(compiled.torch_compile(program, self.weights,
                                                                self.rotation))
        self.compiled = True
        self.decode_buckets = tuple(sorted({max(b, 2) for b in self.decode_buckets}))

    def _use_aot(self, program) -> None:
        """The AOTInductor runner as this engine's program (runtime/aot.py); if AOTInductor
        fails, torch.compile instead, with a warning that says why."""
        x = self._stage_padding(2)
        tables = self.block_table.gather(x.rows, x.width)
        args = (*self.weights, x.tokens, x.positions, self.cache.tensor, tables, x.ctx_lens,
                x.query_start, x.logits_indices)
        try:
            self.program = self.kernels.wrap(aot.load_or_compile(self.artifact, args,
                                                                 self.device))
            self.compiled = "aot"
        except Exception as e:  # noqa: BLE001  (AOTInductor's failures are of any kind)
            warnings.warn(f"AOTInductor failed ({type(e).__name__}: {str(e)[:200]}); the "
                          "program's glue runs under torch.compile instead")
            self._use_inductor(program if program is not None
                               else load_program(self.artifact.path).module())

    def _capture(self, required: bool) -> None:
        try:
            self.graphs = DecodeGraphs(self._device_step, self._stage_padding,
                                       self.decode_buckets, self.device)
        except Exception as e:  # any reason not to capture: serve eagerly, say why
            if required:
                raise
            warnings.warn(f"CUDA graphs are off, decode steps run eagerly: capturing them "
                          f"failed ({type(e).__name__}: {e}); an op without a kernel in the "
                          "artifact runs its PyTorch reference, which may synchronise")

    @property
    def max_seq_len(self) -> int:
        return self.artifact.max_seq_len

    # ---- text in, text out -------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompts, *, chat: bool = False, **sampling) -> list[Completion]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        reqs = self._submit(prompts, chat, SamplingParams(**sampling))
        try:
            for _ in self._run(reqs):
                pass
        finally:  # interrupted: nothing of ours stays in flight
            for r in reqs:
                self.abort(r)
        return [Completion(self.tokenizer.decode(r.out, skip_special_tokens=True), r.out,
                           r.finish_reason, len(r.prompt)) for r in reqs]

    def stream(self, prompts, *, chat: bool = False, **sampling) -> Iterator[StreamEvent]:
        """One event per generated token with exactly the text it adds, whole characters only
        (a character split over tokens arrives with its last token), so each prompt's texts
        concatenate to its `generate()` text. Closing the iterator early (or dropping it)
        aborts its requests, freeing their pages."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        reqs = self._submit(prompts, chat, SamplingParams(**sampling))
        decoders = {r.id: IncrementalDecoder(self.tokenizer) for r in reqs}
        try:
            for req, token, last in self._run(reqs):
                text = decoders[req.id].push(token)
                if last:
                    text += decoders[req.id].flush()
                yield StreamEvent(req.index, text, token, req.finish_reason if last else None)
        finally:
            for r in reqs:
                self.abort(r)

    # ---- requests -------------------------------------------------------------------------

    def submit(self, prompts, params: SamplingParams, *, chat: bool = False) -> list[Request]:
        """Queue prompts (text or token-id lists) without running them; each `step()` then
        advances every queued and running request (what `generate` and `stream` loop over)."""
        return self._submit(list(prompts), chat, params)

    def _submit(self, prompts, chat: bool, params: SamplingParams) -> list[Request]:
        reqs = []
        for i, p in enumerate(prompts):
            ids = self.encode(p, chat) if isinstance(p, str) else list(p)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) >= self.max_seq_len:
                raise ContextLengthError(
                    f"prompt {i} has {len(ids)} tokens but this artifact serves at most "
                    f"{self.max_seq_len} tokens per sequence (prompt + generated): shorten it "
                    "or recompile with a larger --max-seq-len")
            vocab = self.artifact.model.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt {i}: token ids must be integers from 0 to {vocab - 1}")
            seed = (params.seed + i) % 2**63 if params.seed is not None else random.getrandbits(63)
            reqs.append(Request(ids, params, index=i, seed=seed,
                                limit=min(len(ids) + params.max_new_tokens, self.max_seq_len)))
        for r in reqs:
            self.scheduler.add(r)
        return reqs

    def abort(self, req: Request) -> None:
        """Stop req now: it leaves the queue or the batch, its KV pages are freed and its
        finish_reason becomes "abort". A finished request is left as it is."""
        self.scheduler.abort(req)

    def _run(self, reqs: list[Request]) -> Iterator[tuple[Request, int, bool]]:
        """(request, token, whether it is the request's last) for every token of reqs, in
        order, stepping the engine until all are done. A step serves every request in
        flight: tokens of other callers' requests (another stream) wait in their requests for
        their own _run."""
        sent = {r.id: 0 for r in reqs}
        live = list(reqs)
        while live:
            for r in live:
                while sent[r.id] < len(r.out):
                    sent[r.id] += 1
                    yield r, r.out[sent[r.id] - 1], (r.finish_reason is not None
                                                     and sent[r.id] == len(r.out))
            live = [r for r in live if r.finish_reason is None]
            if live:
                self.step()

    def step(self) -> list[tuple[Request, int]]:
        """One forward over the scheduled chunks; returns the sampled (request, token)s.

        Overlapped (`overlap=True`), a step launches the next forward before it reads the
        sampled ids of the one in flight, so the host's scheduling and staging run while the
        GPU computes: the new step takes the in-flight tokens from the device (the staged
        gather), and the (request, token)s returned are the previous launch's. A request that
        the read finishes (EOS) has then had one more token computed, which is dropped."""
        if not self.overlap:
            return self._complete(self._launch(None))
        prev, self._inflight = self._inflight, None
        if self.scheduler.running or self.scheduler.waiting:
            self._inflight = self._launch(prev, required=prev is None)
        return self._complete(prev) if prev is not None else []

    def _launch(self, prev: "_Launched | None", required: bool = True) -> "_Launched | None":
        """Schedule, stage and launch a step without synchronising with the device, its
        sampled ids copied to a pinned host buffer behind an event. `prev`: the step in
        flight, whose sampled tokens this one reads on the device. None when nothing could be
        scheduled and `required` is False."""
        chunks = self.scheduler.schedule()
        if not chunks:
            if not required:
                return None
            raise RuntimeError("scheduler made no progress (KV cache too small for any request)")
        bucket = None
        if self.decode_buckets and all(c.end - c.start == 1 for c in chunks):
            bucket = bucket_for(len(chunks), self.decode_buckets)
        batch, rows, updates, gathers = self._layout(chunks, bucket, prev)
        width = None if bucket else max(batch.width, min(2, self.block_table.width)
                                        if self.compiled is True else 1)
        x = self.buffers.load(batch, _sampling_rows(rows), updates, width=width, gathers=gathers)
        if gathers:  # the tokens prev sampled, straight from the device
            x.tokens.index_copy_(0, x.gather_dst, prev.ids.index_select(0, x.gather_src))
        self.block_table.apply(x.update_index, x.update_page)
        random = any(r is not None and r.params.temperature > 0 for r in rows)
        if bucket is not None and self.graphs is not None:
            ids = self.graphs.replay(bucket, random)
        else:
            ids = self._device_step(x, random)
        for c in chunks:
            c.req.computed = c.end
        for i, r in enumerate(rows):
            if r is not None:
                r.pending += 1
                r.pending_row = i
        self._ids_slot ^= 1
        host = self._ids_host[self._ids_slot][:len(rows)]
        done = None
        if self.device.type == "cuda":
            host.copy_(ids[:len(rows)], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host.copy_(ids[:len(rows)])
        return _Launched(rows, ids, host, done)

    def _complete(self, launched: "_Launched") -> list[tuple[Request, int]]:
        """Account a launched step once its ids are read (the step's one synchronisation):
        new tokens, finished requests. A request finished or aborted since the launch drops
        its token."""
        if launched.done is not None:
            launched.done.synchronize()
        events = []
        for req, token in zip(launched.rows, launched.host.tolist()):
            if req is None:
                continue
            req.pending -= 1
            if req.finish_reason is not None:
                continue
            req.out.append(token)
            reason = self._finish_reason(req, token)
            if reason:
                self.scheduler.finish(req, reason)
            events.append((req, token))
        return events

    def _layout(self, chunks: list[Chunk], bucket: int | None, prev: "_Launched | None"):
        """The step's flat batch, the request sampled at each logits row (None: ignored),
        the block-table updates and the gathers of tokens in flight (token index, prev's
        row). A bucket computes logits for every row, padding included."""
        self.block_table.release_missing(self.cache.tables)
        updates: list[tuple[int, int]] = []
        spans, gathers, at = [], [], 0
        for c in chunks:
            pages = self.cache.tables[c.req.id]
            row = self.block_table.sync(c.req.id, pages, updates)
            spans.append(Span(c.req.token_span(c.start, c.end), c.start, pages, row,
                              logits=bucket is not None or c.samples))
            known = len(c.req.prompt) + len(c.req.out)
            if c.end > known:  # its last token is prev's sample for it, not read yet
                if prev is None or prev.rows[c.req.pending_row] is not c.req:
                    raise RuntimeError(f"request {c.req.id}: a pending token without the "
                                       "step that samples it")
                gathers.append((at + known - c.start, c.req.pending_row))
            at += c.end - c.start
        if bucket is None:
            rows = [c.req for c in chunks if c.samples]
            if not rows:  # the program computes at least one logits row (export's N >= 1)
                spans[0], rows = replace(spans[0], logits=True), [None]
            if self.compiled is True and min(len(spans), len(rows), at) < 2:
                # a padding row (one token on the scratch page, its logits ignored): with a
                # dimension of one, Inductor would compile another graph for the step
                spans, rows = spans + [self._pad], rows + [None]
        else:
            rows = [c.req if c.samples else None for c in chunks] + [None] * (bucket - len(chunks))
            spans += [self._pad] * (bucket - len(chunks))
        batch = self._pad_logits(flat_batch(spans, self.cache.block_size))
        rows += [None] * (len(batch.logits_indices) - len(rows))
        return batch, rows, updates, gathers

    def _pad_logits(self, batch: FlatBatch) -> FlatBatch:
        """batch with logits rows repeated up to _logits_rows (batch invariance: a float LM
        head always multiplies as many rows); unchanged when that is 0."""
        pad = self._logits_rows - len(batch.logits_indices)
        if pad > 0:
            batch.logits_indices += [batch.logits_indices[0]] * pad
        return batch

    def _stage_padding(self, bucket: int) -> StepInputs:
        """A bucket of padding rows staged (CUDA graph warm-up and capture)."""
        batch = self._pad_logits(flat_batch([self._pad] * bucket, self.cache.block_size))
        return self.buffers.load(batch, _sampling_rows([None] * len(batch.logits_indices)), [])

    def _no_autograd(self):
        """inference_mode, except around an AOTInductor runner, which must not see inference
        tensors (runtime/aot.py)."""
        return torch.no_grad() if self.compiled == "aot" else torch.inference_mode()

    def _device_step(self, x: StepInputs, random: bool) -> torch.Tensor:
        """The device part of a step (what a decode graph captures): the step's block tables,
        the program, the KV write, sampling. Sampled ids [N] on the device."""
        with self._no_autograd():
            tables = self.block_table.gather(x.rows, x.width)
            logits, new_kv = self.program(*self.weights, x.tokens, x.positions, self.cache.tensor,
                                          tables, x.ctx_lens, x.query_start, x.logits_indices)
            self._write(new_kv, x.slots)
            return sample_rows(logits, x.temperature, x.top_p, x.top_k, x.seed, x.position,
                               random=random)

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if req.params.stop_on_eos and token in self.eos_ids:
            return "eos"
        # tokens the host knows (an overlapped step may hold one more in flight)
        if len(req.out) >= req.params.max_new_tokens or \
                len(req.prompt) + len(req.out) >= self.max_seq_len:
            return "length"
        return None

    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len, V] of every position of each sequence: one prefill over an empty
        cache. It takes no pages (its records go to the scratch page), so it may run while
        requests are in flight."""
        bs = self.cache.block_size
        spans = [Span(seq, 0, [self.cache.scratch_page] * -(-len(seq) // bs)) for seq in sequences]
        batch = flat_batch(spans, bs, all_logits=True)
        x = batch.tensors(self.device)
        with self._no_autograd():
            logits, _ = self.program(*self.weights, *x.program_args(self.cache.tensor))
        logits = logits.float()  # a compiled program returns them in the activation dtype
        return [logits[a:b] for a, b in zip(batch.query_start, batch.query_start[1:])]


def _check_invariant(art: Artifact, device: torch.device, compile, kernels) -> None:
    """Raise ValueError (one line, what to do) where Engine.load's batch_invariant cannot hold."""
    from qcompile.compiler.schemes import spec_of
    from qcompile.cutlass_templates.attention_configs import HEAD_DIMS
    if device.type != "cuda":
        raise ValueError(f"batch_invariant is for CUDA; on {device} the reference ops serve "
                         "(drop the option)")
    if compile is not True:
        raise ValueError(f"batch_invariant needs Inductor on the glue (compile=True), not "
                         f"compile={compile!r}: eager ATen reductions split rows by batch size")
    scheme = art.compile.scheme
    if scheme is None or spec_of(scheme).kernel is None:
        raise ValueError(f"batch_invariant needs linears on qcompile's integer GEMMs (w8a8, "
                         f"w4a8, w4a8-g128, w4a8-g64); --precision {art.compile.precision} runs "
                         "float GEMMs whose rounding follows the batch size")
    if kernels is None or art.model.head_dim not in HEAD_DIMS:
        raise ValueError("batch_invariant needs the artifact's attention kernels (an artifact "
                         "compiled with --kernels build, head_dim 64 or 128)")


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """A prompt's token ids (chat: as the one user message of the model's chat template)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: argv bytes that are not UTF-8
        raise ValueError(f"the prompt is not valid UTF-8 text (character {e.start} is "
                         f"{prompt[e.start]!r}): pass UTF-8 text") from None
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer.encode(prompt)


def _sampling_rows(reqs: list[Request | None]) -> SamplingRows:
    """Sampling parameters per logits row; None rows (padding, recomputed tokens) greedy."""
    rows = [(0.0, 1.0, 0, 0, 0) if r is None else
            (r.params.temperature, r.params.top_p, r.params.top_k, r.seed,
             len(r.out) + r.pending)
            for r in reqs]
    return SamplingRows(*(list(col) for col in zip(*rows))) if rows else \
        SamplingRows([], [], [], [], [])


def _num_blocks(spec: KVSpec, device: torch.device, kv_bytes: int | None, art: Artifact) -> int:
    per_block = PagedKVCache.bytes_per_block(spec)
    if kv_bytes is None:
        kv_bytes = (int(torch.cuda.mem_get_info(device)[0] * 0.85) if device.type == "cuda"
                    else CPU_KV_BYTES)
    blocks = kv_bytes // per_block
    need = -(-art.max_seq_len // spec.block_size)
    if blocks < need:
        raise ArtifactError(
            f"the KV cache fits {blocks * spec.block_size} tokens in {kv_bytes / 2**20:.0f} MiB, "
            f"less than one full sequence of {art.max_seq_len} tokens: give it more memory "
            "(kv_cache_bytes) or recompile with a smaller --max-seq-len")
    return blocks
