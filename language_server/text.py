"""Incremental detokenization for streaming."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Turns token ids into text deltas; holds back a trailing incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text emitted so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return delta

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full if delta else self.text
        return delta
