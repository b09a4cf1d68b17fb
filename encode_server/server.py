"""The encode server: processor + ViT behind a ZeroMQ ROUTER, writing into language-side blocks.

Main loop, one thread (``step``): receive and handle every waiting message; run one ViT forward
over the requests waiting for it (bounded by images and tokens); start the transfers whose
grants are in; poll transfers and report them; expire what waited too long; answer heartbeats.
The allocation round trip overlaps the ViT: AllocRequest goes out right after preprocessing,
and grants that arrive during the forward wait in the socket until it ends.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

import protocol as P
from encode_server.config import EncodeConfig
from encode_server.jobs import Job, Stage
from encode_server.vision import VisionEncoder
from protocol.chat import to_messages
from protocol.keys import server_keys
from transfer import Destination, TransferError, TransferSender, TransferState, rows_checksum

log = logging.getLogger("epd.encode")


class EncodeServer:
    def __init__(self, config: EncodeConfig, encoder: VisionEncoder, sender: TransferSender):
        self.config, self.encoder, self.sender = config, encoder, sender
        self.dtype = config.dtype
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.auth = _secure(self.ctx, self.sock, config)
        self.sock.bind(config.bind_address)
        self.poller = zmq.Poller()  # the socket, and the sender's completion fd when it has one
        self.poller.register(self.sock, zmq.POLLIN)
        if sender.completion_fd is not None:
            self.poller.register(sender.completion_fd, zmq.POLLIN)
        self.jobs: dict[str, Job] = {}
        self.hello_sent: set[bytes] = set()
        self.peers: dict[bytes, float] = {}  # language servers: identity -> last heard from
        self.stats = {"requests": 0, "done": 0, "failed": 0, "rejected_messages": 0}

    # --- loop -------------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event) -> None:
        log.info("encode server %s listening on %s", self.config.name, self.config.bind_address)
        while not stop.is_set():
            self.step()

    def step(self) -> None:
        self.receive(timeout_ms=self._idle_ms())
        self.poll_transfers()
        self.preprocess_some()
        self.receive(timeout_ms=0)  # grants and heartbeats that came in meanwhile
        self.poll_transfers()  # report finished writes before the next (blocking) ViT forward
        self.encode_batch()
        self.poll_transfers()
        self.expire()

    def _idle_ms(self) -> int:
        """How long ``receive`` may block: not at all while there is CPU work; 50 ms when idle
        or when the sender's completion fd wakes us as a write ends. A sender without one is
        polled: at once while a write is under 2 ms old, then every 1 ms."""
        stages = [j.stage for j in self.jobs.values()]
        if Stage.QUEUED in stages or Stage.AWAIT_VISION in stages:
            return 0
        if self.sender.completion_fd is not None:
            return 50
        now = time.perf_counter()
        writes = [now - j.marks.get("transfer_start", now) for j in self.jobs.values()
                  if j.stage is Stage.TRANSFERRING]  # fmt: skip
        if writes:
            return 0 if min(writes) < 2e-3 else 1
        return 50

    def close(self) -> None:
        for job in list(self.jobs.values()):
            self._finish(job)
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()

    # --- receive ----------------------------------------------------------------------------

    def receive(self, timeout_ms: int) -> None:
        """Handle every waiting message; block up to ``timeout_ms`` for the first one (or for
        a write to end)."""
        ready = dict(self.poller.poll(timeout_ms))
        if self.sender.completion_fd in ready:
            self.sender.drain_completions()
        if self.sock not in ready:
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._reject(frames[0] if frames else b"", f"{len(frames)} frames, expected 2")
                continue
            peer, data = frames
            self.peers[peer] = time.monotonic()
            try:
                msg = P.decode(data)
            except P.ProtocolError as exc:
                self._reject(peer, str(exc))
                continue
            self.handle(peer, msg)

    def handle(self, peer: bytes, msg: P.Message) -> None:
        if isinstance(msg, P.EncodeRequest):
            self.on_encode(peer, msg)
        elif isinstance(msg, P.AllocGrant):
            self.on_grant(peer, msg)
        elif isinstance(msg, (P.AllocDenied, P.Abort)):
            self.on_cancel(peer, msg.rid, getattr(msg, "reason", "") or type(msg).__name__)
        elif isinstance(msg, P.Heartbeat):
            self.on_heartbeat(peer)
        else:
            self._reject(peer, f"{type(msg).__name__} is not for an encode server")

    def on_encode(self, peer: bytes, req: P.EncodeRequest) -> None:
        """Queue the request; preprocessing happens in ``preprocess_some``."""
        now = time.perf_counter()
        self.stats["requests"] += 1
        key = f"{peer.hex()}/{req.rid}"
        if key in self.jobs:
            self._reject(peer, f"duplicate request id {req.rid}")
            return
        queued = sum(1 for j in self.jobs.values() if j.stage is Stage.QUEUED)
        if queued >= self.config.max_queue:
            reason = f"encoder queue full ({queued} requests)"
            self._send(peer, P.EncodeFailed(rid=req.rid, stage="overloaded", reason=reason))
            self.stats["failed"] += 1
            return
        job = Job(peer=peer, rid=req.rid, request=req, received_at=now)
        job.marks["received"] = now
        job.deadline = now + self.config.grant_timeout_s
        self.jobs[job.key] = job

    def preprocess_some(self, budget_s: float = 0.2) -> None:
        """Preprocess queued requests (oldest first) for at most ``budget_s``, so that the loop
        keeps answering heartbeats and grants under load; send each one's AllocRequest."""
        start = time.perf_counter()
        queued = [j for j in self.jobs.values() if j.stage is Stage.QUEUED]
        for job in queued[: self.config.max_batch_images]:
            if time.perf_counter() - start > budget_s:
                return
            self._preprocess(job)

    def _preprocess(self, job: Job) -> None:
        assert job.request is not None
        job.mark("preprocess_start")
        try:
            prompt = self.encoder.preprocess(
                to_messages(job.request.turns, list(job.request.images))
            )
        except ValueError as exc:
            self._fail(job, "preprocess", str(exc))
            return
        job.mark("preprocessed")
        job.prompt, job.request, job.stage = prompt, None, Stage.AWAIT_VISION
        self._send(
            job.peer,
            P.AllocRequest(
                rid=job.rid,
                encoder_id=self.config.name,
                n_tokens=prompt.n_vis,
                hidden=self.encoder.hidden,
                dtype=self.dtype,  # type: ignore[arg-type]
                input_ids=P.int32s(prompt.input_ids.numpy()),
                positions=P.int32s(prompt.positions.numpy()),
                image_grid_thw=prompt.image_grid_thw.tolist(),
            ),
        )

    def on_grant(self, peer: bytes, grant: P.AllocGrant) -> None:
        job = self.jobs.get(f"{peer.hex()}/{grant.rid}")
        if job is None or job.dest is not None or job.prompt is None:
            self._reject(peer, f"grant for unknown or already granted request {grant.rid}")
            return
        problem = self._check_grant(job, grant)
        if problem:
            self._fail(job, "alloc", f"bad grant: {problem}")
            return
        job.dest = Destination(
            grant.session,
            grant.block_tokens,
            tuple(grant.embed_addrs),
            tuple(grant.deepstack_addrs),
        )
        job.generation = grant.generation
        job.mark("granted")
        if job.stage is Stage.AWAIT_GRANT:
            self._start_transfer(job)

    def _check_grant(self, job: Job, grant: P.AllocGrant) -> str:
        assert job.prompt is not None
        if grant.n_tokens != job.prompt.n_vis:
            return f"{grant.n_tokens} tokens granted, {job.prompt.n_vis} needed"
        if grant.hidden != self.encoder.hidden or grant.dtype != self.dtype:
            return (
                f"pool is {grant.dtype} x {grant.hidden}, ours {self.dtype} x {self.encoder.hidden}"
            )
        return ""

    def on_cancel(self, peer: bytes, rid: str, reason: str) -> None:
        job = self.jobs.get(f"{peer.hex()}/{rid}")
        if job is not None:
            log.info("request %s cancelled by the language server: %s", rid, reason)
            self._finish(job)

    def on_heartbeat(self, peer: bytes) -> None:
        if peer not in self.hello_sent:
            self.hello_sent.add(peer)
            hello = P.EncoderHello(
                encoder_id=self.config.name, transport=self.sender.name, session=self.config.name
            )
            self._send(peer, hello)
        beat = P.Heartbeat(
            encoder_id=self.config.name, inflight=len(self.jobs), sent_at=time.time()
        )
        self._send(peer, beat)

    # --- vision -----------------------------------------------------------------------------

    def encode_batch(self) -> None:
        batch = self._next_batch()
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            encoded = self.encoder.run_vision([j.prompt for j in batch if j.prompt is not None])
        except Exception as exc:  # noqa: BLE001 - a ViT failure fails its batch, not the server
            log.exception("vision forward failed for %d requests", len(batch))
            for job in batch:
                self._fail(job, "vision", f"{type(exc).__name__}: {exc}")
            return
        t1 = time.perf_counter()
        for job, out in zip(batch, encoded, strict=True):
            job.marks.update(vision_start=t0, vision_end=t1)
            job.embeds, job.deepstack = out.embeds, out.deepstack
            job.stage = Stage.AWAIT_GRANT
            if job.dest is not None:
                self._start_transfer(job)

    def _next_batch(self) -> list[Job]:
        batch: list[Job] = []
        images = tokens = 0
        for job in self.jobs.values():
            if job.stage is not Stage.AWAIT_VISION or job.prompt is None:
                continue
            images += job.prompt.n_images
            tokens += job.prompt.n_vis
            over = images > self.config.max_batch_images or tokens > self.config.max_batch_tokens
            if batch and over:
                break
            batch.append(job)
        return batch

    # --- transfer ---------------------------------------------------------------------------

    def _start_transfer(self, job: Job) -> None:
        assert job.dest is not None and job.embeds is not None and job.deepstack is not None
        job.mark("transfer_start")
        try:
            self.sender.submit(job.key, job.dest, job.embeds, job.deepstack)
        except TransferError as exc:
            self._fail(job, "transfer", str(exc))
            return
        job.stage = Stage.TRANSFERRING
        job.deadline = time.perf_counter() + self.config.transfer_timeout_s
        job.checksum = rows_checksum(job.embeds, job.deepstack, job.dest.block_tokens)

    def poll_transfers(self) -> None:
        for job in [j for j in self.jobs.values() if j.stage is Stage.TRANSFERRING]:
            state = self.sender.poll(job.key)
            if state is TransferState.DONE:
                job.mark("transfer_end")
                self._send(job.peer, self._done_message(job))
                self.stats["done"] += 1
                self._finish(job)
            elif state is TransferState.FAILED:
                self._fail(job, "transfer", "the transport reported a failed write")

    def _done_message(self, job: Job) -> P.TransferDone:
        assert job.prompt is not None
        timings = P.EncodeTimings(
            queue_s=job.span("received", "preprocess_start"),
            preprocess_s=job.span("preprocess_start", "preprocessed"),
            vision_s=job.span("vision_start", "vision_end"),
            grant_wait_s=max(0.0, job.span("vision_end", "granted")),
            transfer_s=job.span("transfer_start", "transfer_end"),
        )
        return P.TransferDone(
            rid=job.rid,
            generation=job.generation,
            n_tokens=job.prompt.n_vis,
            checksum=job.checksum,
            timings=timings,
        )

    def expire(self) -> None:
        """Fail jobs past their deadline; drop everything of language servers gone silent."""
        now = time.perf_counter()
        for job in [j for j in self.jobs.values() if j.deadline and now > j.deadline]:
            stage = {Stage.TRANSFERRING: "transfer", Stage.QUEUED: "overloaded"}.get(
                job.stage, "alloc"
            )
            self._fail(job, stage, f"timed out in {job.stage.value}")  # type: ignore[arg-type]
        silent_since = time.monotonic() - self.config.peer_timeout_s
        for peer in [p for p, seen in self.peers.items() if seen < silent_since]:
            dropped = [j for j in self.jobs.values() if j.peer == peer]
            for job in dropped:
                self._finish(job)
            del self.peers[peer]
            self.hello_sent.discard(peer)
            log.warning("language server %s silent for %.0f s: dropped its %d requests",
                        peer.hex()[:12], self.config.peer_timeout_s, len(dropped))  # fmt: skip

    # --- helpers ----------------------------------------------------------------------------

    def _fail(self, job: Job, stage: str, reason: str) -> None:
        """Report ``job`` failed, after its transfer has stopped touching the peer's blocks."""
        log.warning("request %s failed at %s: %s", job.rid, stage, reason)
        self.stats["failed"] += 1
        self._finish(job)
        msg = P.EncodeFailed(rid=job.rid, generation=job.generation, stage=stage, reason=reason)  # type: ignore[arg-type]
        self._send(job.peer, msg)

    def _finish(self, job: Job) -> None:
        """Forget ``job`` and free what it holds (transfer state, source tensors)."""
        self.sender.release(job.key)
        job.drop_tensors()
        self.jobs.pop(job.key, None)

    def _send(self, peer: bytes, msg: P.Message) -> None:
        try:
            self.sock.send_multipart([peer, P.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue is full
            log.warning("cannot send %s to a language server: %s", type(msg).__name__, exc)

    def _reject(self, peer: bytes, reason: str) -> None:
        self.stats["rejected_messages"] += 1
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
