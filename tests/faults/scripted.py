"""A scripted encode server for fault tests: a real ZeroMQ ROUTER and a real Mooncake sender,
driven step by step by the test instead of by a ViT. It lets a test misbehave on purpose:
stay silent, send stale or forged messages, or garbage."""

from __future__ import annotations

import threading
import time

import torch
import zmq

import protocol as P
from epd.cluster import free_port
from transfer import Destination, TransferState, make_sender, rows_checksum


class ScriptedEncoder:
    def __init__(self, image_token_id: int, hidden: int = 64) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.image_token_id, self.hidden = image_token_id, hidden
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.peer: bytes | None = None
        self.inbox: list[P.Message] = []
        self.sender = make_sender("mooncake")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Answer heartbeats (so the language server sees us up); record everything else."""
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            with self._lock:
                peer, data = self.sock.recv_multipart()
                self.peer = peer
                msg = P.decode(data)
                if isinstance(msg, P.Heartbeat):
                    hello = P.EncoderHello(encoder_id="scripted", transport="mooncake", session="s")
                    self.sock.send_multipart([peer, P.encode(hello)])
                    beat = P.Heartbeat(encoder_id="scripted", inflight=0, sent_at=time.time())
                    self.sock.send_multipart([peer, P.encode(beat)])
                else:
                    self.inbox.append(msg)

    def send(self, msg: P.Message | bytes) -> None:
        data = msg if isinstance(msg, bytes) else P.encode(msg)
        assert self.peer is not None, "no language server connected yet"
        with self._lock:
            self.sock.send_multipart([self.peer, data])

    def wait_for(self, kind: type, rid: str | None = None, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for msg in self.inbox:
                    if isinstance(msg, kind) and (rid is None or getattr(msg, "rid", None) == rid):
                        self.inbox.remove(msg)
                        return msg
            time.sleep(0.01)
        raise TimeoutError(f"no {kind.__name__} for {rid} within {timeout} s")

    def alloc_request(self, rid: str, n_vis: int = 8) -> P.AllocRequest:
        """A valid AllocRequest: one 2x(2*n_vis/2) image grid, text around it."""
        ids = [1, 2] + [self.image_token_id] * n_vis + [3]
        pos = list(range(len(ids)))
        return P.AllocRequest(
            rid=rid, encoder_id="scripted", n_tokens=n_vis, hidden=self.hidden, dtype="float32",
            input_ids=P.int32s(ids), positions=P.int32s([pos, pos, pos]),
            image_grid_thw=[[1, 2, 2 * n_vis]],
        )  # fmt: skip

    def write(self, grant: P.AllocGrant, seed: int = 0) -> int:
        """Write random rows into the granted blocks with Mooncake; returns their checksum."""
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(grant.n_tokens, self.hidden, generator=g)
        d = torch.randn(grant.n_tokens, 3 * self.hidden, generator=g)
        dest = Destination(grant.session, grant.block_tokens, tuple(grant.embed_addrs),
                           tuple(grant.deepstack_addrs))  # fmt: skip
        key = f"{grant.rid}/{grant.generation}"
        self.sender.submit(key, dest, e, d)
        assert self.sender.wait(key) is TransferState.DONE
        self.sender.release(key)
        return rows_checksum(e, d, grant.block_tokens)

    def done(self, grant: P.AllocGrant, checksum: int, **override) -> P.TransferDone:
        fields = {"rid": grant.rid, "generation": grant.generation, "n_tokens": grant.n_tokens,
                  "checksum": checksum, **override}  # fmt: skip
        return P.TransferDone(**fields)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sender.close()
        self.sock.close(linger=0)
