"""A scripted encode server for fault tests: a real ZeroMQ ROUTER and a real Mooncake sender,
driven step by step by the test instead of by a ViT. It lets a test misbehave on purpose:
stay silent, write late, send stale or forged messages, or garbage."""

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

    def write(self, job: P.EncodeJob, seed: int = 0) -> int:
        """Write random rows into the job's blocks with Mooncake; returns their checksum."""
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(job.n_tokens, self.hidden, generator=g)
        d = torch.randn(job.n_tokens, 3 * self.hidden, generator=g)
        dest = Destination(job.session, job.block_tokens, tuple(job.embed_addrs),
                           tuple(job.deepstack_addrs))  # fmt: skip
        key = f"{job.rid}/{job.image}/{job.generation}/{seed}"
        self.sender.submit(key, dest, e, d)
        assert self.sender.wait(key) is TransferState.DONE
        self.sender.release(key)
        return rows_checksum(e, d, job.block_tokens)

    def done(self, job: P.EncodeJob, checksum: int, **override) -> P.TransferDone:
        fields = {"rid": job.rid, "image": job.image, "generation": job.generation,
                  "n_tokens": job.n_tokens, "checksum": checksum, **override}  # fmt: skip
        return P.TransferDone(**fields)

    def failed(self, job: P.EncodeJob, stage: str = "aborted", **override) -> P.EncodeFailed:
        fields = {"rid": job.rid, "image": job.image, "generation": job.generation,
                  "stage": stage, "reason": "scripted", **override}  # fmt: skip
        return P.EncodeFailed(**fields)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sender.close()
        self.sock.close(linger=0)
