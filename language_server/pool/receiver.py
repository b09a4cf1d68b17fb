"""The language side of the data plane: lends blocks to encode jobs, checks what arrived, and
takes blocks back only when their writer is done with them.

Lends the blocks of a ``PoolLayout``: the pool itself (``MultimodalDataBuffers``) with the
reference engine, or only its layout when the memory lives where the model runs (``--engine
sglang``: SGLang's scheduler process, reached through a ``PoolHostLink`` that verifies rows
there). Runs on the asyncio loop (not thread-safe). A request's images
get their blocks together (never half a request, so two requests cannot starve each other);
each image's blocks are lent to one encoder process for one ``generation`` (a fresh random
nonce), and every message about them is checked against that lending: same encoder, same
generation, same row count, and rows that match the writer's checksum.

Blocks return by the rule in ``transfer/base.py`` and by no other path: (a) the rows were
verified and the engine's copy out of them has completed (a pool elsewhere: the rows were
handed over, leave the lent set, and come back with ``release`` when the engine's request has
ended), (b) the writer said its write
stopped (TransferDone, or EncodeFailed with ``write_stopped``), (c) the writer's incarnation
changed, or it was declared dead and the transport's own timeout has passed since. A request
that fails or is aborted stops waiting at once; its lent blocks become orphans until then.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

import protocol as P
from language_server.pool.leases import Lease, LeaseState, Pending, ReceivedPrompt, RequestError
from transfer import MultimodalDataBuffers, dtype_name
from transfer.buffers import PoolLayout

log = logging.getLogger("epd.language.receiver")

_STATUS = {"preprocess": 400, "overloaded": 503}  # EncodeFailed stage -> HTTP status (else 502)


class Receiver:
    def __init__(self, buffers: PoolLayout, max_waiting: int = 64,
                 alloc_wait_s: float = 10.0, dead_writer_s: float = 30.0,
                 copy_event: Callable[[], Any] | None = None, host: Any = None) -> None:  # fmt: skip
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
        self.peak_used = 0
        self.dropped_messages = 0

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
        if not self.waiting and self._lend_all(pending):
            return
        if len(self.waiting) >= self.max_waiting:
            del self.pending[pending.rid]
            raise RequestError(503, "receive buffers are full; retry later", retry_after_s=1.0)
        pending.waiting_since = time.monotonic()
        self.waiting.append(pending)

    def _todo(self, pending: Pending) -> list[Lease]:
        return [x for x in pending.leases if x.state is LeaseState.WAITING and x.blocks is None]

    def _fits(self, pending: Pending) -> bool:
        need = sum(self.buffers.blocks_for(x.n_tokens) for x in self._todo(pending))
        return need <= self.buffers.num_free

    def _lend_all(self, pending: Pending) -> bool:
        """Blocks for every lease still without them, all or none; then ``on_lent`` (which
        may end the request, e.g. when no encoder is reachable)."""
        if not self._fits(pending):
            return False
        for lease in self._todo(pending):
            blocks = self.buffers.alloc(lease.n_tokens)
            assert blocks is not None  # fits: checked above
            lease.blocks, lease.generation = blocks, secrets.randbits(63)
        self.peak_used = max(self.peak_used, self.buffers.num_blocks - self.buffers.num_free)
        pending.waiting_since = 0.0
        pending.marks.setdefault("lent", time.perf_counter())
        self.on_lent(pending)
        return True

    def job(self, lease: Lease, data: bytes, grid: list[int]) -> P.EncodeJob:
        """The EncodeJob for ``lease`` (which holds blocks and a generation)."""
        assert lease.blocks is not None
        where = self.buffers.describe(lease.blocks)
        return P.EncodeJob(
            rid=lease.request.rid, image=lease.image, data=data, grid=grid,
            n_tokens=lease.n_tokens, hidden=self.buffers.hidden, dtype=self.dtype,  # type: ignore[arg-type]
            generation=lease.generation, session=where.session, block_tokens=where.block_tokens,
            blocks=lease.blocks, embed_addrs=where.embed_addrs, deepstack_addrs=where.deepstack_addrs,
        )  # fmt: skip

    def sent(self, lease: Lease, link: Any) -> None:
        """``lease``'s job is queued for ``link``: from now on its blocks are lent to it."""
        lease.link, lease.incarnation, lease.state = link, link.incarnation, LeaseState.SENT
        self.lent[lease.key] = lease
        link.inflight.add(lease.key)

    # --- messages from encoders -------------------------------------------------------------

    def on_message(self, link: Any, msg: P.Message) -> None:
        if isinstance(msg, P.TransferDone):
            lease = self._lease(link, msg.rid, msg.image, msg.generation)
            if lease is not None:
                self._on_done(lease, msg)
        elif isinstance(msg, P.EncodeFailed):
            self._on_failed(link, msg)
        else:
            self._drop(link, msg, "not for a language server")

    def _lease(self, link: Any, rid: str, image: int, generation: int) -> Lease | None:
        lease = self.lent.get((rid, image, generation))
        if lease is None or lease.link is not link:
            self._drop(
                link, None, f"no blocks of {rid}/{image} lent to it in generation {generation}"
            )
            return None
        return lease

    def _on_done(self, lease: Lease, msg: P.TransferDone) -> None:
        """The write ended (whatever it wrote): verify the rows, or fail the request; either way
        no write of this job lands in the blocks any more."""
        if lease.state is LeaseState.ORPHANED:  # nobody needs the rows
            self._return(lease)
            return
        if lease.state is not LeaseState.SENT or msg.n_tokens != lease.n_tokens:
            self._verified(lease, f"bad TransferDone for image {lease.image}: {msg.n_tokens} "
                           f"rows, {lease.n_tokens} lent")  # fmt: skip
            return
        lease.state, lease.timings = LeaseState.WRITTEN, msg.timings
        assert lease.blocks is not None

        def verdict(problem: str) -> None:
            self._verified(lease, problem and f"rows of image {lease.image} {problem}")

        if self.local:  # MultimodalDataBuffers.verify: the rows' checksum, read in place
            pool: MultimodalDataBuffers = self.buffers  # type: ignore[assignment]
            verdict(pool.verify(lease.blocks, lease.n_tokens, msg.checksum))
        else:  # the same code, run where the memory is
            self.host.verify(lease.blocks, lease.n_tokens, msg.checksum, verdict)

    def _verified(self, lease: Lease, why: str) -> None:
        """The verdict on ``lease``'s rows (``why`` empty: they match the writer's)."""
        if self.lent.get(lease.key) is not lease or lease.state not in (
            LeaseState.SENT,
            LeaseState.WRITTEN,
        ):
            return  # the request ended meanwhile; its blocks went back then
        if why:
            self.fail(lease.request, RequestError(502, why), skip=lease)
            self._return(lease)
            return
        lease.state = LeaseState.VERIFIED
        lease.link.served += 1
        if all(x.state is LeaseState.VERIFIED for x in lease.request.leases):
            self._complete(lease.request)

    def _on_failed(self, link: Any, msg: P.EncodeFailed) -> None:
        if msg.generation == 0:  # the answer to an Abort for a job the encoder did not have
            for lease in [x for x in self.lent.values() if x.link is link
                          and x.request.rid == msg.rid and msg.image in (-1, x.image)]:  # fmt: skip
                if lease.state is LeaseState.ORPHANED:
                    self._return(lease)
            return
        found = self._lease(link, msg.rid, msg.image, msg.generation)
        if found is None:
            return
        lease = found
        if lease.state is not LeaseState.ORPHANED:
            status = _STATUS.get(msg.stage, 502)
            err = RequestError(status, f"encoder failed image {msg.image} at {msg.stage}: "
                               f"{msg.reason}", retry_after_s=1.0 if status == 503 else 0.0)  # fmt: skip
            self.fail(lease.request, err, skip=lease)
        if msg.write_stopped:
            self._return(lease)

    # --- endings ----------------------------------------------------------------------------

    def _complete(self, req: Pending) -> None:
        """Every image verified: hand the rows to ``on_ready`` (it copies them), then give the
        blocks back once that copy has completed. With the memory elsewhere, hand over where
        the rows are instead; the blocks come back with ``release``."""
        self._forget(req)
        req.marks["done_received"] = time.perf_counter()
        prompt = req.prompt
        last = max(req.leases, key=lambda x: _total(x.timings))
        if not self.local:
            self.handed[req.rid] = req
            for lease in req.leases:  # nothing an encoder says can touch them any more
                self.lent.pop(lease.key, None)
            runs = [
                r for x in req.leases for r in self.buffers.block_rows(x.blocks or [], x.n_tokens)
            ]
            ready = ReceivedPrompt(
                input_ids=prompt.input_ids, positions=prompt.positions,
                visual_mask=prompt.visual_mask, embeds=None, deepstack=None,
                image_grid_thw=prompt.image_grid_thw, timings=last.timings or P.EncodeTimings(),
                pool_runs=runs, n_visual=sum(x.n_tokens for x in req.leases),
                release=lambda: self.release(req),
            )  # fmt: skip
            req.on_ready(ready, None)  # the engine calls ``release`` once done with the rows
            return
        pool: MultimodalDataBuffers = self.buffers  # type: ignore[assignment]
        parts = [pool.gather(x.blocks or [], x.n_tokens) for x in req.leases]
        if len(parts) == 1:
            embeds, deepstack = parts[0]
        else:
            embeds = torch.cat([e for e, _ in parts])
            deepstack = torch.cat([d for _, d in parts])
        ready = ReceivedPrompt(
            input_ids=prompt.input_ids, positions=prompt.positions,
            visual_mask=prompt.visual_mask, embeds=embeds, deepstack=deepstack,
            image_grid_thw=prompt.image_grid_thw, timings=last.timings or P.EncodeTimings(),
            n_visual=embeds.shape[0],
        )  # fmt: skip
        try:
            req.on_ready(ready, None)  # the engine copies the rows it needs before returning
        finally:
            for lease in req.leases:
                self.lent.pop(lease.key, None)
                self._free_after_copy(lease.blocks)
                lease.blocks = None

    def release(self, req: Pending) -> None:
        """The engine is done with ``req``'s rows (memory elsewhere): its blocks come back.
        Idempotent; a no-op for requests whose rows were never handed over."""
        if self.handed.pop(req.rid, None) is not req:
            return
        for lease in req.leases:
            self._free(lease.blocks)
            lease.blocks = None

    def fail(self, req: Pending, error: RequestError, skip: Lease | None = None) -> None:
        """End ``req`` with ``error``. Its encoders are told to stop (Abort); blocks that they
        may still write into stay lent (orphaned) until they say so. Idempotent."""
        if not self._forget(req):
            return
        for lease in req.leases:
            if lease.state is LeaseState.SENT:
                lease.state = LeaseState.ORPHANED
                if lease is not skip:
                    lease.link.send(P.Abort(rid=req.rid, image=lease.image,
                                            reason=error.message[:4000]))  # fmt: skip
            elif lease.state in (LeaseState.WRITTEN, LeaseState.VERIFIED):  # nobody writes there
                self._return(lease)
            elif lease.blocks is not None:  # taken, but its job never went out
                self._free(lease.blocks)
                lease.blocks = None
        log.warning("request %s failed (%d): %s", req.rid, error.status, error.message)
        req.on_ready(None, error)

    def writer_dead(self, lease: Lease) -> None:
        """``lease``'s encoder was declared dead: its blocks stay lent (as an orphan) until the
        transport's own timeout has passed; ``lease`` itself is ready to be lent again."""
        orphan = Lease(lease.request, lease.image, lease.n_tokens, lease.blocks, lease.generation,
                       lease.link, lease.incarnation, LeaseState.ORPHANED, time.monotonic())  # fmt: skip
        self.lent[orphan.key] = orphan
        lease.link.inflight.discard(lease.key)
        lease.blocks, lease.link, lease.generation, lease.state = None, None, 0, LeaseState.WAITING

    def writer_restarted(self, link: Any) -> list[Pending]:
        """``link``'s process was replaced: nothing the old one started can land any more.
        Returns the requests that lost a job there (their leases are WAITING again)."""
        hit: list[Pending] = []
        for lease in [x for x in self.lent.values()
                      if x.link is link and x.incarnation != link.incarnation]:  # fmt: skip
            if lease.state is LeaseState.SENT:
                self.lent.pop(lease.key, None)
                link.inflight.discard(lease.key)
                self._free(lease.blocks)
                lease.blocks, lease.link, lease.state = None, None, LeaseState.WAITING
                if lease.request not in hit:
                    hit.append(lease.request)
            elif lease.state is LeaseState.ORPHANED:
                self._return(lease)
        return hit

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
            self._lend_all(self.waiting.popleft())

    # --- helpers ----------------------------------------------------------------------------

    def _return(self, lease: Lease) -> None:
        if self.lent.pop(lease.key, None) is lease:
            self._free(lease.blocks)
            lease.blocks = None

    def _free(self, blocks: list[int] | None) -> None:
        if blocks:
            self.buffers.free(blocks)
            self._serve_waiting()

    def _free_after_copy(self, blocks: list[int] | None) -> None:
        """Free once the copies queued so far have completed (at once when they were
        synchronous, as on the CPU)."""
        event = self.copy_event() if blocks else None
        if blocks and event is not None and not event.query():
            self.copying.append((event, blocks))
        else:
            self._free(blocks)

    def _forget(self, req: Pending) -> bool:
        if self.pending.get(req.rid) is not req:
            return False
        del self.pending[req.rid]
        if req in self.waiting:
            self.waiting.remove(req)
        for lease in req.leases:
            if lease.link is not None:
                lease.link.inflight.discard(lease.key)
        return True

    def _drop(self, link: Any, msg: P.Message | None, why: str) -> None:
        self.dropped_messages += 1
        name = type(msg).__name__ if msg is not None else "message"
        log.warning("%s from %s dropped: %s", name, getattr(link, "address", "?"), why)


def _total(t: P.EncodeTimings | None) -> float:
    return 0.0 if t is None else t.queue_s + t.preprocess_s + t.vision_s + t.transfer_s


def _cuda_event() -> Any:
    event = torch.cuda.Event()
    event.record()
    return event
