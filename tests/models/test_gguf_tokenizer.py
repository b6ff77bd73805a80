"""models/gguf_tokenizer.py: the SmolLM2 GGUF's tokenizer follows the file's pre-tokenizer
type (`smollm`), the ids llama.cpp's rules give: each digit its own piece (`\\p{N}`), then
GPT-2's regex inside each piece, then the file's BPE on each piece. transformers' conversion
(the plain GPT-2 split) differs on whitespace before digits; the artifact's saved tokenizer
keeps the rule."""
import pytest
import regex

from qcompile.models.gguf_tokenizer import PRE_TOKENIZERS, gguf_metadata_string

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXT = ("Version 3, 29 June 2007\n\n  1. Definitions   42 apples,\t7 pears;  2024-12-06 at "
        "20:35  (x=3.14159)   \n\n\n   99 bottles\u00a0and 1000000 more.  ")


def _byte_symbols() -> dict[int, str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(others)}


def llama_cpp_smollm_ids(tokenizer, text: str) -> list[int]:
    """llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: split at every \\p{N} (kept as pieces), the
    GPT-2 regex inside each piece, then BPE of each piece's byte symbols."""
    symbols, model = _byte_symbols(), tokenizer.backend_tokenizer.model
    ids = []
    for part in regex.split(r"(\p{N})", text):
        for piece in regex.findall(GPT2_REGEX, part):
            mapped = "".join(symbols[b] for b in piece.encode("utf-8"))
            ids += [t.id for t in model.tokenize(mapped)]
    return ids


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_checkpoint):
    return smollm2_checkpoint.tokenizer  # load_checkpoint builds it with load_gguf_tokenizer


def test_file_names_smollm(smollm2_gguf, tmp_path):
    from gguf import GGUFReader, GGUFWriter
    reader = GGUFReader(smollm2_gguf)  # a reader: one parse of the header (it takes seconds)
    assert gguf_metadata_string(reader, "tokenizer.ggml.pre") == "smollm"
    assert gguf_metadata_string(reader, "tokenizer.ggml.model") == "gpt2"
    assert gguf_metadata_string(reader, "no.such.key") is None
    small = tmp_path / "small.gguf"  # or a path, here of a header with one string field
    writer = GGUFWriter(small, "llama")
    writer.add_string("tokenizer.ggml.pre", "smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_metadata_string(small, "tokenizer.ggml.pre") == "smollm"


def test_digits_split_one_by_one_as_llama_cpp(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(TEXT)
    assert ids == llama_cpp_smollm_ids(smollm2_tokenizer, TEXT)
    assert smollm2_tokenizer.decode(ids) == TEXT
    digits = [smollm2_tokenizer.decode([i]) for i in smollm2_tokenizer.encode("1000000")]
    assert digits == list("1000000")


def test_plain_gpt2_split_differs_on_spaces_before_digits(smollm2_tokenizer):
    """The control: the split transformers gives the file tokenizes this text otherwise, so
    the test above would catch a loader that dropped the rule."""
    from tokenizers import Tokenizer
    plain = Tokenizer.from_str(smollm2_tokenizer.backend_tokenizer.to_str())
    plain.pre_tokenizer = PRE_TOKENIZERS["gpt-2"]()
    text = "a  1   2"
    assert plain.encode(text).ids != smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.encode(text) == llama_cpp_smollm_ids(smollm2_tokenizer, text)


def test_saved_tokenizer_keeps_the_rule(smollm2_tokenizer, tmp_path):
    """The artifact stores the tokenizer with save_pretrained; loading it back keeps the split."""
    from transformers import AutoTokenizer
    smollm2_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXT) == smollm2_tokenizer.encode(TEXT)
