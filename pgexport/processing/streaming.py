"""Incremental detokenization: token ids in one at a time, text pieces out as they become final.

Decoding each token on its own is wrong for a byte-fallback tokenizer: a character outside the
vocabulary arrives as several `<0xNN>` byte tokens, and the first of them alone decodes to the
replacement character "\\ufffd". Worse, the decoders turn a whole run of byte tokens into text at
once, and one invalid byte turns the whole run into replacement characters, so text decoded
from the start of a run can still change. `TextStream` decodes the whole sequence so far and
hands out only the new text, holding it back while the sequence ends in a run of byte tokens
(until an ordinary token closes the run); `finish` flushes whatever is left. Joined, the pieces equal
`tokenizer.decode(all_ids)`, `<locNNNN>` detection tokens included (they are ordinary added
tokens and decode to their own text).

    >>> stream = TextStream(tokenizer)                     # doctest: +SKIP
    >>> [stream.push(t) for t in ids] + [stream.finish()]  # doctest: +SKIP
    ['a', ' red', '', ' ✓', ' circle', '']
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) valid UTF-8
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback pieces (Gemma's and the stand-in's)


class TextStream:
    """One sequence's incremental decoder (see the module docstring)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""  # text already handed out: always a prefix of the decoded sequence

    def is_byte(self, token_id: int) -> bool:
        token = self.tokenizer.id_to_token(token_id)
        return token is not None and BYTE_TOKEN.fullmatch(token) is not None

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it settles ("" while a run of byte tokens is open)."""
        self.ids.append(int(token_id))
        if self.is_byte(self.ids[-1]):
            return ""  # the run's text is known only once it ends
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if not text.startswith(self.emitted):  # a decoder that rewrote earlier text: wait
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def finish(self) -> str:
        """The rest of the text (a held-back tail); call once after the last token."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += piece
        return piece


def stream_text(steps: Iterable[np.ndarray], tokenizer, eos_token_id: int | None) -> Iterator[str]:
    """Text pieces of row 0 of a generation, from the per-step tokens of
    `pgexport.runtime.generation.iter_tokens`; stops at eos. Closing this iterator closes `steps`
    (so the generation stops too)."""
    stream = TextStream(tokenizer)
    try:
        for tokens in steps:
            token = int(np.asarray(tokens).reshape(-1)[0])
            if token == eos_token_id:
                break
            piece = stream.push(token)
            if piece:
                yield piece
        tail = stream.finish()
        if tail:
            yield tail
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
