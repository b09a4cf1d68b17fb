"""``MultimodalDataBuffers``: the language side's pre-registered, block-based receive pool.

One allocation from the transport holds two regions, both cut into ``num_blocks`` blocks of
``block_tokens`` rows::

    embeds    [num_blocks * block_tokens, H]    rows for the LM's input sequence
    deepstack [num_blocks * block_tokens, 3H]   [ds0 | ds1 | ds2], added after layers 0, 1, 2

Block ``b`` holds rows ``b*block_tokens ...`` of both regions, so every block of a request
carries its deepstack rows. The pool is owned by the language server's receiver loop and is not
thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from transfer.allocator import BlockAllocator
from transfer.base import TransferReceiver, coalesce
from transfer.checksum import pool_rows_checksum

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")


@dataclass(frozen=True, slots=True)
class BlockAddresses:
    """Remote addresses of granted blocks, in lending order (what goes into an ``EncodeJob``)."""

    session: str
    block_tokens: int
    embed_addrs: list[int]
    deepstack_addrs: list[int]


class PoolLayout:
    """The pool without its memory: sizes, the block allocator, and where blocks are.

    What the lender needs (``language_server.receiver.Receiver``): with ``--engine sglang`` the
    memory lives in SGLang's scheduler process and the front door holds only this, built from
    the host's ``PoolHello`` (``from_hello``). ``MultimodalDataBuffers`` is this plus memory.
    """

    def __init__(self, num_blocks: int, block_tokens: int, hidden: int,
                 dtype: torch.dtype = torch.float32, session: str = "", embed_base: int = 0,
                 deepstack_base: int = 0) -> None:  # fmt: skip
        if block_tokens < 1 or hidden < 1:
            raise ValueError("block_tokens and hidden must be >= 1")
        dtype_name(dtype)
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks, self.block_tokens, self.hidden, self.dtype = (
            num_blocks,
            block_tokens,
            hidden,
            dtype,
        )
        self.session, self.embed_base, self.deepstack_base = session, embed_base, deepstack_base

    @classmethod
    def from_hello(cls, hello: Any) -> PoolLayout:
        """The layout a pool's host announced (a ``protocol.pool.PoolHello``)."""
        return cls(hello.num_blocks, hello.block_tokens, hello.hidden, DTYPES[hello.dtype],
                   hello.session, hello.embed_base, hello.deepstack_base)  # fmt: skip

    # --- sizes ------------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def bytes_per_token(self) -> int:
        return 4 * self.hidden * self.dtype.itemsize

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_tokens)

    # --- allocation -------------------------------------------------------------------------

    def alloc(self, n_tokens: int) -> list[int] | None:
        """Blocks for ``n_tokens`` rows, or None if the pool cannot hold them right now.

        Raises ``ValueError`` if the request can never fit (more than the whole pool).
        """
        need = self.blocks_for(n_tokens)
        if need > self.num_blocks:
            raise ValueError(
                f"{n_tokens} tokens need {need} blocks; the pool has {self.num_blocks} "
                f"blocks of {self.block_tokens} tokens"
            )
        return self.allocator.alloc(need)

    def free(self, blocks: list[int]) -> None:
        """Return blocks; raises ``DoubleFreeError`` on a block that is not allocated."""
        self.allocator.free(blocks)

    def describe(self, blocks: list[int]) -> BlockAddresses:
        """Remote addresses of ``blocks`` for an ``EncodeJob`` (requires a transport session)."""
        if not self.session:
            raise RuntimeError("buffers have no transport receiver")
        e_blk = self.block_tokens * self.hidden * self.dtype.itemsize
        return BlockAddresses(
            session=self.session,
            block_tokens=self.block_tokens,
            embed_addrs=[self.embed_base + b * e_blk for b in blocks],
            deepstack_addrs=[self.deepstack_base + b * 3 * e_blk for b in blocks],
        )

    def block_rows(self, blocks: list[int], n_tokens: int) -> list[tuple[int, int]]:
        """``(start_row, rows)`` runs in pool coordinates that hold the request's rows."""
        bt = self._check_fits(blocks, n_tokens)
        runs = coalesce(n_tokens, bt, [(b * bt,) for b in blocks], (1,))
        return [(start[0], rows) for _, rows, start in runs]

    def _check_fits(self, blocks: list[int], n_tokens: int) -> int:
        """``block_tokens``, after checking that ``n_tokens`` rows fit ``blocks``."""
        if not 0 <= n_tokens <= len(blocks) * self.block_tokens:
            raise ValueError(f"{n_tokens} tokens do not fit {len(blocks)} blocks")
        return self.block_tokens


class MultimodalDataBuffers(PoolLayout):
    """The pool with its memory, allocated (and registered) by the transport's receiver."""

    def __init__(
        self,
        num_blocks: int,
        block_tokens: int,
        hidden: int,
        dtype: torch.dtype = torch.float32,
        receiver: TransferReceiver | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(num_blocks, block_tokens, hidden, dtype)
        self.receiver = receiver
        rows = num_blocks * block_tokens
        elt = dtype.itemsize
        nbytes = rows * 4 * hidden * elt
        if receiver is not None:
            storage = receiver.allocate(nbytes, device)
        else:
            storage = torch.empty(nbytes, dtype=torch.uint8, device=device)
        split = rows * hidden * elt
        self.embeds = storage[:split].view(dtype).view(rows, hidden)
        self.deepstack = storage[split:].view(dtype).view(rows, 3 * hidden)
        if receiver is not None:
            self.session = receiver.session
            self.embed_base = receiver.address_of(self.embeds)
            self.deepstack_base = receiver.address_of(self.deepstack)

    def checksum(self, blocks: list[int], n_tokens: int) -> int:
        """``rows_checksum`` of the rows in ``blocks``, read in place (no gather)."""
        bt = self._check_fits(blocks, n_tokens)
        return pool_rows_checksum(
            self.embeds, self.deepstack, n_tokens, bt, lambda r: blocks[r // bt] * bt + r % bt
        )

    def verify(self, blocks: list[int], n_tokens: int, checksum: int) -> str:
        """What is wrong with the rows in ``blocks`` against the writer's ``checksum`` ("":
        nothing). The one verification, wherever the pool lives (the language server's
        Receiver, or the pool's host in SGLang's scheduler process)."""
        try:
            same = self.checksum(blocks, n_tokens) == checksum
        except (ValueError, IndexError) as exc:
            return f"cannot be verified: {exc}"
        return "" if same else "do not match the sender's checksum"

    # --- reading ----------------------------------------------------------------------------

    def gather(self, blocks: list[int], n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's ``(embeds [n, H], deepstack [n, 3H])``.

        Views into the pool when the blocks are contiguous (valid until the blocks are freed),
        otherwise new tensors.
        """
        runs = self.block_rows(blocks, n_tokens)
        if len(runs) == 1:
            s, n = runs[0]
            return self.embeds[s : s + n], self.deepstack[s : s + n]
        if not runs:
            return self.embeds[:0], self.deepstack[:0]
        idx = torch.cat([torch.arange(s, s + n) for s, n in runs]).to(self.embeds.device)
        return self.embeds.index_select(0, idx), self.deepstack.index_select(0, idx)
