"""Block allocator for ``MultimodalDataBuffers``: fixed-size blocks, no over-commit."""

from __future__ import annotations

import bisect


class DoubleFreeError(ValueError):
    """A block was freed that is not currently allocated."""


class BlockAllocator:
    """Hands out block ids ``0 .. num_blocks-1``.

    ``alloc`` prefers one contiguous run (first fit, so the sender can write it with one
    segment) and otherwise takes the lowest free ids. Not thread-safe: the language server's
    receiver loop is its only caller.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # kept sorted

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` distinct free block ids, or None when fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        start = self._first_run(n)
        if start is not None:
            blocks = self._free[start : start + n]
            del self._free[start : start + n]
        else:
            blocks = self._free[:n]
            del self._free[:n]
        return blocks

    def alloc_run(self, n: int) -> list[int] | None:
        """``n`` consecutive free block ids (first fit), or None when no such run is free."""
        if n < 1:
            raise ValueError(f"cannot allocate a run of {n} blocks")
        start = self._first_run(n) if n <= len(self._free) else None
        if start is None:
            return None
        blocks = self._free[start : start + n]
        del self._free[start : start + n]
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool. Raises ``DoubleFreeError`` (and frees none) on a bad id."""
        if len(set(blocks)) != len(blocks):
            raise DoubleFreeError(f"block listed twice in {blocks}")
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise DoubleFreeError(f"block {b} out of range 0..{self.num_blocks - 1}")
            i = bisect.bisect_left(self._free, b)
            if i < len(self._free) and self._free[i] == b:
                raise DoubleFreeError(f"block {b} is already free")
        for b in blocks:
            bisect.insort(self._free, b)

    def _first_run(self, n: int) -> int | None:
        """Index in ``_free`` where ``n`` consecutive block ids start, if any."""
        if n <= 1:
            return 0 if n <= len(self._free) else None
        free = self._free
        for i in range(len(free) - n + 1):
            if free[i + n - 1] - free[i] == n - 1:
                return i
        return None
