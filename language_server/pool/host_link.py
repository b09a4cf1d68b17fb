"""The front door's end of the channel to the receive pool's host (``--engine sglang``).

The pool lives in SGLang's scheduler process (``language_server.engines.sglang.models.pool_host``). The
front door binds one ZeroMQ PAIR socket on an ``ipc://`` path inside a private (0700) temporary
directory, passes the address to SGLang with the model's configuration, reads the host's
``PoolHello`` while SGLang starts (``wait_hello``), and from then on, on the server's asyncio
loop, sends ``VerifyRows`` for every image whose write ended and hands each verdict to the
``Receiver``. Messages are ``protocol.pool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from protocol.codec import ProtocolError
from protocol.pool import (
    PoolHello,
    PoolStats,
    PoolStatsQuery,
    RowsVerdict,
    VerifyRows,
    decode_pool,
    encode_pool,
)

log = logging.getLogger("epd.language.pool")


class PoolHostLink:
    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="epd-pool-")  # mode 0700
        self.address = f"ipc://{self._dir}/pool"
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        sock.bind(self.address)
        self._sync: zmq.Socket | None = sock
        self._sock: zmq.asyncio.Socket | None = None
        self.hello: PoolHello | None = None
        self._ids = itertools.count(1)
        self._verdicts: dict[int, Callable[[str], None]] = {}
        self._stats: dict[int, asyncio.Future[PoolStats]] = {}
        self._task: asyncio.Task[None] | None = None

    def wait_hello(self, timeout_s: float = 60.0) -> PoolHello:
        """The host's ``PoolHello`` (sent while SGLang loads the model, so normally already
        queued when SGLang's engine has started). Raises ``RuntimeError`` after ``timeout_s``."""
        assert self._sync is not None
        deadline = time.monotonic() + timeout_s
        while self.hello is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sync.poll(int(min(left, 1.0) * 1000)):
                if left <= 0:
                    raise RuntimeError(f"the receive pool's host did not announce itself within "
                                       f"{timeout_s:.0f} s (SGLang's scheduler log says why)")  # fmt: skip
                continue
            try:
                msg = decode_pool(self._sync.recv())
            except ProtocolError as exc:
                log.warning("pool channel: message dropped: %s", exc)
                continue
            if isinstance(msg, PoolHello):
                self.hello = msg
        return self.hello

    def start(self) -> None:
        """Read the host's answers on the running asyncio loop from now on."""
        assert self._sync is not None
        self._sock = zmq.asyncio.Socket.from_socket(self._sync)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close(linger=0)
            self._sync = None
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self.hello is not None and self.hello.session.startswith("shm:"):
            # the host was killed with SGLang's scheduler; its shared memory must not outlive us
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{self.hello.session[4:]}")

    # --- on the server's loop -------------------------------------------------------------

    def verify(self, blocks: list[int], n_tokens: int, checksum: int,
               done: Callable[[str], None]) -> None:  # fmt: skip
        """Have the host check the rows in ``blocks``; ``done(problem)`` gets the verdict
        (an empty problem: they match) on this loop."""
        rid = next(self._ids)
        if not self._send(VerifyRows(id=rid, blocks=blocks, n_tokens=n_tokens, checksum=checksum)):
            done("cannot be verified: the receive pool's host is unreachable")
            return
        self._verdicts[rid] = done

    async def stats(self, timeout_s: float = 5.0) -> PoolStats:
        """The host's counters (rows copied out of the pool, images verified, its pid)."""
        rid = next(self._ids)
        future: asyncio.Future[PoolStats] = asyncio.get_running_loop().create_future()
        self._stats[rid] = future
        try:
            if not self._send(PoolStatsQuery(id=rid)):
                raise RuntimeError("the receive pool's host is unreachable")
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._stats.pop(rid, None)

    def _send(self, msg: Any) -> bool:
        assert self._sock is not None, "start() first"
        try:
            self._sock.send(encode_pool(msg), zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.error("pool channel: cannot send %s: %s", type(msg).__name__, exc)
            return False

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            data = await self._sock.recv()
            try:
                msg = decode_pool(data)
            except ProtocolError as exc:
                log.warning("pool channel: message dropped: %s", exc)
                continue
            try:
                if isinstance(msg, RowsVerdict):
                    done = self._verdicts.pop(msg.id, None)
                    if done is not None:
                        done(msg.problem)
                elif isinstance(msg, PoolStats):
                    future = self._stats.get(msg.id)
                    if future is not None and not future.done():
                        future.set_result(msg)
            except Exception:  # noqa: BLE001 - keep reading
                log.exception("pool channel: handling %s failed", type(msg).__name__)
