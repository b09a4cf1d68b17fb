"""Sending image prompts to encoders and getting their rows back, whatever the encoders do.

``Dispatcher.encode`` sends a request to the least-loaded live encoder and waits (bounded) for
its rows. When an encoder goes silent, its requests move to another live encoder (at most
``max_attempts`` tries in all) or fail with 503 when none is left; their blocks are quarantined
(the silent encoder may still be writing). A housekeeping task ticks the receiver.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import protocol as P
from language_server.encoders import EncoderLink, EncoderPool
from language_server.receiver import Receiver
from language_server.requests import Pending, ReceivedPrompt, RequestError

log = logging.getLogger("epd.language.dispatch")
T = TypeVar("T")


class Dispatcher:
    def __init__(self, receiver: Receiver, encoders: EncoderPool, timeout_s: float,
                 max_attempts: int = 2) -> None:  # fmt: skip
        self.receiver, self.encoders = receiver, encoders
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.redispatched = 0
        encoders.on_down = self.on_encoder_down
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._housekeeping())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def encode(self, message: P.EncodeRequest, build: Callable[[ReceivedPrompt], T],
                     marks: dict[str, float]) -> T:  # fmt: skip
        """Send ``message`` to an encoder; return ``build(rows)`` once they arrived.

        ``build`` runs while the rows are still in the pool and must copy what it needs.
        Raises ``RequestError`` (503 no encoder, 504 timeout, 4xx/5xx from the receiver).
        """
        link = self.encoders.pick()
        if link is None:
            raise RequestError(503, "no encode server is available", retry_after_s=1.0)
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def on_ready(prompt: ReceivedPrompt | None, error: RequestError | None) -> None:
            if done.done():
                return
            if error is not None:
                done.set_exception(error)
                return
            assert prompt is not None
            try:
                done.set_result(build(prompt))
            except Exception as exc:  # noqa: BLE001 - surfaces as a 500 for this request
                done.set_exception(RequestError(500, f"cannot build the prompt: {exc}"))

        pending = Pending(message.rid, link, message, on_ready)
        self._send(pending, link)
        try:
            return await asyncio.wait_for(done, self.timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
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

    def _send(self, pending: Pending, link: EncoderLink) -> None:
        pending.link = link
        self.receiver.expect(pending)
        link.inflight.add(pending.rid)
        if not link.send(pending.message):
            err = RequestError(503, f"encoder {link.address} is not reachable", retry_after_s=1.0)
            self.receiver.fail(pending, err)

    def on_encoder_down(self, link: EncoderLink) -> None:
        """Move every request of a silent encoder elsewhere, or fail it."""
        for pending in [p for p in self.receiver.pending.values() if p.link is link]:
            link.inflight.discard(pending.rid)
            link.send(P.Abort(rid=pending.rid, reason="you were marked down; request moved"))
            target = self.encoders.pick()
            if target is None or pending.attempts >= self.max_attempts:
                why = "no other encoder is available" if target is None else "retried too often"
                self.receiver.fail(pending, RequestError(503, f"encoder {link.address} went "
                                                         f"silent and {why}", retry_after_s=1.0))  # fmt: skip
                continue
            self.receiver.detach(pending)
            pending.attempts += 1
            self.redispatched += 1
            log.warning("request %s: encoder %s went silent; re-sent to %s", pending.rid,
                        link.address, target.address)  # fmt: skip
            self._send(pending, target)

    async def _housekeeping(self) -> None:
        while True:
            try:
                self.receiver.tick()
            except Exception:  # noqa: BLE001 - keep ticking
                log.exception("receiver housekeeping failed")
            await asyncio.sleep(0.05)
