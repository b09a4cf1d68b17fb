"""Shared pieces of the transport contract tests (also run inside a child process)."""

from __future__ import annotations

import torch

from transfer import Destination, MultimodalDataBuffers


def payload(
    n: int, hidden: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, hidden, generator=g).to(dtype)
    d = torch.randn(n, 3 * hidden, generator=g).to(dtype)
    return e, d


def fragment(buf: MultimodalDataBuffers, n_tokens: int) -> list[int]:
    """Leave the pool with holes so that ``n_tokens`` needs >= 3 non-contiguous blocks."""
    everything = buf.alloc(buf.capacity_tokens)
    assert everything is not None
    buf.free(everything[0::2])  # free every other block
    blocks = buf.alloc(n_tokens)
    assert blocks is not None
    assert len(blocks) >= 3 and all(b - a > 1 for a, b in zip(blocks, blocks[1:], strict=False))
    return blocks


def destination(buf: MultimodalDataBuffers, blocks: list[int]) -> Destination:
    d = buf.describe(blocks)
    return Destination(d.session, d.block_tokens, tuple(d.embed_addrs), tuple(d.deepstack_addrs))
