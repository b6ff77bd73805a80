"""Incremental detokenization for streaming: each new token yields exactly the text it adds,
whole characters only.

A byte-level tokenizer splits a character of several UTF-8 bytes (emoji: 4, CJK: 3) over
several tokens; decoding a prefix that ends inside a character gives U+FFFD. The decoder
holds such a tail back until the character is complete, so the concatenated stream equals
`tokenizer.decode(all ids)` and shows no U+FFFD that the final text does not have.

Each step decodes a short window, not the whole output (the scheme of vLLM's
`detokenize_incrementally`): the text of ids[prefix:] minus the text of ids[prefix:read], where
`read` is where the last emitted text ended and `prefix` one emission before it. The earlier
token in the window keeps SentencePiece's leading-space rule right (a "▁word" token decoded
alone loses its space).
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decode() gives for an incomplete UTF-8 sequence


class IncrementalDecoder:
    """Feed token ids one at a time with `push`; `flush` at the end returns what was held."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # window start; end of the text already emitted

    def _texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip),
                decode(self.ids[self.prefix:], skip_special_tokens=self.skip))

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before, now = self._texts()
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """The text held back at the end (an output cut inside a character keeps its U+FFFD,
        as the final decode does)."""
        before, now = self._texts()
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
