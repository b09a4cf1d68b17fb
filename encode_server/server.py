"""The encode server's worker loop: jobs in, ViT batches, writes, done/failed reports out.

Two threads. The front thread (``front.Front``) owns the socket: it answers heartbeats itself,
so a worker busy for seconds is never taken for dead, and passes jobs and aborts on. The worker
(``step``, on the thread that calls ``serve_forever``) handles what the front passed on,
preprocesses some queued jobs, runs one ViT forward over a batch, starts the writes whose rows
are ready, and polls the writes and reports them. Each job arrives with its blocks already
lent (``EncodeJob``), so a write starts as soon as the ViT is done.
"""

from __future__ import annotations

import logging
import secrets
import struct
import threading
import time

import zmq

import protocol as P
from encode_server.cache import RowCache
from encode_server.config import EncodeConfig
from encode_server.front import SILENT, Front
from encode_server.jobs import Job, Stage
from encode_server.scheduler import JobScheduler
from encode_server.staging import StagingArena
from encode_server.transfers import Transfers
from encode_server.vision import VisionEncoder
from transfer import TransferSender

log = logging.getLogger("epd.encode")

_BUSY = (Stage.QUEUED, Stage.AWAIT_VISION, Stage.AWAIT_READY)


class EncodeServer:
    def __init__(self, config: EncodeConfig, encoder: VisionEncoder, sender: TransferSender):
        self.config, self.encoder, self.sender = config, encoder, sender
        self.incarnation = secrets.randbits(63)  # new per process: peers tell restarts apart
        self.ctx: zmq.Context = zmq.Context.instance()
        self.front = Front(config, self.ctx, sender.name, self.incarnation)
        self.pair = self.front.worker_pair
        self.poller = zmq.Poller()  # the front's wake-ups, and the sender's completion fd
        self.poller.register(self.pair, zmq.POLLIN)
        if sender.completion_fd is not None:
            self.poller.register(sender.completion_fd, zmq.POLLIN)
        self.jobs: dict[str, Job] = {}
        self.arena = StagingArena(config.staging_tokens or 2 * config.max_batch_tokens,
                                  encoder.hidden, encoder.dtype, encoder.device, sender)  # fmt: skip
        on = config.image_cache and config.image_cache_mb > 0
        self.cache = RowCache(config.image_cache_mb << 20) if on else None
        self.scheduler = JobScheduler(encoder, config.dtype, self.arena, config.max_batch_images,
                                      config.max_batch_tokens, self._fail, self.cache)  # fmt: skip
        self.transfers = Transfers(sender, config.transfer_timeout_s, self._report, self._finish)
        self.stats = {"jobs": 0, "rejected_messages": 0}
        self.front.start()

    # --- loop -------------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event) -> None:
        cache = f"{self.cache.max_bytes >> 20} MiB" if self.cache is not None else "off"
        log.info("encode server %s listening on %s (incarnation %x, image cache %s)",
                 self.config.name, self.config.bind_address, self.incarnation, cache)  # fmt: skip
        while not stop.is_set():
            self.step()

    def step(self) -> None:
        self.receive(timeout_ms=self._idle_ms())
        self.transfers.poll(self._jobs())
        self.scheduler.preprocess_some(self._jobs())
        self.receive(timeout_ms=0)  # aborts that came in meanwhile
        self.transfers.poll(self._jobs())  # report finished writes before the next ViT forward
        self.scheduler.encode_batch(self._jobs())
        self.transfers.start_ready(self._jobs())
        self.transfers.poll(self._jobs())

    def _jobs(self) -> list[Job]:
        return list(self.jobs.values())

    def _idle_ms(self) -> int:
        """How long ``receive`` may block: not at all while there is CPU work (or rows waiting
        for their kernels); 50 ms when idle or when the sender's completion fd wakes us as a
        write ends. A sender without one is polled: at once while a write is under 2 ms old,
        then every 1 ms."""
        stages = [j.stage for j in self.jobs.values()]
        stalled = self.scheduler.stalled and Stage.QUEUED not in stages  # waits for the arena
        if any(s in _BUSY for s in stages) and not stalled:
            return 0
        writes = [time.perf_counter() - j.marks.get("transfer_start", 0.0)
                  for j in self.jobs.values() if j.stage is Stage.TRANSFERRING]  # fmt: skip
        if Stage.DRAINING in stages or stalled:
            return 1 if not writes or min(writes) >= 2e-3 else 0
        if self.sender.completion_fd is not None or not writes:
            return 50
        return 0 if min(writes) < 2e-3 else 1

    def close(self) -> None:
        for job in self._jobs():
            self._finish(job)
        self.front.stop()

    # --- receive ----------------------------------------------------------------------------

    def receive(self, timeout_ms: int) -> None:
        """Handle every frame the front passed on; block up to ``timeout_ms`` for the first one
        (or for a write to end)."""
        ready = dict(self.poller.poll(timeout_ms))
        if self.sender.completion_fd in ready:
            self.sender.drain_completions()
        if self.pair in ready:
            while True:
                try:
                    frames = self.pair.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_frames(frames)
        self._publish_load()
        self.stats["rejected_messages"] = self.front.rejected

    def _publish_load(self) -> None:
        """What the front thread reports in heartbeats: jobs in hand (not draining). Kept
        current as jobs come and go, so a heartbeat never counts a job already reported done."""
        self.front.load = sum(1 for j in self.jobs.values() if j.stage is not Stage.DRAINING)

    def _on_frames(self, frames: list) -> None:
        kind, peer = frames[0].bytes, frames[1].bytes
        if kind == SILENT:
            self.drop_peer(peer)
            return
        (read_at,) = struct.unpack("d", frames[2].bytes)
        try:
            msg = P.decode(frames[3].buffer)
        except P.ProtocolError as exc:
            self.front.reject(peer, str(exc))
            return
        if isinstance(msg, P.EncodeJob):
            self.on_job(peer, msg, read_at)
        elif isinstance(msg, P.Abort):
            self.on_abort(peer, msg)
        else:
            self.front.reject(peer, f"{type(msg).__name__} is not for an encode server")

    def on_job(self, peer: bytes, msg: P.EncodeJob, read_at: float = 0.0) -> None:
        """Queue the job; preprocessing happens in the scheduler. ``read_at``: when the front
        thread read it off the socket (the encoder's queueing starts there)."""
        now = time.perf_counter()
        self.stats["jobs"] += 1
        job = Job(peer=peer, msg=msg, received_at=read_at or now)
        job.marks["received"] = read_at or now
        if job.key in self.jobs:
            log.warning("duplicate job %s/%d from %s: ignored", msg.rid, msg.image, peer.hex()[:12])
            return
        problem = self.scheduler.check(job)
        queued = sum(1 for j in self.jobs.values() if j.stage is Stage.QUEUED)
        if problem:
            self._report(job, _failed(msg, "job", problem))
        elif queued >= self.config.max_queue:
            self._report(job, _failed(msg, "overloaded", f"encoder queue full ({queued} jobs)"))
        else:
            self.jobs[job.key] = job

    def on_abort(self, peer: bytes, msg: P.Abort) -> None:
        """Drop the matching jobs; each is answered once its write (if any) has stopped."""
        matched = [j for j in self._jobs() if j.peer == peer and j.rid == msg.rid
                   and msg.image in (-1, j.index)]  # fmt: skip
        reason = msg.reason or "aborted by the language server"
        for job in matched:
            if job.stage is Stage.TRANSFERRING:
                self.transfers.drain(job, "aborted", reason)
            elif job.stage is not Stage.DRAINING:
                self._report(job, _failed(job.msg, "aborted", reason))
                self._finish(job)
        if not matched:  # nothing of ours is writing there
            self._send(peer, P.EncodeFailed(rid=msg.rid, image=msg.image, stage="aborted",
                                            reason=reason[:4000]))  # fmt: skip

    def drop_peer(self, peer: bytes) -> None:
        """A language server went silent: drop its jobs (running writes end on their own)."""
        dropped = [j for j in self._jobs() if j.peer == peer]
        for job in dropped:
            if job.stage is Stage.TRANSFERRING:  # its sources stay until the write ends
                self.transfers.drain(job, "aborted", "language server silent")
            elif job.stage is not Stage.DRAINING:
                self._finish(job)
        log.warning("language server %s silent for %.0f s: dropped its %d jobs",
                    peer.hex()[:12], self.config.peer_timeout_s, len(dropped))  # fmt: skip

    # --- helpers ----------------------------------------------------------------------------

    def _fail(self, job: Job, stage: str, reason: str) -> None:
        """A job failed before its write started: report it; its blocks were never touched."""
        self.transfers.fail(job, stage, reason, writing=False)

    def _finish(self, job: Job) -> None:
        """Forget ``job`` and free what it holds (transfer state, source rows, staging span).
        Called only once no write of it is running (DONE, stopped, or never started)."""
        self.sender.release(job.key)
        job.drop_tensors()
        if job.staging is not None:
            self.arena.give_back(job.staging)
            job.staging = None
        self.jobs.pop(job.key, None)
        self._publish_load()

    def _report(self, job: Job, msg: P.Message) -> None:
        self._send(job.peer, msg)

    def _send(self, peer: bytes, msg: P.Message) -> None:
        """Through the front thread, which owns the socket."""
        self.pair.send_multipart([peer, P.encode(msg)])


def _failed(msg: P.EncodeJob, stage: str, reason: str) -> P.EncodeFailed:
    return P.EncodeFailed(rid=msg.rid, image=msg.image, generation=msg.generation,
                          stage=stage, reason=reason[:4000])  # type: ignore[arg-type]  # fmt: skip
