"""The encoder's staging arena: the memory every write reads from, registered once at start-up.

RDMA reads a write's source from registered memory; registering per request costs time that
grows with the size (about 3 ms for 64 MiB) and pins pages under load. So the ViT's split
writes each job's rows straight into a span of this arena (``embeds [n, H]`` then
``deepstack [n, 3H]``, contiguous), the transport reads them from there, and the span goes back
when the job is finished (its write done, or stopped). A full arena holds the next ViT batch
back: the encoder cannot run ahead of the language side's pool. A job larger than the whole
arena gets fresh memory (registered for that write alone) rather than never running.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer import BlockAllocator, TransferSender


@dataclass(frozen=True, slots=True)
class Span:
    chunks: list[int]
    embeds: torch.Tensor  # [n, H] view into the arena
    deepstack: torch.Tensor  # [n, 3H] view into the arena


class StagingArena:
    def __init__(self, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device | str,
                 sender: TransferSender | None = None, chunk_tokens: int = 16) -> None:  # fmt: skip
        self.hidden, self.dtype, self.chunk_tokens = hidden, dtype, chunk_tokens
        self.num_chunks = max(1, -(-tokens // chunk_tokens))
        self.row_elems = 4 * hidden  # embeds + three deepstack features
        self.storage = torch.empty(self.num_chunks * chunk_tokens * self.row_elems, dtype=dtype,
                                   device=device)  # fmt: skip
        self.allocator = BlockAllocator(self.num_chunks)
        if sender is not None:
            sender.register_arena(self.storage)

    @property
    def capacity_tokens(self) -> int:
        return self.num_chunks * self.chunk_tokens

    @property
    def free_tokens(self) -> int:
        return self.allocator.num_free * self.chunk_tokens

    def fits(self, n: int) -> bool:
        """Whether ``n`` rows can ever be staged here (else use fresh memory)."""
        return n <= self.capacity_tokens

    def take(self, n: int) -> Span | None:
        """A span for ``n`` rows, or None while the arena is too full for it."""
        chunks = self.allocator.alloc_run(max(1, -(-n // self.chunk_tokens)))
        if chunks is None:
            return None
        start = chunks[0] * self.chunk_tokens * self.row_elems
        flat = self.storage[start : start + n * self.row_elems]
        h = self.hidden
        return Span(chunks, flat[: n * h].view(n, h), flat[n * h :].view(n, 3 * h))

    def give_back(self, span: Span) -> None:
        self.allocator.free(span.chunks)
