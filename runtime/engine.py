"""The serving API: `Engine.load(artifact, device=...)`, then `generate()` / `stream()` over
many prompts with continuous batching on a paged KV cache."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

import qcompile.runtime.ops  # noqa: F401  (registers the ops the program calls)
from qcompile.compiler.capture import KVSpec

from .artifact import Artifact, ArtifactError, load_program, load_weights, open_artifact
from .detokenize import IncrementalDecoder
from .kv_cache import PagedKVCache
from .sampler import SamplingParams, sample_rows
from .scheduler import Chunk, Request, Scheduler

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


class Engine:
    def __init__(self, art: Artifact, program, weights, tokenizer, cache: PagedKVCache,
                 device: torch.device, max_batch_tokens: int, max_seqs: int):
        self.artifact, self.program, self.weights = art, program, weights
        self.tokenizer, self.cache, self.device = tokenizer, cache, device
        self.scheduler = Scheduler(cache, max_batch_tokens, max_seqs)
        self.eos_ids = set(art.model.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def load(cls, path, device="cpu", *, kv_cache_bytes: int | None = None,
             max_batch_tokens: int = 4096, max_seqs: int = 64, compile: bool = False):
        from transformers import AutoTokenizer
        device = torch.device(device)
        art = open_artifact(path, device)
        program = load_program(art.path).module()
        weights = load_weights(art, device)
        tokenizer = AutoTokenizer.from_pretrained(Path(art.path) / "tokenizer")
        kv = art.manifest["kv"]
        spec = KVSpec(kv["format"], kv["num_layers"], kv["block_size"], kv["record_bytes"])
        cache = PagedKVCache(spec, _num_blocks(spec, device, kv_cache_bytes, art), device)
        if device.type == "cuda" and art.manifest["kernels"]:
            from . import attention_kernels, gemm_kernels
            attention_kernels.enable(gemm_kernels.enable(art.path / "kernels" / art.compile.target))
        if compile:
            # Round to the activation dtype where eager does (before quantization), so the
            # compiled program produces the reference ops' int8 codes.
            program = torch.compile(program, dynamic=True,
                                    options={"emulate_precision_casts": True})
        return cls(art, program, weights, tokenizer, cache, device, max_batch_tokens, max_seqs)

    @property
    def max_seq_len(self) -> int:
        return self.artifact.max_seq_len

    # ---- text in, text out -------------------------------------------------------------

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: argv bytes that are not UTF-8
            raise ValueError(f"the prompt is not valid UTF-8 text (character {e.start} is "
                             f"{prompt[e.start]!r}): pass UTF-8 text") from None
        if chat:
            msgs = [{"role": "user", "content": prompt}]
            return list(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        return self.tokenizer.encode(prompt)

    def generate(self, prompts, *, chat: bool = False, **sampling) -> list[Completion]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        reqs = self._submit(prompts, chat, SamplingParams(**sampling))
        for _ in self._run(reqs):
            pass
        return [Completion(self.tokenizer.decode(r.out, skip_special_tokens=True), r.out,
                           r.finish_reason, len(r.prompt)) for r in reqs]

    def stream(self, prompts, *, chat: bool = False, **sampling) -> Iterator[StreamEvent]:
        """One event per generated token with exactly the text it adds, whole characters only
        (a character split over tokens arrives with its last token), so each prompt's texts
        concatenate to its `generate()` text."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        reqs = self._submit(prompts, chat, SamplingParams(**sampling))
        decoders = {r.id: IncrementalDecoder(self.tokenizer) for r in reqs}
        for req, token in self._run(reqs):
            text = decoders[req.id].push(token)
            if req.finish_reason:
                text += decoders[req.id].flush()
            yield StreamEvent(req.index, text, token, req.finish_reason)

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
            reqs.append(Request(ids, params, index=i, seed=seed))
        for r in reqs:
            self.scheduler.add(r)
        return reqs

    def _run(self, reqs: list[Request]) -> Iterator[tuple[Request, int]]:
        pending = set(r.id for r in reqs)
        while pending:
            for req, token in self.step():
                if req.finish_reason:
                    pending.discard(req.id)
                yield req, token

    def step(self) -> list[tuple[Request, int]]:
        """One forward over the scheduled chunks; returns the sampled (request, token)s."""
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("scheduler made no progress (KV cache too small for any request)")
        logits, sampled_chunks = self._forward(chunks)
        events = []
        for c in chunks:
            c.req.computed = c.end
        reqs = [c.req for c in sampled_chunks]
        tokens = self._sample(logits, reqs).tolist()  # the step's one device -> host read
        for req, token in zip(reqs, tokens):
            req.out.append(token)
            reason = self._finish_reason(req, token)
            if reason:
                self.scheduler.finish(req, reason)
            events.append((req, token))
        return events

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Next token of every row at once on the logits' device (runtime/sampler.py)."""
        p = [r.params for r in reqs]
        dev, f32 = logits.device, torch.float32
        rows = torch.tensor([[q.temperature, q.top_p] for q in p], dtype=f32).to(dev, non_blocking=True)
        ints = torch.tensor([[q.top_k, r.seed, len(r.out)] for q, r in zip(p, reqs)],
                            dtype=torch.int64).to(dev, non_blocking=True)
        return sample_rows(logits, rows[:, 0], rows[:, 1], ints[:, 0], ints[:, 1], ints[:, 2],
                           random=any(q.temperature > 0 for q in p))

    def _finish_reason(self, req: Request, token: int) -> str | None:
        if req.params.stop_on_eos and token in self.eos_ids:
            return "eos"
        if len(req.out) >= req.params.max_new_tokens or len(req.tokens) >= self.max_seq_len:
            return "length"
        return None

    def _forward(self, chunks: list[Chunk]):
        pieces = [(c.req.id, c.req.tokens[c.start:c.end], c.start) for c in chunks]
        ends = itertools.accumulate(c.end - c.start for c in chunks)
        rows = [end - 1 for c, end in zip(chunks, ends) if c.samples]
        logits, _ = self.run(pieces, rows or [0])
        return logits[: len(rows)], [c for c in chunks if c.samples]

    def run(self, pieces, logits_indices: list[int] | None = None):
        """Run the program once on a flat batch and store its KV records. pieces: (sequence
        id, new tokens, tokens already cached) per sequence, pages reserved; logits of the flat
        rows in logits_indices (all rows when None). Returns (logits, row offsets [B + 1])."""
        tokens, positions, slots, starts = [], [], [], [0]
        for seq_id, new, start in pieces:
            tokens += new
            positions += range(start, start + len(new))
            slots += self.cache.slots(seq_id, start, start + len(new))
            starts.append(len(tokens))
        if logits_indices is None:
            logits_indices = list(range(len(tokens)))
        dev, i32 = self.device, torch.int32
        args = (torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                self.cache.tensor, self.cache.block_table([p[0] for p in pieces]),
                torch.tensor([p[2] for p in pieces], dtype=i32, device=dev),
                torch.tensor(starts, dtype=i32, device=dev),
                torch.tensor(logits_indices, device=dev))
        with torch.inference_mode():
            logits, new_kv = self.program(*self.weights, *args)
            self.cache.write(new_kv, torch.tensor(slots, device=dev))
        return logits, starts

    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len, V] of every position of each sequence (one prefill, no sampling)."""
        ids = [-(i + 1) for i in range(len(sequences))]  # private ids, never scheduled
        try:
            for sid, seq in zip(ids, sequences):
                self.cache.reserve(sid, len(seq))
            logits, starts = self.run([(sid, seq, 0) for sid, seq in zip(ids, sequences)])
            return [logits[a:b] for a, b in zip(starts, starts[1:])]
        finally:
            for sid in ids:
                self.cache.free(sid)


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
