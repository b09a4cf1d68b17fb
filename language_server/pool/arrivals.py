"""What encoders say about the blocks lent to them, checked against the lending.

Every message is matched to one lending: same encoder, same ``generation`` (a fresh random
nonce per lending), same row count; then the rows are verified against the writer's checksum,
here (``MultimodalDataBuffers.verify``) or where the memory is (a ``PoolHostLink``). Anything
else is dropped and counted (``dropped_messages``); a failure ends the request with the status
its stage maps to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import protocol as P
from language_server.pool.leases import Lease, LeaseState, RequestError
from language_server.pool.lifetimes import Lifetimes, log
from transfer import MultimodalDataBuffers

_STATUS = {"preprocess": 400, "overloaded": 503}  # EncodeFailed stage -> HTTP status (else 502)


class Arrivals(Lifetimes):
    """TransferDone and EncodeFailed from encoders: verified rows, or the request's end."""

    host: Any  # a PoolHostLink when the memory is elsewhere
    dropped_messages: int
    on_rows: Callable[[Lease], None]

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
        if lease.timings is not None and lease.timings.vision_cached:
            lease.link.cache_hits += 1
        self.on_rows(lease)
        if all(x.state in (LeaseState.VERIFIED, LeaseState.CACHED) for x in lease.request.leases):
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

    def _drop(self, link: Any, msg: P.Message | None, why: str) -> None:
        self.dropped_messages += 1
        name = type(msg).__name__ if msg is not None else "message"
        log.warning("%s from %s dropped: %s", name, getattr(link, "address", "?"), why)
