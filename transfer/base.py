"""The transport contract: who writes what where, how completion is observed, and when a
receiver may reuse memory that a sender was told to write into.

The language side owns a ``TransferReceiver``: it provides the memory that
``MultimodalDataBuffers`` lives in, registered once for remote writes, and the ``session``
string that peers use to reach it. The receiver never copies: peers write into its blocks.

The encode side owns a ``TransferSender``: ``submit`` starts writing one job's rows into the
blocks the job names and returns at once; ``poll`` reports progress without blocking;
``writing`` says whether the transport may still touch the destination; ``release`` frees
whatever the sender holds for that job. A job ends in exactly one terminal state (DONE or
FAILED) and must then be released (also after FAILED, and after an abort while TRANSFERRING).

Block lifetime (the rule both servers follow; DESIGN.md "nothing overwritten"):

1. Blocks are *lent* to one writer (an encoder process, named by its incarnation) for one job
   and one ``generation``.
2. They return to the pool only when
   a. the writer reported DONE, the rows were verified, and every copy out of them has
      completed (on a GPU: the copy's CUDA event, not its launch) -- with the pool in SGLang's
      scheduler (``--engine sglang``): SGLang's stream of the request has ended, after which its
      scheduler never reads them again; an *aborted* request's prefill may still be reading,
      and only its own discarded output can see the next writer's rows; or
   b. the writer reported that its write has stopped: FAILED *and* ``writing()`` false on the
      sender (a transport timeout is not a stop: the write may still land); or
   c. the writer can no longer write: its process incarnation changed, or it was declared dead
      and the transport's own timeout (``TRANSPORT_TIMEOUT_S`` for Mooncake) has passed since.
3. A timer alone never frees a block. Failing or aborting a request does not free its lent
   blocks; it only stops waiting for them.
4. A sender never reads its sources before the kernels that produced them have completed (the
   encoder waits on the split's CUDA event before ``submit``).
"""

from __future__ import annotations

