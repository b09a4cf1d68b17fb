"""Incremental detokenization and stop strings, for streaming and non-streaming answers alike."""

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


class StopStrings:
    """Cuts generated text before the first stop string, releasing only text that can no longer
    become part of one: the end of the text that could still be the start of a stop string is
    held back until the next tokens decide (a stop string spanning two tokens never leaks).

    ``feed`` takes the whole text so far (it only grows) and returns the next piece that is safe
    to send; after a match, ``stopped`` is set and nothing more is released.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.sent = 0  # characters released so far
        self.stopped = False

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        # a stop string cannot start before ``sent``: that text was not a prefix of one
        hits = [i for s in self.stops if (i := text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text) if final else len(text) - self._held(text)
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` (unsent) that starts some stop string."""
        room = len(text) - self.sent
        for k in range(min(room, max((len(s) - 1 for s in self.stops), default=0)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
