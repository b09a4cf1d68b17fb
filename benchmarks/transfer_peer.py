"""The language-side process of ``epd-bench-transfer``: the language server's own receiver.

Runs in its own process. For our paths it is a language server's data plane without HTTP or a
model: per backend, a ``Receiver`` (``language_server/pool/receiver.py``) over
``MultimodalDataBuffers`` on the real transport receiver. ``lend`` admits a one-image request
(``Receiver.admit`` lends its blocks) and answers with the ``EncodeJob`` that
``Receiver.job`` built; ``msg`` hands the encoder's answer to ``Receiver.on_message``, which
checks lease, generation, row count and checksum before the request's ``on_ready`` sees the
rows. Commands arrive on one ZeroMQ PAIR socket as multipart frames whose first frame names
the command (see ``serve``); the ZeroMQ baselines' frames use a second one.
"""

from __future__ import annotations

import pickle
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

import protocol as P
from language_server.pool.leases import Lease, Pending, ReceivedPrompt, RequestError
from language_server.pool.receiver import Receiver
from transfer import DTYPES, MultimodalDataBuffers, make_receiver

BLOCK_TOKENS = 64
OURS = ("mooncake", "shm")


@dataclass(frozen=True)
class _Image:
    data: bytes
    grid: tuple[int, int, int]
    n_tokens: int
    kind: str = "image"