import enum
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class TransferState(enum.Enum):
    WAITING = "waiting"  # not submitted (or unknown rid)
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class TransferError(RuntimeError):
    """A transport could not be set up or refused a request outright."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one request's rows go: the receiver's session and per-block remote addresses.

    Row ``r`` of the request lands in block ``r // block_tokens`` at row ``r % block_tokens``.
    """

    session: str
    block_tokens: int
    embed_addrs: tuple[int, ...]
    deepstack_addrs: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        if len(self.embed_addrs) != len(self.deepstack_addrs):
            raise ValueError("one embed and one deepstack address per block")


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of request rows that lands in consecutive memory on the receiver."""

    row: int  # first request row
    rows: int
    embed_addr: int
    deepstack_addr: int


def coalesce(
    n_rows: int, block_tokens: int, starts: Sequence[tuple[int, ...]], strides: tuple[int, ...]
) -> list[tuple[int, int, tuple[int, ...]]]:
    """Group a request's blocks into runs that are adjacent in every coordinate.

    Block ``i`` holds request rows ``i*block_tokens ...`` and starts at ``starts[i]`` (one
    coordinate per region, e.g. byte addresses); a row advances coordinate ``k`` by
    ``strides[k]``. Returns ``(first_row, rows, start)`` per run.
    """
    bt = block_tokens
    need = -(-n_rows // bt)
    if n_rows < 0 or need > len(starts):
        raise TransferError(f"{n_rows} rows need {need} blocks, only {len(starts)} given")
    runs: list[tuple[int, int, tuple[int, ...]]] = []
    for i in range(need):
        rows = min(bt, n_rows - i * bt)
        if runs:
            row, n, first = runs[-1]
            if all(s == f + n * k for s, f, k in zip(starts[i], first, strides, strict=True)):
                runs[-1] = (row, n + rows, first)
                continue
        runs.append((i * bt, rows, tuple(starts[i])))
    return runs


def plan_segments(dest: Destination, n_rows: int, embed_row: int, ds_row: int) -> list[Segment]:
    """Cut ``n_rows`` rows into segments, coalescing blocks that are adjacent on the receiver.

    ``embed_row`` / ``ds_row`` are the byte sizes of one row in each region.
    """
    starts = list(zip(dest.embed_addrs, dest.deepstack_addrs, strict=True))
    return [
        Segment(row, rows, ea, da)
        for row, rows, (ea, da) in coalesce(n_rows, dest.block_tokens, starts, (embed_row, ds_row))
    ]


class Notifier:
    """A pipe whose read end becomes readable when a write ends, for event loops to wait on.

    ``notify`` may be called from any thread; ``drain`` empties the pipe (then ``poll`` tells
    which requests ended). Closed with the sender.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def notify(self) -> None:
        try:
            os.write(self._w, b"!")
        except OSError:
            pass  # the pipe is full (a wake-up is already pending) or closed

    def drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except OSError:
            pass  # empty (BlockingIOError) or closed

    def close(self) -> None:
        """Idempotent (the descriptors are forgotten, never closed twice)."""
        fds, self._r, self._w = (self._r, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class TransferReceiver(ABC):
    """Language side of a transport. Created once per language process."""

    name: str

    @abstractmethod
    def allocate(self, nbytes: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Return a uint8 tensor of ``nbytes`` that peers can write into, registered for them.

        Called once by ``MultimodalDataBuffers``; the receiver owns the memory until ``close``.
        """

    @abstractmethod
    def address_of(self, tensor: torch.Tensor) -> int:
        """The remote address a sender must target to write at ``tensor``'s first byte."""

    @property
    @abstractmethod
    def session(self) -> str:
        """What a sender needs to reach this receiver (goes into ``EncodeJob.session``)."""

    @abstractmethod
    def close(self) -> None:
        """Unregister and free the memory. Idempotent."""


class TransferSender(ABC):
    """Encode side of a transport. One per encode process; used from its sender loop only."""

    name: str

    @abstractmethod
    def submit(
        self, rid: str, dest: Destination, embeds: torch.Tensor, deepstack: torch.Tensor
    ) -> None:
        """Start writing ``embeds [n, H]`` and ``deepstack [n, 3H]`` to ``dest``. Non-blocking.

        The caller keeps both tensors alive and unmodified until the request is released.
        Raises ``TransferError`` when it cannot even start (the request is then not tracked).
        """

    @abstractmethod
    def poll(self, rid: str) -> TransferState:
        """Non-blocking progress check; WAITING for an unknown rid. May be called repeatedly."""

    def register_arena(self, arena: torch.Tensor) -> None:  # noqa: B027 - optional
        """Register ``arena`` once, at start-up; sources inside it then cost nothing per write
        (RDMA reads only registered memory). The sender keeps a reference until ``close``.
        A no-op for transports that read any address (``shm``)."""

    def writing(self, rid: str) -> bool:
        """True while the transport may still write into ``rid``'s destination (it was
        submitted, not released, and the transport has not said the write ended).
        Non-blocking. A write that FAILED with a timeout is still ``writing``.

        The default trusts ``poll``; backends whose failures can leave a write running
        override it.
        """
        return self.poll(rid) is TransferState.TRANSFERRING

    @abstractmethod
    def release(self, rid: str) -> None:
        """Forget ``rid`` and free what the sender holds for it. Idempotent.

        Also allowed while the request is TRANSFERRING (abort): the sender then either waits
        until the transport stops reading the sources (``shm``: a local copy) or keeps its own
        references to them until then (``mooncake``: never blocks). Either way the caller may
        drop its references to the sources once ``release`` returns.
        """

    @abstractmethod
    def close(self) -> None:
        """Release everything. Idempotent."""

    @property
    def completion_fd(self) -> int | None:
        """A file descriptor that becomes readable when a write ends, or None.

        An event loop can wait on it (e.g. in a ``zmq.Poller``) instead of polling on a timer;
        after it fires, call ``drain_completions`` and then ``poll`` the requests in flight.
        """
        return None

    def drain_completions(self) -> None:  # noqa: B027 - optional: only with a completion_fd
        """Empty ``completion_fd`` (a no-op without one)."""

    def wait(self, rid: str, timeout_s: float = 60.0) -> TransferState:
        """Poll until ``rid`` is terminal or ``timeout_s`` passes (then FAILED).

        Sleeps between polls grow with the time already spent (2% of it, 20 us to 1 ms): a
        short transfer is seen at once, a long one costs few wake-ups (each one takes CPU from
        the transport's own threads) and is seen at most ~2% late.
        """
        start = time.monotonic()
        while True:
            state = self.poll(rid)
            if state.terminal or state is TransferState.WAITING:
                return state
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                return TransferState.FAILED
            time.sleep(min(1e-3, max(2e-5, 0.02 * elapsed)))


def check_rows(embeds: torch.Tensor, deepstack: torch.Tensor) -> None:
    """Validate a request's source tensors: 2-D, contiguous, same rows, same dtype, 3x width."""
    if embeds.dim() != 2 or deepstack.dim() != 2:
        raise TransferError("embeds and deepstack must be 2-D")
    if embeds.shape[0] != deepstack.shape[0] or deepstack.shape[1] != 3 * embeds.shape[1]:
        raise TransferError(f"shapes {tuple(embeds.shape)} / {tuple(deepstack.shape)} mismatch")
    if embeds.dtype != deepstack.dtype:
        raise TransferError("embeds and deepstack dtypes differ")
    if not (embeds.is_contiguous() and deepstack.is_contiguous()):
        raise TransferError("source tensors must be contiguous")
