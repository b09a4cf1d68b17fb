"""Mooncake transfer engine backend: RDMA between GPU nodes, TCP elsewhere.

This is the only module that imports ``mooncake``, lazily, so CPU-only installs and the ``shm``
backend never load RDMA code. Engines run in P2PHANDSHAKE mode (no metadata server); a peer's
session id is ``host:rpc_port`` and changes when the peer restarts.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from transfer.base import (
    Destination,
    Notifier,
    TransferError,
    TransferReceiver,
    TransferSender,
    TransferState,
    check_rows,
    plan_segments,
)

log = logging.getLogger(__name__)

MAX_IDLE_WAITERS = 8  # waiter threads kept for peers with nothing in flight

_INSTALL_HINT = (
    "install `mooncake-transfer-engine-non-cuda` (CPU nodes) or `mooncake-transfer-engine` "
    "(CUDA nodes), never both; on Debian also `apt-get install libibverbs1 libnl-3-200 "
    "libnl-route-3-200`"
)


def _new_engine(hostname: str, protocol: str, device_name: str) -> Any:
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise TransferError(f"cannot import Mooncake ({exc}); {_INSTALL_HINT}") from exc
    engine = TransferEngine()
    rc = engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name)
    if rc != 0:
        raise TransferError(f"Mooncake initialize({hostname!r}, {protocol!r}) returned {rc}")
    return engine


class Receiver(TransferReceiver):
    """Registers the receive pool with a Mooncake engine; peers write into it one-sidedly."""

    name = "mooncake"

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp", device_name: str = ""):
        self.hostname = hostname
        self._engine = _new_engine(hostname, protocol, device_name)
        self._regions: list[torch.Tensor] = []

    def allocate(self, nbytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
        region = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        rc = self._engine.register_memory(region.data_ptr(), nbytes)
        if rc != 0:
            raise TransferError(f"Mooncake register_memory of {nbytes} bytes returned {rc}")
        self._regions.append(region)
        return region

    def address_of(self, tensor: torch.Tensor) -> int:
        return int(tensor.data_ptr())

    @property
    def session(self) -> str:
        return f"{self.hostname}:{self._engine.get_rpc_port()}"

    def close(self) -> None:
        for region in self._regions:
            self._engine.unregister_memory(region.data_ptr())
        self._regions.clear()


@dataclass(slots=True)
class _Inflight:
    batch_id: int
    sources: tuple[torch.Tensor, ...]
    registered: list[int] = field(default_factory=list)
    session: str = ""
    ended: Future[int] | None = None  # Mooncake's status code once the write has ended
    state: TransferState = TransferState.TRANSFERRING


class Sender(TransferSender):
    """Writes a whole request with one batch call; consecutive blocks become one segment.

    RDMA reads the source from registered memory. Sources inside an arena registered once
    with ``register_arena`` (e.g. the encoder's output buffer) cost nothing per request; any
    other source is registered for the request and unregistered on ``release`` (this scales
    with size: about 3 ms for 64 MiB here). Over TCP Mooncake copies from any address, so by
    default nothing is registered there.

    Mooncake's Python ``get_batch_transfer_status`` does not return until the batch has ended
    (it spins, without the GIL, as its own ``batch_transfer_sync_write`` does). So a waiter
    thread per peer calls it for each batch in submission order, and ``poll`` only reads the
    outcome: ``poll`` never blocks, ``completion_fd`` wakes an event loop when a write ends,
    and a peer that stops answering delays only its own writes. ``release`` never blocks
    either: a write still running keeps its sources (and their registration) here until
    Mooncake stops reading them.
    """

    name = "mooncake"

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        device_name: str = "",
        register_sources: bool | None = None,
    ):
        self._engine = _new_engine(hostname, protocol, device_name)
        self._register = protocol != "tcp" if register_sources is None else register_sources
        self._arenas: list[tuple[int, int, torch.Tensor]] = []
        self._inflight: dict[str, _Inflight] = {}
        self._draining: list[_Inflight] = []  # released while Mooncake still reads them
        self._waiters: dict[str, ThreadPoolExecutor] = {}  # peer session -> its waiter
        self._notifier = Notifier()

    def register_arena(self, arena: torch.Tensor) -> None:
        """Register ``arena`` once; sources that lie inside it are not registered per request.

        The sender keeps a reference to ``arena`` until ``close``.
        """
        start, nbytes = arena.data_ptr(), arena.numel() * arena.element_size()
        if self._engine.register_memory(start, nbytes) != 0:
            raise TransferError(f"Mooncake register_memory of a {nbytes}-byte arena failed")
        self._arenas.append((start, start + nbytes, arena))

    def submit(
        self, rid: str, dest: Destination, embeds: torch.Tensor, deepstack: torch.Tensor
    ) -> None:
        check_rows(embeds, deepstack)
        if rid in self._inflight:
            raise TransferError(f"request {rid} already submitted")
        e_row = embeds.shape[1] * embeds.element_size()
        d_row = deepstack.shape[1] * deepstack.element_size()
        segs = plan_segments(dest, embeds.shape[0], e_row, d_row)
        if not segs:
            self._inflight[rid] = _Inflight(0, (), state=TransferState.DONE)
            return
        e0, d0 = embeds.data_ptr(), deepstack.data_ptr()
        src = [e0 + s.row * e_row for s in segs] + [d0 + s.row * d_row for s in segs]
        dst = [s.embed_addr for s in segs] + [s.deepstack_addr for s in segs]
        sizes = [s.rows * e_row for s in segs] + [s.rows * d_row for s in segs]
        entry = _Inflight(0, (embeds, deepstack), session=dest.session)
        try:
            self._register_sources(entry)
            entry.batch_id = self._engine.batch_transfer_async_write(dest.session, src, dst, sizes)
        except BaseException:
            self._unregister(entry)
            raise
        if not entry.batch_id or entry.batch_id < 0:
            self._unregister(entry)
            raise TransferError(f"Mooncake refused the batch write to {dest.session}")
        try:
            entry.ended = self._waiter(dest.session).submit(self._await, entry.batch_id)
        except RuntimeError as exc:  # the sender was closed meanwhile: no waiter to hand it to
            self._await(entry.batch_id)  # Mooncake must stop reading before we unregister
            self._unregister(entry)
            raise TransferError(f"sender is closed: {exc}") from exc
        entry.ended.add_done_callback(lambda _: self._notifier.notify())  # after the outcome
        self._inflight[rid] = entry

    def _waiter(self, session: str) -> ThreadPoolExecutor:
        """The waiter thread for ``session``; waiters of idle peers beyond the newest
        ``MAX_IDLE_WAITERS`` are stopped (a restarted language server is a new session)."""
        self._reap()
        waiter = self._waiters.pop(session, None)
        if waiter is None:
            waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mooncake-wait")
        self._waiters[session] = waiter  # newest last
        entries = [*self._inflight.values(), *self._draining]
        busy = {e.session for e in entries if e.ended is not None and not e.ended.done()}
        idle = [s for s in self._waiters if s != session and s not in busy]
        for old in idle[: max(0, len(idle) - MAX_IDLE_WAITERS)]:
            self._waiters.pop(old).shutdown(wait=False)
        return waiter

    def _await(self, batch_id: int) -> int:
        """On the waiter thread: block until the batch ends (Mooncake frees it then)."""
        return int(self._engine.get_batch_transfer_status([batch_id]))

    def poll(self, rid: str) -> TransferState:
        entry = self._inflight.get(rid)
        if entry is None:
            return TransferState.WAITING
        if not entry.state.terminal and entry.ended is not None and entry.ended.done():
            error = entry.ended.exception()
            status = -1 if error is not None else entry.ended.result()
            if status == 0:
                entry.state = TransferState.DONE
            else:
                entry.state = TransferState.FAILED
                log.warning("transfer of %s failed (status %s)", rid, error or status)
        return entry.state

    def wait(self, rid: str, timeout_s: float = 60.0) -> TransferState:
        """Block on the waiter's outcome (woken when the write ends, no polling)."""
        entry = self._inflight.get(rid)
        if entry is None:
            return TransferState.WAITING
        if entry.ended is not None and not entry.state.terminal:
            try:
                entry.ended.exception(timeout=timeout_s)
            except TimeoutError:
                return TransferState.FAILED
        return self.poll(rid)

    @property
    def completion_fd(self) -> int | None:
        return self._notifier.fileno()

    def drain_completions(self) -> None:
        self._notifier.drain()

    def release(self, rid: str) -> None:
        """Forget ``rid`` at once; a write still running keeps its sources until it ends."""
        entry = self._inflight.pop(rid, None)
        if entry is not None:
            self._draining.append(entry)
        self._reap()

    def _reap(self) -> None:
        """Unregister and drop the sources of released writes that Mooncake has finished."""
        still = []
        for entry in self._draining:
            if entry.ended is None or entry.ended.done():
                self._unregister(entry)
            else:
                still.append(entry)
        self._draining = still

    def close(self) -> None:
        """Release everything; waits until Mooncake stops reading every source (bounded by
        Mooncake's own transfer timeout)."""
        for rid in list(self._inflight):
            self.release(rid)
        for waiter in self._waiters.values():
            waiter.shutdown(wait=True)
        self._waiters.clear()
        self._reap()
        for start, _, _ in self._arenas:
            self._engine.unregister_memory(start)
        self._arenas.clear()
        self._notifier.close()

    def write_raw(self, session: str, src: list[int], dst: list[int], sizes: list[int]) -> int:
        """Plain ``batch_transfer_sync_write`` on this sender's engine (blocking).

        For baselines and diagnostics: no grant, no segment planning, no registration.
        Returns Mooncake's status code (0 on success, negative on failure).
        """
        return int(self._engine.batch_transfer_sync_write(session, src, dst, sizes))

    def _register_sources(self, entry: _Inflight) -> None:
        if not self._register:
            return
        for t in entry.sources:
            nbytes = t.numel() * t.element_size()
            if any(
                lo <= t.data_ptr() and t.data_ptr() + nbytes <= hi for lo, hi, _ in self._arenas
            ):
                continue
            if self._engine.register_memory(t.data_ptr(), nbytes) != 0:
                raise TransferError(f"Mooncake register_memory of {nbytes} source bytes failed")
            entry.registered.append(t.data_ptr())

    def _unregister(self, entry: _Inflight) -> None:
        for ptr in entry.registered:
            self._engine.unregister_memory(ptr)
        entry.registered.clear()
