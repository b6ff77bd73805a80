"""The tokenizer a GGUF file names, its pre-tokenizer included.

transformers converts a GGUF's vocabulary and merges into a fast tokenizer but gives every
byte-level BPE the plain GPT-2 split, dropping the pre-tokenizer type the file names in
`tokenizer.ggml.pre`. llama.cpp applies that type's regexes (`llm_tokenizer_bpe` in
llama-vocab.cpp), so text tokenizes differently from llama.cpp on the same file. SmolLM2's
GGUF says `smollm`: every digit is its own piece before the GPT-2 regex, which changes the
whitespace before numbers (GPL-3 text: 7,658 tokens with the plain split, 7,639 with the
file's, as llama.cpp: bench/results/tokenizer-smollm2-2026-12-06.md). Here each llama.cpp type
is written as a `tokenizers` pre-tokenizer.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from tokenizers import pre_tokenizers


def _gpt2():
    """GPT-2's regex, then bytes to symbols (llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT2)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2():
    """`\\p{N}` as its own piece, then GPT-2's regex (LLAMA_VOCAB_PRE_TYPE_SMOLLM & co.)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# tokenizer.ggml.pre -> pre-tokenizer, as llama-vocab.cpp groups the types.
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), _gpt2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), _digits_then_gpt2),
}


def gguf_metadata_string(gguf, key: str) -> str | None:
    """A string field of the GGUF header (None when absent). `gguf`: the file's path, or a
    `GGUFReader` already made (parsing the header of a 49k-token vocabulary takes seconds)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf) if isinstance(gguf, (str, Path)) else gguf
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def load_gguf_tokenizer(path: Path, reader=None):
    """transformers' tokenizer of the GGUF at `path` with the file's pre-tokenizer.

    Byte-level BPE files (`tokenizer.ggml.model = gpt2`) of a type in PRE_TOKENIZERS get that
    type's pipeline; other types keep transformers' conversion, with a warning naming the type.
    SentencePiece files (`llama`) have no pre-tokenizer type. `reader`: the file's
    `GGUFReader`, if the caller has one."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reader = reader or GGUFReader(path)
    if gguf_metadata_string(reader, "tokenizer.ggml.model") != "gpt2":
        return tokenizer
    pre = gguf_metadata_string(reader, "tokenizer.ggml.pre") or "gpt-2"
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{path.name}: pre-tokenizer type {pre!r} is not in qcompile's table "
                      "(models/gguf_tokenizer.py); using transformers' conversion, which may "
                      "split text differently from llama.cpp")
        return tokenizer
    tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    return tokenizer
