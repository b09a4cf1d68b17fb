"""Mooncake transfer engine backend: RDMA between GPU nodes, TCP elsewhere.

This is the only module that imports ``mooncake``, lazily, so CPU-only installs and the ``shm``
backend never load RDMA code. Engines run in P2PHANDSHAKE mode (no metadata server); a peer's
session id is ``host:rpc_port`` and changes when the peer restarts.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from transfer.base import (
    Destination,
    TransferError,
    TransferReceiver,
    TransferSender,
    TransferState,
    check_rows,
    plan_segments,
)

log = logging.getLogger(__name__)

# Mooncake's own transfer timeout (MC_TRANSFER_TIMEOUT, seconds; 30 by default): past it a
# write from a dead peer can no longer land. Receivers wait this long after declaring a writer
# dead before its lent blocks return to the pool (transfer/base.py, rule 2c).
WRITE_TIMEOUT_S = float(os.environ.get("MC_TRANSFER_TIMEOUT", "30")) + 1.0

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
    sources: tuple[torch.Tensor, ...]
    pending: list[int] = field(default_factory=list)  # Mooncake batch ids not yet ended
    registered: list[int] = field(default_factory=list)
    failed: bool = False

    @property
    def state(self) -> TransferState:
        if self.failed:
            return TransferState.FAILED
        return TransferState.TRANSFERRING if self.pending else TransferState.DONE


class Sender(TransferSender):
    """Writes a request's coalesced segments (runs of consecutive blocks) with Mooncake.

    RDMA reads the source from registered memory. Sources inside an arena registered once
    with ``register_arena`` (e.g. the encoder's output buffer) cost nothing per request; any
    other source is registered for the request and unregistered once Mooncake has finished
    with it (this scales with size: about 3 ms for 64 MiB here). Over TCP Mooncake copies
    from any address, so by default nothing is registered there.

    Each segment of each region is its own single-entry batch, because the only status call in
    Mooncake's Python API that does not block is ``transfer_check_status``, which looks at a
    batch's first entry (``get_batch_transfer_status`` spins until the whole batch has ended,
    which stalled the encode loop for every write, and for Mooncake's timeout when a peer
    stopped reading; spinning on a waiter thread instead made 200 KB writes 5x slower on
    2 cores). A contiguous grant is two writes. ``poll`` and ``release`` never block: a
    released write that is still running keeps its sources here until Mooncake is done.
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
        self._draining: list[_Inflight] = []  # released while Mooncake may still read them

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
        self._reap()
        e_row = embeds.shape[1] * embeds.element_size()
        d_row = deepstack.shape[1] * deepstack.element_size()
        segs = plan_segments(dest, embeds.shape[0], e_row, d_row)
        e0, d0 = embeds.data_ptr(), deepstack.data_ptr()
        writes = [(e0 + s.row * e_row, s.embed_addr, s.rows * e_row) for s in segs]
        writes += [(d0 + s.row * d_row, s.deepstack_addr, s.rows * d_row) for s in segs]
        entry = _Inflight((embeds, deepstack))
        try:
            self._register_sources(entry)
            for src, dst, size in writes:
                batch = self._engine.batch_transfer_async_write(dest.session, [src], [dst], [size])
                if not batch or batch < 0:
                    raise TransferError(f"Mooncake refused a write to {dest.session}")
                entry.pending.append(batch)
        except BaseException:
            self._draining.append(entry)  # writes already started must end before cleanup
            self._reap()
            raise
        self._inflight[rid] = entry

    def poll(self, rid: str) -> TransferState:
        entry = self._inflight.get(rid)
        if entry is None:
            return TransferState.WAITING
        was_failed = entry.failed
        self._check(entry)
        if entry.failed and not was_failed:
            log.warning("transfer of %s failed", rid)
        return entry.state

    def _check(self, entry: _Inflight) -> None:
        """Ask Mooncake about every pending write (non-blocking; an ended batch is freed)."""
        still = []
        for batch in entry.pending:
            status = self._engine.transfer_check_status(batch)
            if status == 0:
                still.append(batch)
            elif status < 0:
                entry.failed = True
                if status == -2:  # timed out, not freed: it may still read the sources
                    still.append(batch)
        entry.pending = still

    def writing(self, rid: str) -> bool:
        """True until Mooncake has ended every write of ``rid``; a timed-out write (-2) is
        not freed by Mooncake and may still land, so it keeps ``rid`` writing."""
        entry = self._inflight.get(rid)
        if entry is None:
            return False
        self._check(entry)
        return bool(entry.pending)

    def wait(self, rid: str, timeout_s: float = 60.0) -> TransferState:
        """Poll until ``rid`` ends, yielding the CPU between checks (Mooncake's own threads
        do the work; a sleep would see the end late, a bare spin would starve them)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.poll(rid)
            if state is not TransferState.TRANSFERRING:
                return state
            if time.monotonic() > deadline:
                return TransferState.FAILED
            os.sched_yield()

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
            self._check(entry)
            if entry.pending:
                still.append(entry)
            else:
                self._unregister(entry)
        self._draining = still

    def close(self, timeout_s: float = 10.0) -> None:
        """Release everything; waits (up to ``timeout_s``) until Mooncake stops reading every
        source, then leaves what is still running registered rather than free it under it."""
        for rid in list(self._inflight):
            self.release(rid)
        deadline = time.monotonic() + timeout_s
        while self._draining and time.monotonic() < deadline:
            time.sleep(1e-3)
            self._reap()
        if self._draining:
            log.error("%d writes still running at close; their sources stay registered",
                      len(self._draining))  # fmt: skip
            return
        for start, _, _ in self._arenas:
            self._engine.unregister_memory(start)
        self._arenas.clear()

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
