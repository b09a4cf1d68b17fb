"""Sending a prompt's images to encoders as jobs and getting their rows back, whatever the
encoders do.

``Dispatcher.encode`` turns a prepared prompt into one lease per image, has the receiver lend
them blocks (all at once; a full pool queues, bounded), and sends each image's ``EncodeJob`` to
the least-loaded live encoder, so the images of one request run on several encoders at once,
unless an encoder that encoded the same image before (whose cache may still hold its rows) is
about as free.
When an encoder is declared dead its jobs move to another live encoder with fresh blocks (the
old ones stay lent until the transport's timeout); when it restarts (new incarnation) its jobs
are re-sent at once. A housekeeping task ticks the receiver.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import protocol as P
from language_server.encoders.links import EncoderLink, EncoderPool
from language_server.pool.leases import Lease, LeaseState, Pending, ReceivedPrompt, RequestError
from language_server.pool.receiver import Receiver

log = logging.getLogger("epd.language.dispatch")
T = TypeVar("T")
HOLDERS = 16384  # content keys remembered with the encoder that last produced their rows


class Dispatcher:
    def __init__(self, receiver: Receiver, encoders: EncoderPool, timeout_s: float,
                 max_attempts: int = 2) -> None:  # fmt: skip
        self.receiver, self.encoders = receiver, encoders
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.redispatched = 0
        receiver.on_lent = self.send_jobs
        receiver.on_rows = self._remember
        # content key -> (encoder link, its incarnation then): a restarted encoder holds nothing
        self.holders: OrderedDict[bytes, tuple[EncoderLink, int]] = OrderedDict()
        encoders.on_down = self.on_encoder_down
        encoders.on_restart = self.on_encoder_restart
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._housekeeping())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def encode(self, rid: str, prompt, build: Callable[[ReceivedPrompt], T],
                     marks: dict[str, float]) -> T:  # fmt: skip
        """Encode every image of ``prompt`` (a ``PreparedPrompt``); return ``build(rows)``.

        ``build`` runs while the rows are still in the pool and must copy what it needs.
        Raises ``RequestError`` (503 no encoder or pool full, 413 too large for the pool,
        504 timeout, 4xx/5xx from the encoders).
        """
        if self.encoders.pick() is None:
            raise RequestError(503, "no encode server is available", retry_after_s=1.0)
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def on_ready(rows: ReceivedPrompt | None, error: RequestError | None) -> None:
            if done.done():
                self.receiver.release(pending)  # rows handed over that nobody will read
                return
            if error is not None:
                done.set_exception(error)
                return
            assert rows is not None
            try:
                done.set_result(build(rows))
            except Exception as exc:  # noqa: BLE001 - surfaces as a 500 for this request
                self.receiver.release(pending)
                done.set_exception(RequestError(500, f"cannot build the prompt: {exc}"))

        pending = Pending(rid, prompt, on_ready)
        pending.leases = [Lease(pending, i, spec.n_tokens, content_key=spec.content_key)
                          for i, spec in enumerate(prompt.images)]  # fmt: skip
        self.receiver.admit(pending)  # sends the jobs now, or once blocks free up
        try:
            return await asyncio.wait_for(done, self.timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if done.done() and not done.cancelled() and done.exception() is None:
                self.receiver.release(pending)  # built, but nobody will run it
            timed_out = isinstance(exc, TimeoutError)
            reason = f"no answer from the encoders within {self.timeout_s:.0f} s"
            self.receiver.fail(
                pending, RequestError(504, reason if timed_out else "client went away")
            )
            if timed_out:
                raise RequestError(504, reason) from None
            raise
        finally:
            marks.update(pending.marks)

    def send_jobs(self, pending: Pending) -> None:
        """Send the job of every lease of ``pending`` that holds blocks but is not out yet,
        each to the least-loaded live encoder (so one request's images spread out)."""
        for lease in pending.leases:
            ready = lease.state is LeaseState.WAITING and lease.blocks is not None
            if ready and not self._send(lease):
                err = RequestError(503, "no encode server is reachable", retry_after_s=1.0)
                self.receiver.fail(pending, err)
                return

    def _send(self, lease: Lease) -> bool:
        spec = lease.request.prompt.images[lease.image]
        video = spec.kind == "video"
        job = self.receiver.job(lease, spec.data, list(spec.grid),
                                list(spec.frames) if video and spec.data else None,
                                list(spec.frame_data) if video else None)  # fmt: skip
        while (link := self.encoders.pick(self._holder(lease.content_key))) is not None:
            if link.send(job):
                self.receiver.sent(lease, link)
                return True
            self.encoders.mark_down(link, "a send failed")  # not connected: try the next one
        return False

    def _remember(self, lease: Lease) -> None:
        """``lease.link`` produced this image's rows: its cache may hold them now."""
        if lease.content_key and lease.link is not None:
            self.holders[lease.content_key] = (lease.link, lease.incarnation)
            self.holders.move_to_end(lease.content_key)
            while len(self.holders) > HOLDERS:
                self.holders.popitem(last=False)

    def _holder(self, key: bytes) -> EncoderLink | None:
        held = self.holders.get(key) if key else None
        if held is None or held[0].incarnation != held[1]:
            return None  # unknown, or that process is gone (and its cache with it)
        return held[0]

    def on_encoder_down(self, link: EncoderLink) -> None:
        """Move every job of a dead encoder elsewhere with fresh blocks, or fail its request."""
        hit: list[Pending] = []
        for lease in [x for x in self.receiver.lent.values()
                      if x.link is link and x.state is LeaseState.SENT]:  # fmt: skip
            req = lease.request
            link.send(P.Abort(rid=req.rid, image=lease.image, reason="you were declared dead"),
                      quiet=True)  # fmt: skip
            self.receiver.writer_dead(lease)
            if self.receiver.pending.get(req.rid) is req and req not in hit:
                hit.append(req)
        for req in hit:
            if req.attempts >= self.max_attempts or self.encoders.pick() is None:
                why = (
                    "retried too often"
                    if req.attempts >= self.max_attempts
                    else "no other encoder is available"
                )
                self.receiver.fail(req, RequestError(503, f"encoder {link.address} went silent "
                                                     f"and {why}", retry_after_s=1.0))  # fmt: skip
                continue
            req.attempts += 1
            self.redispatched += 1
            log.warning("request %s: encoder %s went silent; sending its images again", req.rid,
                        link.address)  # fmt: skip
            self.receiver.relend(req)

    def on_encoder_restart(self, link: EncoderLink) -> None:
        """A new process answers at ``link``: its predecessor's jobs are gone; send them again."""
        for req in self.receiver.writer_restarted(link):
            self.redispatched += 1
            log.warning("request %s: encoder %s restarted; sending its jobs again", req.rid,
                        link.address)  # fmt: skip
            self.receiver.relend(req)

    async def _housekeeping(self) -> None:
        while True:
            try:
                self.receiver.tick()
            except Exception:  # noqa: BLE001 - keep ticking
                log.exception("receiver housekeeping failed")
            await asyncio.sleep(0.05)
