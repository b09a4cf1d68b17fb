"""The encoder's side of the block-lifetime rule (transfer/base.py), on a real Mooncake write over
loopback TCP: a job whose write is still running when it is aborted or times out is reported
stopped only once the transport has really finished with the destination."""

from __future__ import annotations

import time

import pytest
import torch

import protocol as P
from encode_server.jobs import Job, Stage
from encode_server.transfers import Transfers
from transfer import MultimodalDataBuffers, make_receiver, make_sender

HIDDEN, TOKENS, BLOCK = 1024, 8192, 256  # 128 MiB of float32 rows: tens of ms over TCP


@pytest.fixture(scope="module")
def pool():
    receiver = make_receiver("mooncake")
    buffers = MultimodalDataBuffers(TOKENS // BLOCK, BLOCK, HIDDEN, torch.float32, receiver)
    yield buffers
    receiver.close()


@pytest.fixture(scope="module")
def sender():
    s = make_sender("mooncake")
    yield s
    s.close()


class _Event:
    """Stands in for a CUDA event (no GPU here): ``query`` says whether the kernels are done."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def _job(pool: MultimodalDataBuffers, seed: int) -> Job:
    blocks = list(range(pool.num_blocks))
    where = pool.describe(blocks)
    msg = P.EncodeJob(rid=f"r{seed}", image=0, data=b"x", grid=[1, 2, 2 * TOKENS],
                      n_tokens=TOKENS, hidden=HIDDEN, dtype="float32", generation=seed + 1,
                      session=where.session, block_tokens=BLOCK, blocks=blocks,
                      embed_addrs=where.embed_addrs, deepstack_addrs=where.deepstack_addrs)  # fmt: skip
    job = Job(peer=b"lang", msg=msg, received_at=time.perf_counter())
    g = torch.Generator().manual_seed(seed)
    job.embeds = torch.randn(TOKENS, HIDDEN, generator=g)
    job.deepstack = torch.randn(TOKENS, 3 * HIDDEN, generator=g)
    job.stage = Stage.AWAIT_READY
    return job


def _run(transfers: Transfers, job: Job, reports: list, finished: list) -> None:
    deadline = time.monotonic() + 30
    while not finished and time.monotonic() < deadline:
        transfers.poll([job])
    assert finished, "the job never ended"


def test_abort_while_writing_is_reported_only_after_the_write_stopped(pool, sender):
    reports, finished = [], []
    transfers = Transfers(sender, 60.0, lambda j, m: reports.append((m, sender.writing(j.key))),
                          lambda j: finished.append(j))  # fmt: skip
    job = _job(pool, seed=1)
    transfers.start_ready([job])
    assert job.stage is Stage.TRANSFERRING
    assert sender.writing(job.key)
    transfers.drain(job, "aborted", "client went away")
    assert reports == [], "reported stopped while the transport was still writing"
    _run(transfers, job, reports, finished)
    ((msg, writing),) = reports
    assert isinstance(msg, P.EncodeFailed) and msg.stage == "aborted" and msg.write_stopped
    assert not writing and msg.generation == 2
    # the stop report came after the whole write had landed: nothing more can change there
    assert torch.equal(pool.embeds[:TOKENS], job.embeds)
    assert torch.equal(pool.deepstack[:TOKENS], job.deepstack)
    sender.release(job.key)


def test_a_timed_out_write_is_reported_twice_may_still_write_then_stopped(pool, sender):
    reports, finished = [], []
    transfers = Transfers(sender, 1e-4, lambda j, m: reports.append(m), finished.append)
    job = _job(pool, seed=2)
    transfers.start_ready([job])
    transfers.poll([job])  # past its 0.1 ms deadline, the write is still running
    first = reports[0]
    assert isinstance(first, P.EncodeFailed) and first.stage == "transfer"
    assert not first.write_stopped and job.stage is Stage.DRAINING
    _run(transfers, job, reports, finished)
    assert [m.write_stopped for m in reports] == [False, True]
    assert torch.equal(pool.embeds[:TOKENS], job.embeds)


def test_a_write_waits_for_the_kernels_that_produced_its_rows(pool, sender):
    reports, finished = [], []
    transfers = Transfers(sender, 60.0, lambda j, m: reports.append(m), finished.append)
    job = _job(pool, seed=3)
    job.ready = event = _Event()
    transfers.start_ready([job])
    assert job.stage is Stage.AWAIT_READY and not sender.writing(job.key)
    event.done = True
    transfers.start_ready([job])
    assert job.stage is Stage.TRANSFERRING
    _run(transfers, job, reports, finished)
    (done,) = reports
    assert isinstance(done, P.TransferDone) and done.n_tokens == TOKENS
    assert torch.equal(pool.deepstack[:TOKENS], job.deepstack)
