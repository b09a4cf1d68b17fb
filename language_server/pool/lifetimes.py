"""Block lifetimes: how a request's blocks come back (the rule in ``transfer/base.py``).

(a) The rows were verified and the engine's copy out of them has completed (a pool elsewhere:
the rows were handed over, leave the lent set, and come back with ``release`` when the engine's
request has ended); (b) the writer said its write stopped (TransferDone, or EncodeFailed with
``write_stopped``); (c) the writer's incarnation changed, or it was declared dead and the
transport's own timeout has passed since. A request that fails or is aborted stops waiting at
once; its lent blocks become orphans until then.

``Lifetimes`` is the part of ``Receiver`` (``receiver.py``) that ends things; ``Arrivals``
(``arrivals.py``) builds on it, and ``Receiver`` on both. The state they share is declared here
and set up by ``Receiver.__init__``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

import protocol as P
from language_server.pool.cache import ImageCache, Resident
from language_server.pool.leases import Lease, LeaseState, Pending, ReceivedPrompt, RequestError
from transfer import MultimodalDataBuffers
from transfer.buffers import PoolLayout

log = logging.getLogger("epd.language.receiver")


class Lifetimes:
    """Endings of requests and of writers, and the return of their blocks."""

    buffers: PoolLayout
    local: bool  # the pool's memory is in this process (a MultimodalDataBuffers)
    copy_event: Callable[[], Any]
    pending: dict[str, Pending]
    waiting: deque[Pending]
    lent: dict[tuple[str, int, int], Lease]
    handed: dict[str, Pending]
    copying: list[tuple[Any, list[int]]]
    cache: ImageCache | None

    def _serve_waiting(self) -> None:
        """Lend to the requests waiting for room (``Receiver``'s lending)."""
        raise NotImplementedError

    def _complete(self, req: Pending) -> None:
        """Every image verified: hand the rows to ``on_ready`` (it copies them), then give the
        blocks back once that copy has completed. With the memory elsewhere, hand over where
        the rows are instead; the blocks come back with ``release``."""
        self._forget(req)
        req.marks["done_received"] = time.perf_counter()
        cached = [x for x in req.leases if x.state is LeaseState.CACHED]
        for lease in req.leases:
            self.lent.pop(lease.key, None)  # nothing an encoder says can touch them any more
            if lease.state is not LeaseState.CACHED:
                self._keep(lease)
        prompt = req.prompt
        n_cached, cached_tokens = len(cached), sum(x.n_tokens for x in cached)
        keys = tuple(x.content_key for x in req.leases)
        keys = keys if self.cache is not None and all(keys) else ()
        from_encoder_cache = sum(1 for x in req.leases if x.timings and x.timings.vision_cached)
        kinds = tuple(spec.kind for spec in prompt.images)
        rows = tuple(x.n_tokens for x in req.leases)
        last = max(req.leases, key=lambda x: _total(x.timings))
        if not self.local:
            self.handed[req.rid] = req
            runs = [
                r for x in req.leases for r in self.buffers.block_rows(x.blocks or [], x.n_tokens)
            ]
            ready = ReceivedPrompt(
                input_ids=prompt.input_ids, positions=prompt.positions,
                visual_mask=prompt.visual_mask, embeds=None, deepstack=None,
                image_grid_thw=prompt.image_grid_thw, timings=last.timings or P.EncodeTimings(),
                pool_runs=runs, n_visual=sum(x.n_tokens for x in req.leases),
                release=lambda: self.release(req), cached_images=n_cached, cached_tokens=cached_tokens,
                content_keys=keys, encoder_cached_images=from_encoder_cache,
                video_grid_thw=prompt.video_grid_thw, kinds=kinds, item_rows=rows,
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
            n_visual=embeds.shape[0], cached_images=n_cached, cached_tokens=cached_tokens,
            content_keys=keys, encoder_cached_images=from_encoder_cache,
            video_grid_thw=prompt.video_grid_thw, kinds=kinds, item_rows=rows,
        )  # fmt: skip
        try:
            req.on_ready(ready, None)  # the engine copies the rows it needs before returning
        finally:
            for lease in req.leases:
                self._done_with(lease, after_copy=True)

    def release(self, req: Pending) -> None:
        """The engine is done with ``req``'s rows (memory elsewhere): its blocks come back.
        Idempotent; a no-op for requests whose rows were never handed over."""
        if self.handed.pop(req.rid, None) is not req:
            return
        for lease in req.leases:
            self._done_with(lease, after_copy=False)

    def fail(self, req: Pending, error: RequestError, skip: Lease | None = None) -> None:
        """End ``req`` with ``error``. Its encoders are told to stop (Abort); blocks that they
        may still write into stay lent (orphaned) until they say so. Idempotent."""
        if not self._forget(req):
            return
        for lease in req.leases:
            if lease.state is LeaseState.CACHED:  # resident rows it would have read
                self._done_with(lease, after_copy=False)
            elif lease.state is LeaseState.SENT:
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

    # --- resident images --------------------------------------------------------------------

    def _keep(self, lease: Lease) -> None:
        """``lease``'s verified rows stay resident (read by its request until it is done), when
        the cache is on, has room, and does not hold the image already."""
        if self.cache is None or not lease.content_key or lease.blocks is None:
            return
        if lease.content_key in self.cache.entries:  # encoded twice at once: keep the first
            return
        evicted = self.cache.room_for(len(lease.blocks))
        if evicted is None:
            return
        self._free_evicted(evicted)
        lease.resident = self.cache.insert(lease.content_key, lease.blocks, lease.n_tokens, 1)

    def _done_with(self, lease: Lease, after_copy: bool) -> None:
        """``lease``'s request will not read its rows again: resident rows stay (one reader
        less), other blocks go back (``after_copy``: once the copies queued so far are done)."""
        if lease.resident is not None:
            assert self.cache is not None
            self.cache.release(lease.resident)
            lease.resident, lease.blocks = None, None
            if self.waiting:
                self._serve_waiting()  # idle residents are room
            return
        if after_copy:
            self._free_after_copy(lease.blocks)
        else:
            self._free(lease.blocks)
        lease.blocks = None

    def _evict(self, n_blocks: int) -> None:
        """Evict idle residents (least recently used first) until ``n_blocks`` are free or on
        their way (after the copies queued so far, on a GPU)."""
        if self.cache is not None:
            self._free_evicted(self.cache.evict(n_blocks))

    def _free_evicted(self, evicted: list[Resident]) -> None:
        for entry in evicted:  # no _serve_waiting here: the caller is lending this room
            event = self.copy_event()
            if event is not None and not event.query():
                self.copying.append((event, entry.blocks))
            else:
                self.buffers.free(entry.blocks)

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


def _total(t: P.EncodeTimings | None) -> float:
    return 0.0 if t is None else t.queue_s + t.preprocess_s + t.vision_s + t.transfer_s
