"""The language-side process of ``epd-bench-transfer``: owns the receive pools and answers.

Runs in its own process. Commands arrive on one ZeroMQ PAIR socket as multipart frames whose
first frame names the command (see ``serve``).
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import msgpack
import torch
import zmq

import protocol as P
from transfer import DTYPES, MultimodalDataBuffers, make_receiver, rows_checksum

BLOCK_TOKENS = 64


class Peer:
    def __init__(self) -> None:
        self.pools: dict[str, MultimodalDataBuffers] = {}
        self.receivers: dict[str, Any] = {}
        self.granted: dict[str, tuple[int, list[int]]] = {}
        self.generation = 0

    def setup(self, hidden: int, tokens: int, dtype: str) -> dict[str, Any]:
        self.close()
        out: dict[str, Any] = {}
        for name in ("mooncake", "shm"):
            rx = self.receivers[name] = make_receiver(name)
            pool = MultimodalDataBuffers(
                -(-tokens // BLOCK_TOKENS), BLOCK_TOKENS, hidden, DTYPES[dtype], receiver=rx
            )
            self.pools[name] = pool
            whole = pool.describe([0])
            out[name] = (whole.session, whole.embed_addrs[0], whole.deepstack_addrs[0])
        return out

    def handle(self, name: str, data: bytes) -> bytes:
        msg = P.decode(data)
        pool = self.pools[name]
        if isinstance(msg, P.AllocRequest):
            blocks = pool.alloc(msg.n_tokens)
            if blocks is None:
                return P.encode(P.AllocDenied(rid=msg.rid, code="pool_full"))
            self.generation += 1
            self.granted[msg.rid] = (self.generation, blocks)
            where = pool.describe(blocks)
            return P.encode(
                P.AllocGrant(
                    rid=msg.rid,
                    generation=self.generation,
                    session=where.session,
                    block_tokens=where.block_tokens,
                    n_tokens=msg.n_tokens,
                    hidden=msg.hidden,
                    dtype=msg.dtype,
                    blocks=blocks,
                    embed_addrs=where.embed_addrs,
                    deepstack_addrs=where.deepstack_addrs,
                )  # fmt: skip
            )
        assert isinstance(msg, P.TransferDone)
        generation, blocks = self.granted.pop(msg.rid)
        embeds, deepstack = pool.gather(blocks, msg.n_tokens)
        ok = (
            generation == msg.generation
            and rows_checksum(embeds, deepstack, pool.block_tokens) == msg.checksum
        )
        pool.free(blocks)
        # perf_counter is CLOCK_MONOTONIC, shared by processes on one host: the sender reads
        # the moment the data was usable here, without the ack's trip back.
        return msgpack.packb({"ok": ok, "t": time.perf_counter()})

    def close(self) -> None:
        self.pools.clear()
        for rx in self.receivers.values():
            rx.close()
        self.receivers.clear()


def _unpickle_copy(frames: list[zmq.Frame]) -> list[torch.Tensor]:
    meta = pickle.loads(frames[1].bytes)
    return [
        torch.frombuffer(f.buffer, dtype=meta["dtype"]).view(shape).clone()
        for f, shape in zip(frames[2:], meta["shapes"], strict=True)
    ]


def serve(control: str, bulk: str) -> None:
    """Bind both sockets and answer until ``quit``. Every command gets exactly one reply, on
    the socket it came in on: ``control`` for commands and our paths, ``bulk`` for the ZeroMQ
    baselines' tensor frames."""
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
            elif cmd == b"ours":
                sock.send(peer.handle(frames[1].bytes.decode(), frames[2].bytes))
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
