"""Perplexity on the English text of Python's own documentation (`pydoc_data.topics`,
shipped with every CPython), the project's standing quality metric.

The token stream is split so that evaluation and calibration never share text: evaluation
windows come from the front, calibration (QoQ) takes the tokens after EVAL_TOKENS_RESERVED.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

EVAL_TOKENS_RESERVED = 24 * 512  # the default eval set; calibration starts after it


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def eval_windows(tokenizer, num_seqs: int, seq_len: int) -> list[list[int]]:
    ids = tokenizer.encode(pydoc_text())
    if len(ids) < num_seqs * seq_len:
        raise ValueError(f"pydoc text has {len(ids)} tokens, fewer than {num_seqs} x {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(num_seqs)]


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    seconds: float


def perplexity(engine, num_seqs: int = 24, seq_len: int = 512, batch: int = 4,
               progress: bool = True) -> PerplexityResult:
    windows = eval_windows(engine.tokenizer, num_seqs, seq_len)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in tqdm(range(0, len(windows), batch), desc="qeval", disable=not progress, unit="batch"):
        group = windows[i:i + batch]
        for seq, logits in zip(group, engine.score(group)):
            target = torch.tensor(seq[1:], device=logits.device)
            nll += F.cross_entropy(logits[:-1].float(), target, reduction="sum").item()
            count += len(seq) - 1
    return PerplexityResult(math.exp(nll / count), count, time.perf_counter() - t0)
