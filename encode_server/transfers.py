"""The encoder's writes: start them once their rows are ready, watch them, report how they end.

A job's blocks are lent to this process until it says the write is over (transfer/base.py,
block lifetime): TransferDone after a DONE write; EncodeFailed(write_stopped=True) when a write
failed and the transport no longer touches the destination. A write that failed or timed out
while the transport may still be performing it is reported at once with write_stopped=False
(so the client gets its error) and again with write_stopped=True once it has really ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import protocol as P
from encode_server.jobs import Job, Stage
from encode_server.scheduler import rows_ready
from transfer import TransferError, TransferSender, TransferState, rows_checksum

log = logging.getLogger("epd.encode.transfers")

Report = Callable[[Job, P.Message], None]  # send a message to the job's language server
Finish = Callable[[Job], None]  # forget the job and free what it holds


class Transfers:
    def __init__(self, sender: TransferSender, timeout_s: float, report: Report,
                 finish: Finish) -> None:  # fmt: skip
        self.sender, self.timeout_s = sender, timeout_s
        self.report, self.finish = report, finish
        self.done = self.failed = 0

    def start_ready(self, jobs: list[Job]) -> None:
        """Submit the write of every job whose rows' kernels have completed."""
        for job in jobs:
            if job.stage is Stage.AWAIT_READY and rows_ready(job):
                self._start(job)

    def _start(self, job: Job) -> None:
        assert job.embeds is not None and job.deepstack is not None
        job.mark("transfer_start")
        dest = job.dest
        try:
            self.sender.submit(job.key, dest, job.embeds, job.deepstack)
        except TransferError as exc:  # nothing started: the blocks were never touched
            self.fail(job, "transfer", str(exc), writing=False)
            return
        job.stage = Stage.TRANSFERRING
        job.deadline = time.perf_counter() + self.timeout_s
        job.checksum = rows_checksum(job.embeds, job.deepstack, dest.block_tokens)

    def poll(self, jobs: list[Job]) -> None:
        """Report finished writes; report stopped writes of failed or aborted jobs."""
        now = time.perf_counter()
        for job in jobs:
            if job.stage is Stage.TRANSFERRING:
                state = self.sender.poll(job.key)
                if state is TransferState.DONE:
                    self._done(job)
                elif state is TransferState.FAILED:
                    self.fail(job, "transfer", "the transport reported a failed write")
                elif now > job.deadline:
                    self.fail(job, "transfer", f"write not done within {self.timeout_s:.0f} s")
            elif job.stage is Stage.DRAINING and not self.sender.writing(job.key):
                log.info("job %s/%d: write stopped; blocks handed back", job.rid, job.index)
                self._stopped(job)

    def _done(self, job: Job) -> None:
        job.mark("transfer_end")
        m = job.msg
        done = P.TransferDone(rid=m.rid, image=m.image, generation=m.generation,
                              n_tokens=m.n_tokens, checksum=job.checksum, timings=job.timings())  # fmt: skip
        self.done += 1
        self.finish(job)  # first: the load the next heartbeat reports no longer counts it
        self.report(job, done)

    def fail(self, job: Job, stage: str, reason: str, writing: bool | None = None) -> None:
        """Report ``job`` failed. While the transport may still write into its blocks the job
        stays (DRAINING) until it stops; ``writing`` None asks the sender."""
        log.warning("job %s/%d failed at %s: %s", job.rid, job.index, stage, reason)
        self.failed += 1
        if writing is None:
            writing = job.stage is Stage.TRANSFERRING and self.sender.writing(job.key)
        m = job.msg
        failed = P.EncodeFailed(rid=m.rid, image=m.image, generation=m.generation, stage=stage,  # type: ignore[arg-type]
                                reason=reason[:4000], write_stopped=not writing)  # fmt: skip
        if writing:
            self.drain(job, stage, reason, announce=False)
        else:
            self.finish(job)
        self.report(job, failed)

    def drain(self, job: Job, stage: str, reason: str, announce: bool = True) -> None:
        """Stop caring about ``job``'s result; report ``stage`` once its write has stopped."""
        job.stage, job.stop_stage, job.stop_reason = Stage.DRAINING, stage, reason
        if announce and not self.sender.writing(job.key):
            self._stopped(job)

    def _stopped(self, job: Job) -> None:
        m = job.msg
        stage: Any = job.stop_stage  # one of EncodeFailed's stages
        stopped = P.EncodeFailed(rid=m.rid, image=m.image, generation=m.generation, stage=stage,
                                 reason=job.stop_reason[:4000], write_stopped=True)  # fmt: skip
        self.finish(job)
        self.report(job, stopped)
