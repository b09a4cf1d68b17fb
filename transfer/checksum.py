"""Cheap content checksum that both sides compute over the rows of one request.

Reading every byte would cost as much as the transfer itself on TCP, so by default we hash a
fixed sample of rows (first, last and evenly spaced ones, always including each block's first
row) of both regions. ``full=True`` hashes everything, for tests and debugging.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

SAMPLE_ROWS = 64


def _rows(n: int, block_tokens: int) -> list[int]:
    if n == 0:
        return []
    picks = set(range(0, n, block_tokens)) | {n - 1}
    step = max(1, n // SAMPLE_ROWS)
    picks.update(range(0, n, step))
    return sorted(picks)


def _bytes_of(t: torch.Tensor) -> Any:
    return t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()


def rows_checksum(
    embeds: torch.Tensor, deepstack: torch.Tensor, block_tokens: int, *, full: bool = False
) -> int:
    """CRC32 over sampled (or all) rows of ``embeds [n, H]`` and ``deepstack [n, 3H]``."""
    n = embeds.shape[0]
    if deepstack.shape[0] != n:
        raise ValueError(f"row counts differ: {n} vs {deepstack.shape[0]}")
    if full or n <= SAMPLE_ROWS:
        e, d = embeds, deepstack
    else:
        idx = torch.tensor(_rows(n, block_tokens), device=embeds.device)
        e, d = embeds.index_select(0, idx), deepstack.index_select(0, idx)
    crc = zlib.crc32(_bytes_of(e))
    crc = zlib.crc32(_bytes_of(d), crc)
    return crc ^ (n << 32)
