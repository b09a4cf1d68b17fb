"""Recent ViT outputs of this encoder, by image content (issue 18): a repeated image skips the
decode, the image processor and the ViT; only its write runs again.

Keyed by SHA-256 over the image's bytes as the job carried them, and for a video the frames it
samples (one process has one set of weights, one dtype and one image and video processor, so
nothing else changes the rows), looked up by the whole digest. Bounded in bytes (the rows' own: embeds ``[n, H]`` + deepstack ``[n, 3H]``, on the
encoder's device), least recently used out. An entry owns its tensors (copies of the split), so
eviction never touches rows a write is reading: a job served from the cache copies them into its
staging span, or holds its own reference when it is larger than the arena.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

import protocol as P


@dataclass(frozen=True, slots=True)
class CachedRows:
    grid: tuple[int, int, int]
    n_tokens: int
    embeds: torch.Tensor  # [n, H]
    deepstack: torch.Tensor  # [n, 3H]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.embeds, self.deepstack)


def _nbytes(embeds: torch.Tensor, deepstack: torch.Tensor) -> int:
    return (embeds.numel() + deepstack.numel()) * embeds.element_size()


class RowCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("the encoder's image cache must be >= 0 bytes")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, CachedRows] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(job: P.EncodeJob) -> bytes:
        """What makes a job's rows: its bytes; a video's sampled frame indices, or each of the
        client's frames (length-prefixed, so no two lists hash alike)."""
        h = hashlib.sha256(job.data)
        if job.is_video:
            h.update(b"\0video" + b"".join(i.to_bytes(4, "little") for i in job.frames))
            for frame in job.frame_data:
                h.update(len(frame).to_bytes(8, "little") + frame)
        return h.digest()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> CachedRows | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, grid: tuple[int, int, int], embeds: torch.Tensor,
            deepstack: torch.Tensor) -> None:  # fmt: skip
        """Keep copies of one image's rows (nothing when they alone exceed the bound)."""
        size = _nbytes(embeds, deepstack)
        if key in self.entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        self.entries[key] = CachedRows(tuple(grid), embeds.shape[0],  # type: ignore[arg-type]
                                       embeds.clone(), deepstack.clone())  # fmt: skip
        self.bytes += size

    def stats(self) -> dict[str, int]:
        return {"cached_images": len(self.entries), "cache_bytes": self.bytes,
                "cache_hits": self.hits, "cache_misses": self.misses,
                "cache_evictions": self.evictions}  # fmt: skip
