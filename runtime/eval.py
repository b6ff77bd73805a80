"""Perplexity of an artifact on a text: by default the English text of Python's own
documentation (`pydoc_data.topics`, shipped with every CPython), the project's standing
quality metric; any UTF-8 file with `qeval --text FILE`.

The pydoc token stream is split so that evaluation and calibration never share text:
evaluation windows come from the front, calibration (QoQ) takes the tokens after
EVAL_TOKENS_RESERVED.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

EVAL_TOKENS_RESERVED = 24 * 512  # the default eval set; calibration starts after it
PYDOC = "pydoc_data.topics"


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path) -> str:
    """A UTF-8 text file (a leading BOM dropped), or ValueError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path} is not UTF-8 (byte {e.start}): convert it, e.g. "
                         "iconv -t UTF-8") from None
    if not text.strip():
        raise ValueError(f"--text {path} is empty")
    return text


def eval_windows(tokenizer, num_seqs: int, seq_len: int, text: str | None = None,
                 name: str = PYDOC) -> list[list[int]]:
    """Consecutive windows of seq_len tokens from the front of `text` (pydoc by default).

    The pydoc set must have all num_seqs windows (results stay comparable); another text
    gives as many as it holds, up to num_seqs, and at least one."""
    ids = tokenizer.encode(pydoc_text() if text is None else text)
    if text is None and len(ids) < num_seqs * seq_len:
        raise ValueError(f"pydoc text has {len(ids)} tokens, fewer than {num_seqs} x {seq_len}")
    if len(ids) < seq_len:
        raise ValueError(f"{name} has {len(ids)} tokens, fewer than one window of {seq_len}: "
                         "pass a smaller --seq-len or a longer text")
    count = min(num_seqs, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(count)]


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int       # predicted tokens: sequences x (seq_len - 1)
    sequences: int
    seq_len: int
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def perplexity(engine, num_seqs: int = 24, seq_len: int = 512, batch: int = 4,
               progress: bool = True, text: str | None = None,
               name: str = PYDOC) -> PerplexityResult:
    """exp(mean next-token cross entropy) over the windows of `text` (pydoc by default)."""
    windows = eval_windows(engine.tokenizer, num_seqs, seq_len, text, name)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in tqdm(range(0, len(windows), batch), desc="qeval", disable=not progress, unit="batch"):
        group = windows[i:i + batch]
        for seq, logits in zip(group, engine.score(group)):
            target = torch.tensor(seq[1:], device=logits.device)
            nll += F.cross_entropy(logits[:-1].float(), target, reduction="sum").item()
            count += len(seq) - 1
    return PerplexityResult(math.exp(nll / count), count, len(windows), seq_len,
                            time.perf_counter() - t0)
