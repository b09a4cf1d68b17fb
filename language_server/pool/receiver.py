"""The language side of the data plane: lends blocks to encode jobs, checks what arrived, and
takes blocks back only when their writer is done with them.

Lends the blocks of a ``PoolLayout``: the pool itself (``MultimodalDataBuffers``) with the
reference engine, or only its layout when the memory lives where the model runs (``--engine
sglang``: SGLang's scheduler process, reached through a ``PoolHostLink`` that verifies rows
there). Runs on the asyncio loop (not thread-safe). A request's images get their blocks
together (never half a request, so two requests cannot starve each other);
each image's blocks are lent to one encoder process for one ``generation`` (a fresh random
nonce), and every message about them is checked against that lending: same encoder, same
generation, same row count, and rows that match the writer's checksum.

Blocks return by the rule in ``transfer/base.py`` and by no other path (``lifetimes.py``);
what encoders say is checked in ``arrivals.py``. Lending is here.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

import protocol as P
from language_server.pool.arrivals import Arrivals
from language_server.pool.cache import ImageCache
from language_server.pool.leases import Lease, LeaseState, Pending, RequestError
from language_server.pool.lifetimes import log
from transfer import MultimodalDataBuffers, dtype_name
from transfer.buffers import PoolLayout


class Receiver(Arrivals):
    """Lends blocks to encode jobs (see the module docstring); ``Arrivals`` checks what comes
    back and ``Lifetimes`` takes blocks back."""

    def __init__(self, buffers: PoolLayout, max_waiting: int = 64,
                 alloc_wait_s: float = 10.0, dead_writer_s: float = 30.0,
                 copy_event: Callable[[], Any] | None = None, host: Any = None,
                 cache: ImageCache | None = None) -> None:  # fmt: skip
        self.buffers = buffers
        # Where the memory is: here (MultimodalDataBuffers), or in another process whose
        # ``host`` (a PoolHostLink) verifies rows there; the engine then reads them there and
        # hands the blocks back with ``release``.
        self.local = isinstance(buffers, MultimodalDataBuffers)
        if not self.local and host is None:
            raise ValueError("a pool without memory here needs the host that holds it")
        self.host = host
        # marks the end of the copies queued so far (a CUDA event on a GPU pool; None: the
        # copies were synchronous, as on the CPU)
        on_gpu = self.local and buffers.embeds.is_cuda  # type: ignore[attr-defined]
        self.copy_event = copy_event or (_cuda_event if on_gpu else lambda: None)
        self.max_waiting, self.alloc_wait_s, self.dead_writer_s = (
            max_waiting,
            alloc_wait_s,
            dead_writer_s,
        )
        self.dtype = dtype_name(buffers.dtype)
        self.pending: dict[str, Pending] = {}
        self.waiting: deque[Pending] = deque()  # requests waiting for room in the pool
        self.lent: dict[tuple[str, int, int], Lease] = {}  # (rid, image, generation) -> lease
        self.handed: dict[str, Pending] = {}  # rows handed to the engine, in a pool elsewhere
        self.copying: list[tuple[Any, list[int]]] = []  # (CUDA event, blocks) of copies in flight
        self.on_lent: Callable[[Pending], None] = lambda pending: None  # send its jobs
        # an encoder's rows for ``lease`` arrived and matched (that encoder may cache them)
        self.on_rows: Callable[[Lease], None] = lambda lease: None
        self.peak_used = 0
        self.dropped_messages = 0
        self.cache = cache  # resident images (None: off)

    @property
    def orphaned_blocks(self) -> int:
        """Blocks of ended requests that their writers still hold."""
        return sum(
            len(x.blocks or ()) for x in self.lent.values() if x.state is LeaseState.ORPHANED
        )

    @property
    def handed_blocks(self) -> int:
        """Blocks whose rows the engine reads from a pool in its own process (until released)."""
        return sum(len(x.blocks or ()) for r in self.handed.values() for x in r.leases)

    @property
    def lent_blocks(self) -> int:
        """Blocks lent to encoders now (jobs out, verified rows, orphans)."""
        return sum(len(x.blocks or ()) for x in self.lent.values())

    # --- lending ----------------------------------------------------------------------------

    def admit(self, pending: Pending) -> None:
        """Lend blocks to every image of ``pending`` now (then ``on_lent``), or queue it.

        Raises ``RequestError`` 413 when it can never fit, 503 when too many already wait.
        """
        need = sum(self.buffers.blocks_for(x.n_tokens) for x in pending.leases)
        if need > self.buffers.num_blocks:
            raise RequestError(413, f"{sum(x.n_tokens for x in pending.leases)} visual tokens "
                               f"need {need} blocks; the pool has {self.buffers.num_blocks} "
                               f"blocks of {self.buffers.block_tokens} tokens")  # fmt: skip
        self.pending[pending.rid] = pending
        self._hits(pending)
        # a request whose every image is resident needs no blocks: it never queues
        if (not self.waiting or not self._todo(pending)) and self._lend_all(pending):
            return
        if len(self.waiting) >= self.max_waiting:
            del self.pending[pending.rid]
            for lease in pending.leases:
                self._done_with(lease, after_copy=False)
            raise RequestError(503, "receive buffers are full; retry later", retry_after_s=1.0)
        pending.waiting_since = time.monotonic()
        self.waiting.append(pending)

    def _hits(self, pending: Pending) -> None:
        """Point every image of ``pending`` that is resident at its rows (no job, no blocks)."""
        if self.cache is None:
            return
        for lease in pending.leases:
            entry = self.cache.acquire(lease.content_key) if lease.content_key else None
            if entry is not None:
                lease.resident, lease.blocks, lease.state = entry, entry.blocks, LeaseState.CACHED

    def _todo(self, pending: Pending) -> list[Lease]:
        return [x for x in pending.leases if x.state is LeaseState.WAITING and x.blocks is None]

    def _fits(self, pending: Pending) -> bool:
        need = sum(self.buffers.blocks_for(x.n_tokens) for x in self._todo(pending))
        idle = self.cache.idle_blocks if self.cache is not None else 0
        return need <= self.buffers.num_free + idle  # idle residents are evicted for room

    def _lend_all(self, pending: Pending) -> bool:
        """Blocks for every lease still without them, all or none; then ``on_lent`` (which
        may end the request, e.g. when no encoder is reachable)."""
        if not self._fits(pending):
            return False
        todo = self._todo(pending)
        need = sum(self.buffers.blocks_for(x.n_tokens) for x in todo)
        if need > self.buffers.num_free:
            self._evict(need - self.buffers.num_free)
            if need > self.buffers.num_free:  # evicted rows still being copied out (GPU)
                return False
        for lease in todo:
            blocks = self.buffers.alloc(lease.n_tokens)
            assert blocks is not None  # fits: checked above
            lease.blocks, lease.generation = blocks, secrets.randbits(63)
        self.peak_used = max(self.peak_used, self.buffers.num_blocks - self.buffers.num_free)
        pending.waiting_since = 0.0
        pending.marks.setdefault("lent", time.perf_counter())
        self.on_lent(pending)
        if self.pending.get(pending.rid) is pending and all(
            x.state is LeaseState.CACHED for x in pending.leases
        ):
            self._complete(pending)  # every image resident: nothing to wait for
        return True

    def job(self, lease: Lease, data: bytes, grid: list[int], frames: list[int] | None = None,
            frame_data: list[bytes] | None = None) -> P.EncodeJob:  # fmt: skip
        """The EncodeJob for ``lease`` (which holds blocks and a generation); a video's
        sampled ``frames`` of the container ``data``, or its client-sampled ``frame_data``."""
        assert lease.blocks is not None
        where = self.buffers.describe(lease.blocks)
        return P.EncodeJob(
            rid=lease.request.rid, image=lease.image, data=data, grid=grid,
            frames=frames or [], frame_data=frame_data or [],
            n_tokens=lease.n_tokens, hidden=self.buffers.hidden, dtype=self.dtype,  # type: ignore[arg-type]
            generation=lease.generation, session=where.session, block_tokens=where.block_tokens,
            blocks=lease.blocks, embed_addrs=where.embed_addrs, deepstack_addrs=where.deepstack_addrs,
        )  # fmt: skip

    def sent(self, lease: Lease, link: Any) -> None:
        """``lease``'s job is queued for ``link``: from now on its blocks are lent to it."""
        lease.link, lease.incarnation, lease.state = link, link.incarnation, LeaseState.SENT
        self.lent[lease.key] = lease
        link.inflight.add(lease.key)

    def relend(self, req: Pending) -> None:
        """Lend blocks again to ``req``'s leases that lost theirs (all or none), or let it
        wait for room (ahead of new requests)."""
        if self.pending.get(req.rid) is req and not self._lend_all(req):
            req.waiting_since = time.monotonic()
            self.waiting.appendleft(req)

    def tick(self) -> None:
        """Housekeeping, called often: finished copies, dead writers past the transport's
        timeout, long waits, then requests waiting for room."""
        copying, self.copying = self.copying, []
        for event, blocks in copying:
            if event.query():
                self._free(blocks)
            else:
                self.copying.append((event, blocks))
        now = time.monotonic()
        for lease in [x for x in self.lent.values() if x.dead_since
                      and now - x.dead_since >= self.dead_writer_s]:  # fmt: skip
            log.info("blocks of %s/%d back: their dead writer's transport timed out",
                     lease.request.rid, lease.image)  # fmt: skip
            self._return(lease)
        while self.waiting and now - self.waiting[0].waiting_since > self.alloc_wait_s:
            err = RequestError(503, f"no receive blocks freed up within {self.alloc_wait_s:.0f} s",
                               retry_after_s=1.0)  # fmt: skip
            self.fail(self.waiting[0], err)
        self._serve_waiting()

    def _serve_waiting(self) -> None:
        while self.waiting and self._fits(self.waiting[0]):
            req = self.waiting.popleft()
            if not self._lend_all(req):  # room only once evicted rows are copied out
                self.waiting.appendleft(req)
                return


def _cuda_event() -> Any:
    event = torch.cuda.Event()
    event.record()
    return event
