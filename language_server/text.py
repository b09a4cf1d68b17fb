"""Incremental detokenization for streaming."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Turns token ids into text deltas in constant work per token.

    Each step decodes only a short window: the tokens since the last emitted text plus the ones
    just before them (their context, e.g. a leading space), the usual prefix/read-offset scheme.
    A trailing incomplete UTF-8 sequence (decoded as U+FFFD) is held back until more tokens
    complete it, or until ``flush``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text emitted so far
        self._prefix = 0  # window start: context tokens already emitted
        self._read = 0  # tokens up to here are emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
