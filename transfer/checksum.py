"""Cheap content checksum that both sides compute over the rows of one request.

Reading every byte would cost as much as the transfer itself, so by default we hash a fixed
sample: up to ``SAMPLE_ROWS`` rows (first, last, evenly spaced, and each block's first row) and,
in each, up to ``SAMPLE_COLS`` evenly strided columns of both regions (about 16 KiB in all).
It catches stale, misplaced or unwritten blocks, not single flipped bits; ``full=True`` hashes
everything, for tests and debugging.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SAMPLE_ROWS = 64
SAMPLE_COLS = 64


def _rows(n: int, block_tokens: int) -> list[int]:
    if n == 0:
        return []
    picks = set(range(0, n, block_tokens)) | {n - 1}
    picks.update(range(0, n, max(1, n // SAMPLE_ROWS)))
    return sorted(picks)


def _sample(t: torch.Tensor, rows: list[int] | None) -> Any:
    """The sampled (or all, when ``rows`` is None) elements as a contiguous numpy array."""
    t = t.detach()
    ints = t.view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )
    if rows is None:
        return np.ascontiguousarray(ints.cpu().numpy())
    cols = slice(None, None, max(1, t.shape[1] // SAMPLE_COLS))
    if t.device.type != "cpu":
        idx = torch.tensor(rows, dtype=torch.long, device=t.device)
        return np.ascontiguousarray(ints[:, cols].index_select(0, idx).cpu().numpy())
    return np.ascontiguousarray(ints.numpy()[rows, cols])


def rows_checksum(
    embeds: torch.Tensor, deepstack: torch.Tensor, block_tokens: int, *, full: bool = False
) -> int:
    """Checksum of ``embeds [n, H]`` and ``deepstack [n, 3H]`` (CRC32 of samples, row count)."""
    n = embeds.shape[0]
    if deepstack.shape[0] != n:
        raise ValueError(f"row counts differ: {n} vs {deepstack.shape[0]}")
    return _crc(embeds, deepstack, None if full else _rows(n, block_tokens), n)


def pool_rows_checksum(
    embeds: torch.Tensor,
    deepstack: torch.Tensor,
    n: int,
    block_tokens: int,
    pool_row: Callable[[int], int],
) -> int:
    """``rows_checksum`` of ``n`` rows that live scattered in a pool: row ``r`` of the request is
    row ``pool_row(r)`` of ``embeds``/``deepstack``. Reads only the sampled rows, in place, and
    equals ``rows_checksum`` of the gathered rows."""
    return _crc(embeds, deepstack, [pool_row(r) for r in _rows(n, block_tokens)], n)


def _crc(embeds: torch.Tensor, deepstack: torch.Tensor, rows: list[int] | None, n: int) -> int:
    crc = zlib.crc32(_sample(embeds, rows))
    crc = zlib.crc32(_sample(deepstack, rows), crc)
    return crc ^ (n << 32)