@dataclass(frozen=True)
class _Prompt:
    """What the receiver reads of a ``language_server.prompt.PreparedPrompt``: one image."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    visual_mask: torch.Tensor
    image_grid_thw: torch.Tensor
    images: tuple[_Image, ...]
    video_grid_thw: torch.Tensor = torch.zeros(0, 3, dtype=torch.long)

    @classmethod
    def one_image(cls, n_tokens: int) -> _Prompt:
        grid = (1, 1, n_tokens)  # the encoder here does not look at pixels
        ids = torch.zeros(n_tokens, dtype=torch.long)
        return cls(ids, torch.zeros(3, n_tokens, dtype=torch.long), ids == 0,
                   torch.tensor([grid]), (_Image(b"bench-image", grid, n_tokens),))  # fmt: skip


@dataclass(eq=False)
class _Link:
    """An ``EncoderLink`` stand-in: what the receiver sends to the encoder waits in ``outbox``
    and goes back with the answer to the current command."""

    address: str = "bench-encoder"
    incarnation: int = field(default_factory=lambda: secrets.randbits(63))
    inflight: set[tuple[str, int, int]] = field(default_factory=set)
    served: int = 0
    outbox: list[bytes] = field(default_factory=list)

    def send(self, msg: P.Message, quiet: bool = False) -> bool:
        self.outbox.append(P.encode(msg))
        return True

    def take(self) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out


class _Lane:
    """One backend: its pool, the receiver that lends it, and the one encoder it lends to."""

    def __init__(self, name: str, hidden: int, tokens: int, dtype: str) -> None:
        self.rx = make_receiver(name)
        pool = MultimodalDataBuffers(
            -(-tokens // BLOCK_TOKENS), BLOCK_TOKENS, hidden, DTYPES[dtype], receiver=self.rx
        )
        self.receiver = Receiver(pool)
        self.receiver.on_lent = self._send_jobs
        self.link = _Link()
        self.prompt = _Prompt.one_image(tokens)
        self.result: dict[str, Any] | None = None
        self.seq = 0

    def _send_jobs(self, pending: Pending) -> None:
        """As ``Dispatcher.send_jobs``, to the one link."""
        for lease in pending.leases:
            spec = self.prompt.images[lease.image]
            if self.link.send(self.receiver.job(lease, spec.data, list(spec.grid))):
                self.receiver.sent(lease, self.link)

    def _on_ready(self, rows: ReceivedPrompt | None, error: RequestError | None) -> None:
        # perf_counter is CLOCK_MONOTONIC, shared by processes on one host: the encode side
        # reads the moment the rows were usable here, without the ack's trip back.
        t = time.perf_counter()
        if error is not None or rows is None:
            self.result = {"ok": False, "error": f"{getattr(error, 'status', '?')}: {error}"}
        else:
            self.result = {"ok": True, "t": t, "rows": int(rows.embeds.shape[0])}

    def lend(self) -> list[bytes]:
        """Admit a one-image request; answer ``[b"job", EncodeJob]`` (or ``[b"error", why]``)."""
        self.receiver.tick()
        self.seq += 1
        pending = Pending(f"bench-{self.seq}", self.prompt, self._on_ready)
        pending.leases = [Lease(pending, 0, self.prompt.images[0].n_tokens)]
        try:
            self.receiver.admit(pending)
        except RequestError as exc:
            return [b"error", f"{exc.status}: {exc.message}".encode()]
        jobs = self.link.take()
        if not jobs:  # queued for room: the last request's blocks did not come back
            self.receiver.fail(pending, RequestError(503, "no free blocks"))
            return [b"error", b"no free blocks: the last request's blocks were not returned"]
        return [b"job", *jobs]

    def message(self, data: bytes) -> list[bytes]:
        """The encoder's answer; reply ``[ack]`` plus whatever the receiver sent back (Abort).

        The ack says whether the request completed (and when its rows were usable) and how
        many blocks are still lent after it (0 once a request completed).
        """
        self.result = None
        try:
            msg = P.decode(data)
        except P.ProtocolError as exc:
            return [msgpack.packb({"ok": False, "error": str(exc)})]
        self.receiver.on_message(self.link, msg)
        ack = self.result or {"ok": False, "error": f"{type(msg).__name__} completed nothing"}
        if isinstance(msg, P.EncodeFailed):
            ack = {"ok": False, "error": f"encoder failed at {msg.stage}: {msg.reason}"}
        ack["lent_blocks"] = self.receiver.lent_blocks
        return [msgpack.packb(ack), *self.link.take()]

    def close(self) -> None:
        self.rx.close()


class Peer:
    def __init__(self) -> None:
        self.lanes: dict[str, _Lane] = {}

    def setup(self, hidden: int, tokens: int, dtype: str) -> dict[str, Any]:
        """New pools for this payload; answers where raw writes go (each pool's first byte)."""
        self.close()
        out: dict[str, Any] = {}
        for name in OURS:
            lane = self.lanes[name] = _Lane(name, hidden, tokens, dtype)
            whole = lane.receiver.buffers.describe([0])
            out[name] = (whole.session, whole.embed_addrs[0], whole.deepstack_addrs[0])
        return out

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.close()
        self.lanes.clear()


def _unpickle_copy(frames: list[zmq.Frame]) -> list[torch.Tensor]:
    meta = pickle.loads(frames[1].bytes)
    return [
        torch.frombuffer(f.buffer, dtype=meta["dtype"]).view(shape).clone()
        for f, shape in zip(frames[2:], meta["shapes"], strict=True)
    ]


def serve(control: str, bulk: str) -> None:
    """Bind both sockets and answer until ``quit``. Every command gets exactly one reply, on
    the socket it came in on: ``control`` for commands and our paths, ``bulk`` for the ZeroMQ
    baselines' tensor frames.

    control: ``setup <msgpack>`` -> raw-write targets; ``lend <backend>`` -> ``job <EncodeJob>``;
    ``msg <backend> <message>`` -> ``<ack msgpack> [messages for the encoder]``; ``quit``.
    """
    torch.set_num_threads(1)
    ctx = zmq.Context.instance()
    sock, data = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sock.bind(control)
    data.bind(bulk)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(data, zmq.POLLIN)
    peer = Peer()
    kept: object = None  # what the receiver of a ZeroMQ baseline holds (its received data)
    try:
        while True:
            ready = dict(poller.poll())
            if data in ready:
                frames = data.recv_multipart(copy=False)
                if frames[0].bytes == b"drop":  # untimed: let go of the last baseline's data
                    kept = None
                    data.send(b"ok")
                else:
                    kept, answer = _bulk(frames)
                    data.send(answer)
            if sock not in ready:
                continue
            frames = sock.recv_multipart(copy=False)
            cmd = frames[0].bytes
            if cmd == b"quit":
                sock.send(b"bye")
                return
            if cmd == b"setup":
                args = msgpack.unpackb(frames[1].bytes)
                sock.send(msgpack.packb(peer.setup(**args)))
            elif cmd == b"lend":
                sock.send_multipart(peer.lanes[frames[1].bytes.decode()].lend())
            elif cmd == b"msg":
                sock.send_multipart(peer.lanes[frames[1].bytes.decode()].message(frames[2].bytes))
            else:
                sock.send(b"?")
    finally:
        peer.close()
        sock.close(linger=0)
        data.close(linger=0)


def _bulk(frames: list[zmq.Frame]) -> tuple[object, bytes]:
    """A ZeroMQ baseline's receive: what the receiver now holds, and the answer."""
    cmd = frames[0].bytes
    if cmd == b"pickle":  # SGLang-style: copy out of the message into new tensors
        tensors = _unpickle_copy(frames)
        return tensors, str(sum(t.numel() for t in tensors)).encode()
    if cmd == b"zcopy":  # zero-copy: the frames are the data
        return frames, str(sum(len(f.buffer) for f in frames[1:])).encode()
    return None, b"?"
