"""Resident images: the rows of recently seen images stay in their blocks (issue 18).

An image is known by its content key (``prompt/builder.py``: SHA-256 over the bytes the server
received and everything that changes its rows), computed here, never taken from a client, and
looked up by the whole 32-byte digest: no shorter key exists on this side. After a request has
read its rows, the blocks of each of its images stay allocated as a ``Resident``: read-only (no
encoder is ever lent them), reference-counted by the requests reading them. A later request with
the same key points at those blocks: no encode job, no write, no new blocks.

Residents nobody reads are evicted least-recently-used, by the receiver, whenever it needs room:
they count as free space when it decides whether a request fits, so a waiting request never
waits because of the cache. ``max_blocks`` bounds how much of the pool residents may hold.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class Resident:
    """One image's verified rows, kept in their blocks."""

    key: bytes  # the content key: the full SHA-256 digest
    blocks: list[int]
    n_tokens: int
    refs: int = 0  # requests that will read these rows (evictable at 0)


class ImageCache:
    """Residents by content key, least recently used first; counts hits, misses, evictions."""

    def __init__(self, max_blocks: int, bytes_per_token: int = 0) -> None:
        if max_blocks < 0:
            raise ValueError("the image cache's size must be >= 0 blocks")
        self.max_blocks = max_blocks
        self.bytes_per_token = bytes_per_token  # of one visual row, both regions
        self.entries: OrderedDict[bytes, Resident] = OrderedDict()
        self.blocks = 0  # held by residents
        self.idle_blocks = 0  # held by residents nobody reads (evictable)
        self.hits = self.misses = self.evictions = 0
        self.hit_tokens = 0  # visual rows served from the cache (never encoded nor sent)

    def __len__(self) -> int:
        return len(self.entries)

    def acquire(self, key: bytes) -> Resident | None:
        """The resident image with ``key``, now read by one more request; None on a miss."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self._ref(entry, +1)
        self.hits += 1
        self.hit_tokens += entry.n_tokens
        return entry

    def release(self, entry: Resident) -> None:
        """One reader of ``entry`` is done with its rows."""
        if entry.refs <= 0:
            raise RuntimeError(f"resident image released more often than acquired ({entry.refs})")
        self._ref(entry, -1)

    def room_for(self, n_blocks: int) -> list[Resident] | None:
        """Make room within ``max_blocks`` for ``n_blocks`` more: the idle residents to evict
        (least recently used first; already forgotten here, their blocks the caller's to free),
        or None when residents that are being read leave no room."""
        if n_blocks > self.max_blocks:
            return None
        excess = self.blocks + n_blocks - self.max_blocks
        if excess > self.idle_blocks:
            return None
        return self.evict(excess) if excess > 0 else []

    def insert(self, key: bytes, blocks: list[int], n_tokens: int, refs: int) -> Resident | None:
        """Keep ``blocks`` (verified rows of ``key``) resident, read by ``refs`` requests; None
        when ``key`` is resident already (the caller keeps its blocks) or there is no room (call
        ``room_for`` first)."""
        if key in self.entries or self.blocks + len(blocks) > self.max_blocks:
            return None
        entry = Resident(key, list(blocks), n_tokens)
        self.entries[key] = entry
        self.blocks += len(entry.blocks)
        self.idle_blocks += len(entry.blocks)
        self._ref(entry, refs)
        return entry

    def evict(self, n_blocks: int) -> list[Resident]:
        """Forget idle residents, least recently used first, until they held ``n_blocks`` (or
        none is left); returns them: their blocks are the caller's to free."""
        out: list[Resident] = []
        freed = 0
        for entry in list(self.entries.values()):
            if freed >= n_blocks:
                break
            if entry.refs == 0:
                del self.entries[entry.key]
                self.blocks -= len(entry.blocks)
                self.idle_blocks -= len(entry.blocks)
                self.evictions += 1
                freed += len(entry.blocks)
                out.append(entry)
        return out

    def _ref(self, entry: Resident, delta: int) -> None:
        was_idle = entry.refs == 0
        entry.refs += delta
        if was_idle and entry.refs > 0:
            self.idle_blocks -= len(entry.blocks)
        elif not was_idle and entry.refs == 0:
            self.idle_blocks += len(entry.blocks)
