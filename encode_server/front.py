"""The encode server's front thread: the only owner of the ROUTER socket.

It answers liveness itself (hello and heartbeat, with the incarnation and the worker's load), so
a worker busy for seconds with a huge image or a large ViT batch is never taken for dead. Every
other frame goes to the worker as it came, without a copy, over an inproc pair
(``[kind, peer, read_at, data]``, see ``Worker frames``); the worker decodes and validates it
(untrusted) and sends its reports back the same way, which this thread forwards to their
language servers. It also tells the worker which language servers went silent. It never
touches pixels, tensors or the transport.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

import protocol as P
from encode_server.config import EncodeConfig
from protocol.keys import server_keys

log = logging.getLogger("epd.encode.front")

# Worker frames, front -> worker: [b"msg", peer, read_at (float64), data] | [b"silent", peer]
MSG, SILENT = b"msg", b"silent"
SMALL = 4096  # frames this short are decoded here (a heartbeat is about 100 bytes)


class Front:
    def __init__(self, config: EncodeConfig, ctx: zmq.Context, transport: str,
                 incarnation: int) -> None:  # fmt: skip
        self.config, self.transport, self.incarnation = config, transport, incarnation
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        self.auth = _secure(ctx, self.sock, config)
        self.sock.bind(config.bind_address)
        endpoint = f"inproc://encode-front-{id(self):x}"
        self.pair = ctx.socket(zmq.PAIR)  # to the worker: wake-ups out, reports in
        self.pair.bind(endpoint)
        self.worker_pair = ctx.socket(zmq.PAIR)  # the worker's end (used on its thread only)
        self.worker_pair.connect(endpoint)
        self.load = 0  # the worker's jobs in hand, written by the worker
        self.hello_sent: set[bytes] = set()
        self.peers: dict[bytes, float] = {}  # language servers: identity -> last heard from
        self.rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="encode-front", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in (self.sock, self.pair, self.worker_pair):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()

    # --- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.pair, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
                if self.pair in ready:
                    self._forward_reports()
                if self.sock in ready:
                    self._receive()
                self._find_silent_peers()
            except Exception:  # noqa: BLE001 - liveness must outlive any one bad item
                log.exception("front thread: unexpected error (continuing)")

    def _forward_reports(self) -> None:
        while True:
            try:
                peer, data = self.pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send_raw(peer, data)

    def _receive(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                peer = frames[0].bytes if frames else b""
                self.reject(peer, f"{len(frames)} frames, expected 2")
                continue
            peer, data = frames[0].bytes, frames[1]
            read_at = time.perf_counter()
            self.peers[peer] = time.monotonic()
            if len(data) <= SMALL:
                try:
                    msg = P.decode(data.bytes)
                except P.ProtocolError as exc:
                    self.reject(peer, str(exc))
                    continue
                if isinstance(msg, P.Heartbeat):
                    self._answer_heartbeat(peer)
                    continue
            self.pair.send_multipart([MSG, peer, struct.pack("d", read_at), data], copy=False)

    def _answer_heartbeat(self, peer: bytes) -> None:
        if peer not in self.hello_sent:
            self.hello_sent.add(peer)
            self.send(peer, P.EncoderHello(encoder_id=self.config.name, transport=self.transport,
                                           session=self.config.name,
                                           incarnation=self.incarnation))  # fmt: skip
        self.send(peer, P.Heartbeat(encoder_id=self.config.name, inflight=self.load,
                                    sent_at=time.time(), incarnation=self.incarnation))  # fmt: skip

    def _find_silent_peers(self) -> None:
        silent_since = time.monotonic() - self.config.peer_timeout_s
        for peer in [p for p, seen in self.peers.items() if seen < silent_since]:
            del self.peers[peer]
            self.hello_sent.discard(peer)
            self.pair.send_multipart([SILENT, peer])

    # --- sending (front thread only) --------------------------------------------------------

    def send(self, peer: bytes, msg: P.Message) -> None:
        self._send_raw(peer, P.encode(msg))

    def _send_raw(self, peer: bytes, data: bytes) -> None:
        try:
            self.sock.send_multipart([peer, data], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue is full
            log.warning("cannot send to language server %s: %s", peer.hex()[:12], exc)

    def reject(self, peer: bytes, reason: str) -> None:
        self.rejected += 1  # (also called by the worker, for frames it decoded)
        log.warning("rejected a message from %s: %s", peer.hex()[:12] or "?", reason)


def _secure(ctx: zmq.Context, sock: zmq.Socket, config: EncodeConfig) -> ThreadAuthenticator | None:
    """Make ``sock`` a CURVE server that admits only authorized clients (when keys are set)."""
    keys = server_keys(config.curve_keys, config.curve_clients)
    if keys is None:
        log.warning("control plane is NOT authenticated (no CURVE keys); bound to %s",
                    config.bind_address)  # fmt: skip
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.clients_dir))
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    sock.curve_server = True
    log.info("control plane: CURVE on, clients authorized from %s", keys.clients_dir)
    return auth
