"""Timeouts, late writes and stale messages, driven by a scripted encoder over real sockets and
Mooncake. The rule under test (transfer/base.py): blocks come back only when their writer is
done with them, never on a timer while it may still write."""

from __future__ import annotations

import time

import pytest

import protocol as P
from tests.faults.conftest import image_body

pytestmark = pytest.mark.slow
# a 64x64 image is 4 visual tokens: two blocks of 2
SMALL = ["--block-tokens", "2", "--dead-writer-wait", "0.5"]


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_silent_encoder_gives_504_and_blocks_stay_lent_until_it_stops(
    scripted, language_for, make_image
):
    lang = language_for([scripted.address], "--request-timeout", "1", *SMALL, "--num-blocks", "8")
    lang.wait_up()
    reply = lang.chat_async(image_body(make_image))
    job = scripted.wait_for(P.EncodeJob)
    assert len(job.blocks) == 2 and job.n_tokens == 4 and list(job.grid) == [1, 4, 4]
    status, body = reply.result(10)  # the encoder never says done
    assert status == 504 and "no answer from the encoders" in body["error"]["message"]
    abort = scripted.wait_for(P.Abort, job.rid)
    assert abort.image == job.image
    # No timer frees them: the encoder is alive and may still be writing.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        pool = lang.health()["pool"]
        assert pool["quarantined_blocks"] == 2 and pool["available_blocks"] == 6
        time.sleep(0.1)
    # A failure report that says the write may still run keeps them lent, too.
    scripted.send(scripted.failed(job, "transfer", write_stopped=False))
    time.sleep(0.3)
    assert lang.health()["pool"]["available_blocks"] == 6
    scripted.send(scripted.failed(job, "aborted"))  # the write has stopped
    assert _until(lambda: lang.health()["pool"]["available_blocks"] == 8)
    assert lang.health()["pool"]["pending_requests"] == 0


def test_late_write_after_abort_lands_in_nobodys_rows(scripted, language_for, make_image):
    lang = language_for([scripted.address], "--request-timeout", "1", *SMALL, "--num-blocks", "4")
    lang.wait_up()
    # Request A gets two blocks, then times out before its encoder writes anything.
    a = lang.chat_async(image_body(make_image, seed=1))
    job_a = scripted.wait_for(P.EncodeJob)
    assert a.result(10)[0] == 504
    # Request B gets the other two: A's are still lent to A's writer.
    b = lang.chat_async(image_body(make_image, seed=2, max_tokens=3))
    job_b = scripted.wait_for(P.EncodeJob)
    assert not set(job_b.blocks) & set(job_a.blocks)
    assert job_b.generation != job_a.generation
    checksum_b = scripted.write(job_b, seed=2)
    # A's write lands late, after B's rows are in: it touches only A's blocks.
    checksum_a = scripted.write(job_a, seed=1)
    dropped = lang.health()["requests"]["dropped_messages"]
    # A done for B carrying A's generation (and A's checksum) is dropped: B waits.
    scripted.send(scripted.done(job_b, checksum_a, generation=job_a.generation))
    assert _until(lambda: lang.health()["requests"]["dropped_messages"] == dropped + 1)
    assert not b.done(), "B must not run on A's rows"
    scripted.send(scripted.done(job_b, checksum_b))
    status, body = b.result(10)
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    # A's late done says its write ended: A's blocks come back.
    scripted.send(scripted.done(job_a, checksum_a))
    assert _until(lambda: lang.health()["pool"]["available_blocks"] == 4)


def test_checksum_mismatch_and_forged_sizes_fail_cleanly(scripted, language_for, make_image):
    lang = language_for([scripted.address], *SMALL)
    lang.wait_up()
    first = lang.chat_async(image_body(make_image))
    job = scripted.wait_for(P.EncodeJob)
    scripted.write(job, seed=3)
    scripted.send(scripted.done(job, checksum=12345))
    status, body = first.result(10)
    assert status == 502 and "checksum" in body["error"]["message"]
    second = lang.chat_async(image_body(make_image))
    job = scripted.wait_for(P.EncodeJob)
    scripted.send(scripted.done(job, checksum=scripted.write(job), n_tokens=3))
    status, body = second.result(10)
    assert status == 502 and "3 rows" in body["error"]["message"]
    third = lang.chat_async(image_body(make_image))
    job = scripted.wait_for(P.EncodeJob)
    scripted.send(scripted.failed(job, "preprocess", reason="grid [1, 2, 2] differs"))
    status, body = third.result(10)
    assert status == 400 and "grid" in body["error"]["message"]
    pool = lang.health()["pool"]
    assert pool["available_blocks"] == pool["total_blocks"]


def test_a_dead_writers_blocks_come_back_after_the_transport_timeout(
    scripted, language_for, make_image
):
    lang = language_for([scripted.address], *SMALL, "--heartbeat", "0.2",
                        "--encoder-dead-after", "0.6")  # fmt: skip
    lang.wait_up()
    reply = lang.chat_async(image_body(make_image))
    scripted.wait_for(P.EncodeJob)
    scripted.close()  # the encoder dies with the job
    status, body = reply.result(10)
    assert status == 503 and "went silent" in body["error"]["message"]
    assert _until(
        lambda: lang.health()["pool"]["available_blocks"] == lang.health()["pool"]["total_blocks"]
    )
