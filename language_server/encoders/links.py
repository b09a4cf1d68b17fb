"""Connections to the encode servers: one DEALER socket each, liveness, least-loaded choice.

Runs on the language server's asyncio loop. Each link has a reader task that decodes every
message (untrusted: bad ones are logged and dropped) and hands it to the ``on_message``
callback; a heartbeat task pings every encoder and marks it down when it stays silent.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

import protocol as P
from protocol.keys import CurveKeys

log = logging.getLogger("epd.language.encoders")


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # no answer yet
    UP = "up"
    DOWN = "down"  # silent for too long; gets no new requests
    INCOMPATIBLE = "incompatible"  # speaks another transport


@dataclass(eq=False)
class EncoderLink:
    address: str
    sock: zmq.asyncio.Socket
    state: LinkState = LinkState.CONNECTING
    encoder_id: str = ""
    inflight: set[tuple[str, int, int]] = field(default_factory=set)  # our jobs it holds
    incarnation: int = 0  # of the encoder process answering now (0: not known yet)
    load: int = 0  # jobs it reported in its last heartbeat (from every language server)
    others: int = 0  # of those, the ones that were not ours when the heartbeat arrived
    last_seen: float = 0.0
    rejected: int = 0
    served: int = 0  # requests whose rows arrived from it
    cache_hits: int = 0  # of those, images it served from its own cache (no ViT)

    def send(self, msg: P.Message, quiet: bool = False) -> bool:
        """Send one message without blocking; False when the encoder is not connected."""
        # With NOBLOCK the asyncio socket tries at once and returns a finished future; read its
        # outcome here (an unread failed future would be logged as never retrieved). Sending
        # through a synchronous shadow socket instead would swallow the edge-triggered wake-up
        # the reader task waits for.
        sent: Any = self.sock.send(P.encode(msg), zmq.NOBLOCK)  # a finished Future
        error = sent.exception() if sent.done() else None
        if error is not None and not quiet:
            log.warning("cannot send %s to %s: %s", type(msg).__name__, self.address, error)
        return error is None

    def describe(self) -> dict[str, object]:
        seen = time.monotonic() - self.last_seen if self.last_seen else None
        return {
            "address": self.address,
            "id": self.encoder_id,
            "state": self.state.value,
            "inflight": len(self.inflight),
            "load": self.load,
            "incarnation": f"{self.incarnation:x}",
            "served": self.served,
            "cache_hits": self.cache_hits,
            "last_seen_s": None if seen is None else round(seen, 3),
            "rejected_messages": self.rejected,
        }


OnMessage = Callable[[EncoderLink, P.Message], None]


def _load(link: EncoderLink) -> int:
    return len(link.inflight) + link.others


class EncoderPool:
    def __init__(
        self,
        addresses: tuple[str, ...],
        transport: str,
        on_message: OnMessage,
        heartbeat_s: float = 1.0,
        dead_after_s: float = 5.0,
        keys: CurveKeys | None = None,
    ) -> None:
        # One ZeroMQ context (one I/O thread) per encoder: ZeroMQ resolves a tcp://NAME:PORT
        # address on its I/O thread at every reconnect, so with a shared context one encoder
        # whose name no longer resolves (a stopped container: 10 s per lookup) stalled the
        # heartbeats of every other encoder until they were declared dead.
        self._contexts: list[zmq.asyncio.Context] = []
        self.keys = keys
        self.transport = transport
        self.on_message = on_message
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.links = [self._connect(a) for a in addresses]
        self.on_down: Callable[[EncoderLink], None] = lambda link: None
        self.on_restart: Callable[[EncoderLink], None] = lambda link: None
        self._turn = 0  # round-robin among equally loaded encoders
        self._tasks: list[asyncio.Task[None]] = []

    def _connect(self, address: str) -> EncoderLink:
        ctx = zmq.asyncio.Context(io_threads=1)
        self._contexts.append(ctx)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for an encoder that is not connected
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # encoders send only small reports
        if self.keys is not None:
            sock.curve_secretkey, sock.curve_publickey = self.keys.secret, self.keys.public
            sock.curve_serverkey = self.keys.server_public
        sock.connect(address)
        return EncoderLink(address, sock)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read(link)) for link in self.links]
        self._tasks.append(asyncio.create_task(self._heartbeats()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links:
            link.sock.close(linger=0)
        for ctx in self._contexts:
            ctx.term()

    def pick(self, prefer: EncoderLink | None = None) -> EncoderLink | None:
        """The live encoder with the least work (None when none is up): our own jobs there, as
        of now, plus the jobs other language servers had there at its last heartbeat (its
        reported load less ours then; a stale total would keep counting our finished jobs);
        ties go round-robin. ``prefer`` (the encoder that last encoded the image: its cache
        may hold the rows) wins while it is up and has at most one job more than that."""
        up = [link for link in self.links if link.state is LinkState.UP]
        if not up:
            return None
        self._turn += 1
        n = len(up)
        best = min(up, key=lambda x: (_load(x), (up.index(x) - self._turn) % n))
        if prefer is not None and prefer.state is LinkState.UP and _load(prefer) <= _load(best) + 1:
            return prefer
        return best

    def mark_down(self, link: EncoderLink, why: str) -> None:
        """Stop sending ``link`` new jobs and move its jobs elsewhere (``on_down``)."""
        if link.state is LinkState.UP:
            log.warning("encoder %s marked down: %s", link.address, why)
            link.state = LinkState.DOWN
            self.on_down(link)

    async def _read(self, link: EncoderLink) -> None:
        while True:
            data = await link.sock.recv()
            link.last_seen = time.monotonic()
            try:
                msg = P.decode(data)
            except P.ProtocolError as exc:
                link.rejected += 1
                log.warning("rejected a message from encoder %s: %s", link.address, exc)
                continue
            try:
                if isinstance(msg, (P.EncoderHello, P.Heartbeat)):
                    self._alive(link, msg)
                else:
                    self.on_message(link, msg)
            except Exception:  # noqa: BLE001 - a handler bug must not kill the reader
                log.exception("handling %s from %s failed", type(msg).__name__, link.address)

    def _alive(self, link: EncoderLink, msg: P.EncoderHello | P.Heartbeat) -> None:
        if isinstance(msg, P.EncoderHello):
            link.encoder_id = msg.encoder_id
            if msg.transport != self.transport:
                log.error("encoder %s uses transport %s, this server %s: not using it",
                          link.address, msg.transport, self.transport)  # fmt: skip
                link.state = LinkState.INCOMPATIBLE
                return
            log.info("encoder %s (%s, incarnation %x) is up", link.address, msg.encoder_id,
                     msg.incarnation)  # fmt: skip
        else:
            link.load, link.others = msg.inflight, max(0, msg.inflight - len(link.inflight))
        restarted = link.incarnation not in (0, msg.incarnation)
        link.incarnation = msg.incarnation
        if link.state in (LinkState.CONNECTING, LinkState.DOWN) and link.encoder_id:
            link.state = LinkState.UP
        if restarted:
            log.warning("encoder %s restarted (incarnation %x)", link.address, msg.incarnation)
            self.on_restart(link)

    async def _heartbeats(self) -> None:
        beat = P.Heartbeat(encoder_id="language", inflight=0, sent_at=0.0)
        while True:
            now = time.monotonic()
            for link in self.links:
                try:
                    link.send(beat, quiet=True)
                    silent = now - link.last_seen if link.last_seen else None
                    if silent is not None and silent > self.dead_after_s:
                        self.mark_down(link, f"silent for {silent:.1f} s")
                except Exception:  # noqa: BLE001 - one bad link must not stop liveness
                    log.exception("heartbeat to %s failed", link.address)
            await asyncio.sleep(self.heartbeat_s)

    async def wait_until_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(link.state is LinkState.UP for link in self.links):
                return True
            await asyncio.sleep(0.05)
        return False
