"""Same-host backend: the receive pool lives in POSIX shared memory that the encoder maps.

A transfer is one copy from the encoder's tensor into the block. Addresses in grants are byte
offsets into the segment named by the session (``shm://<name>``). Host memory only.
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]  # CPython, POSIX only
import contextlib
import mmap
import os
import re
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing import shared_memory

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

_PREFIX = "shm://"
_NAME = re.compile(r"^epd-[A-Za-z0-9_-]{1,64}$")
# The copy runs in the writer's own process: once that process is gone nothing more lands.
WRITE_TIMEOUT_S = 0.0
INLINE_BYTES = 4 << 20  # smaller requests are copied in submit(); larger ones on a thread


def _attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write.

    Done with ``shm_open`` + ``mmap`` rather than ``SharedMemory`` so that this process's
    resource tracker never learns the name (it would unlink the receiver's segment at exit, or
    forget the receiver's own registration when both share one tracker).
    """
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class Receiver(TransferReceiver):
    name = "shm"

    def __init__(self) -> None:
        self._shm: shared_memory.SharedMemory | None = None
        self._base = 0

    def allocate(self, nbytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise TransferError("the shm transport keeps its pool in host memory (device='cpu')")
        if self._shm is not None:
            raise TransferError("the shm receiver holds one region; create another receiver")
        self._shm = shared_memory.SharedMemory(
            name=f"epd-{uuid.uuid4().hex[:16]}", create=True, size=max(nbytes, 1)
        )
        region = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=nbytes)
        self._base = int(region.data_ptr())
        return region

    def address_of(self, tensor: torch.Tensor) -> int:
        offset = int(tensor.data_ptr()) - self._base
        if self._shm is None or not 0 <= offset <= self._shm.size:
            raise TransferError("tensor is not inside this receiver's shared memory")
        return offset

    @property
    def session(self) -> str:
        if self._shm is None:
            raise TransferError("no region allocated yet")
        return _PREFIX + self._shm.name

    def close(self) -> None:
        if self._shm is None:
            return
        try:
            self._shm.close()
        except BufferError:
            pass  # tensors still view the mapping; it goes away with them
        self._shm.unlink()
        self._shm = None


class Sender(TransferSender):
    name = "shm"

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, torch.Tensor]] = {}
        self._inflight: dict[str, Future[None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shm-copy")
        self._lock = threading.Lock()
        self._notifier = Notifier()

    def submit(
        self, rid: str, dest: Destination, embeds: torch.Tensor, deepstack: torch.Tensor
    ) -> None:
        check_rows(embeds, deepstack)
        if rid in self._inflight:
            raise TransferError(f"request {rid} already submitted")
        region = self._region(dest.session)
        if embeds.device.type != "cpu":
            embeds, deepstack = embeds.cpu(), deepstack.cpu()
        e_row = embeds.shape[1] * embeds.element_size()
        d_row = deepstack.shape[1] * deepstack.element_size()
        segs = plan_segments(dest, embeds.shape[0], e_row, d_row)
        jobs = [(s.embed_addr, embeds[s.row : s.row + s.rows]) for s in segs]
        jobs += [(s.deepstack_addr, deepstack[s.row : s.row + s.rows]) for s in segs]
        for addr, src in jobs:
            if addr + src.numel() * src.element_size() > region.numel():
                raise TransferError(f"grant for {rid} points outside the shared region")
        if embeds.numel() * embeds.element_size() * 4 <= INLINE_BYTES:
            fut: Future[None] = Future()
            try:
                _copy(region, jobs)
                fut.set_result(None)
            except Exception as exc:  # noqa: BLE001 - reported through poll()
                fut.set_exception(exc)
        else:
            fut = self._pool.submit(_copy, region, jobs)
        fut.add_done_callback(lambda _: self._notifier.notify())  # runs at once if done
        self._inflight[rid] = fut

    def poll(self, rid: str) -> TransferState:
        fut = self._inflight.get(rid)
        if fut is None:
            return TransferState.WAITING
        if not fut.done():
            return TransferState.TRANSFERRING
        return TransferState.FAILED if fut.exception() else TransferState.DONE

    def wait(self, rid: str, timeout_s: float = 60.0) -> TransferState:
        fut = self._inflight.get(rid)
        if fut is None:
            return TransferState.WAITING
        try:
            fut.result(timeout=timeout_s)
        except TimeoutError:
            return TransferState.FAILED
        except Exception:  # noqa: BLE001 - the copy's own failure
            pass
        return self.poll(rid)

    @property
    def completion_fd(self) -> int | None:
        return self._notifier.fileno()

    def drain_completions(self) -> None:
        self._notifier.drain()

    def release(self, rid: str) -> None:
        fut = self._inflight.pop(rid, None)
        if fut is not None:
            fut.exception()  # waits for the copy to stop touching the sources

    def close(self) -> None:
        for rid in list(self._inflight):
            self.release(rid)
        self._pool.shutdown(wait=True)
        self._notifier.close()
        for shm, _ in self._maps.values():
            with contextlib.suppress(BufferError):
                shm.close()
        self._maps.clear()

    def _forget_gone(self) -> None:
        """Unmap segments whose receiver has gone (unlinked), e.g. after a language restart;
        otherwise each restart would keep a whole old pool mapped here."""
        for name in [n for n in self._maps if not os.path.exists(f"/dev/shm/{n}")]:
            mapping, region = self._maps.pop(name)
            del region
            try:
                mapping.close()
            except BufferError:
                pass  # a copy still views it; it goes away with that view

    def _region(self, session: str) -> torch.Tensor:
        name = session.removeprefix(_PREFIX)
        if not session.startswith(_PREFIX) or not _NAME.match(name):
            raise TransferError(f"not a shm session: {session!r}")
        with self._lock:
            if name not in self._maps:
                self._forget_gone()
                try:
                    mapping = _attach(name)
                except FileNotFoundError as exc:
                    raise TransferError(f"shared memory {name} does not exist") from exc
                self._maps[name] = (mapping, torch.frombuffer(mapping, dtype=torch.uint8))
            return self._maps[name][1]


def _copy(region: torch.Tensor, jobs: list[tuple[int, torch.Tensor]]) -> None:
    for addr, src in jobs:
        nbytes = src.numel() * src.element_size()
        region[addr : addr + nbytes].view(src.dtype).view(src.shape).copy_(src)
