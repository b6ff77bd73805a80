"""Streaming text: runtime/detokenize.py and Engine.stream yield exactly the new text, whole
characters only. A byte-level tokenizer whose 256 tokens are the 256 bytes splits every emoji
(4 UTF-8 bytes) and CJK character (3 bytes) over several tokens; fed one token at a time, the
stream must concatenate to the final decode with no U+FFFD and no repeated text (the old
stream re-sent the whole text whenever a prefix ended inside a character)."""
import random

import pytest

from qcompile.runtime.detokenize import IncrementalDecoder
from qcompile.runtime.engine import Engine
from qcompile.runtime.scheduler import Request

EMOJI = "🌟🌟🌟🌟"
JAPANESE = "東京は日本の首都です。富士山が見えます！"  # 20 characters, 60 bytes
MIXED = "Paris 🇫🇷 est la capitale, 北京 is 首都 (2 + 2 = 4) 👍🏽"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Token i is byte i (GPT-2's byte-to-unicode symbols), plus an end-of-text token 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    assert len(fast) == 257
    return fast


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(others)}
    return [table[b] for b in range(256)]


def _ids(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")), "one token per byte"
    return ids


@pytest.mark.parametrize("text", [EMOJI, JAPANESE, MIXED])
def test_stream_of_bytes_is_the_text(byte_tokenizer, text):
    dec = IncrementalDecoder(byte_tokenizer)
    pieces = [dec.push(t) for t in _ids(byte_tokenizer, text)] + [dec.flush()]
    assert "".join(pieces) == text == byte_tokenizer.decode(_ids(byte_tokenizer, text))
    assert not any("\ufffd" in p for p in pieces)
    # every character arrives whole, with the token that carries its last byte
    assert [p for p in pieces if p] == list(text)


def test_output_cut_inside_a_character_flushes_as_decode_does(byte_tokenizer):
    ids = _ids(byte_tokenizer, "ok 🌟")[:-2]  # stopped after 2 of the emoji's 4 bytes
    dec = IncrementalDecoder(byte_tokenizer)
    streamed = "".join(dec.push(t) for t in ids)
    assert streamed == "ok " and "\ufffd" not in streamed  # the partial character held back
    assert streamed + dec.flush() == byte_tokenizer.decode(ids)


def test_special_tokens_add_no_text(byte_tokenizer):
    dec = IncrementalDecoder(byte_tokenizer)
    eos = byte_tokenizer.eos_token_id
    assert [dec.push(t) for t in [*_ids(byte_tokenizer, "hi"), eos]] == ["h", "i", ""]
    assert dec.flush() == ""


def test_bpe_merges_stream_to_decode(tiny_tokenizer):
    """A real BPE vocabulary (multi-byte merges, spaces): random ids stream to the decode."""
    rng = random.Random(0)
    ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(300)]
    dec = IncrementalDecoder(tiny_tokenizer)
    streamed = "".join(dec.push(t) for t in ids) + dec.flush()
    assert streamed == tiny_tokenizer.decode(ids, skip_special_tokens=True)


class _ScriptedEngine(Engine):
    """Engine.stream over scripted tokens: _submit, _run and abort replaced, no program."""

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs = tokenizer, outputs

    def _submit(self, prompts, chat, params):
        return [Request([1], params, index=i) for i in range(len(prompts))]

    def _run(self, reqs):
        steps = max(len(o) for o in self.outputs)
        for s in range(steps):
            for req, out in zip(reqs, self.outputs):
                if s < len(out):
                    req.out.append(out[s])
                    req.finish_reason = "length" if s == len(out) - 1 else None
                    yield req, out[s], s == len(out) - 1

    def abort(self, req):
        assert req.finish_reason, "a finished stream aborts nothing that runs"


def test_engine_stream_interleaves_requests_by_whole_characters(byte_tokenizer):
    texts = [EMOJI, JAPANESE]
    engine = _ScriptedEngine(byte_tokenizer, [_ids(byte_tokenizer, t) for t in texts])
    got = {0: [], 1: []}
    events = list(engine.stream(["a", "b"], max_new_tokens=100))
    for ev in events:
        got[ev.index].append(ev.text)
    assert len(events) == sum(len(t.encode()) for t in texts)  # one event per token
    assert ["".join(got[i]) for i in (0, 1)] == texts
    assert [t for t in got[0] if t] == list(EMOJI)  # not "�🌟�🌟🌟..."
    last = {ev.index: ev for ev in events}
    assert [last[i].finish_reason for i in (0, 1)] == ["length", "length"]
