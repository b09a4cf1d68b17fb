"""Timeouts and stale messages, driven by a scripted encoder over real sockets and Mooncake."""

from __future__ import annotations

import time

import pytest

import protocol as P

pytestmark = pytest.mark.slow


def _rid_of(enc) -> str:
    return enc.wait_for(P.EncodeRequest).rid


def test_silent_encoder_gives_504_aborts_and_frees_blocks(scripted, language_for, make_image):
    from tests.faults.conftest import image_body

    lang = language_for([scripted.address], "--request-timeout", "1", "--quarantine", "0.5",
                        "--block-tokens", "4", "--num-blocks", "8")  # fmt: skip
    lang.wait_up()
    reply = lang.chat_async(image_body(make_image))
    rid = _rid_of(scripted)
    scripted.send(scripted.alloc_request(rid, n_vis=8))
    grant = scripted.wait_for(P.AllocGrant, rid)
    assert len(grant.blocks) == 2
    status, body = reply.result(10)  # the encoder never says done
    assert status == 504 and "no answer from the encoders" in body["error"]["message"]
    assert scripted.wait_for(P.Abort, rid).rid == rid
    pool = lang.health()["pool"]
    assert pool["quarantined_blocks"] == 2  # the encoder might still be writing
    time.sleep(0.8)
    pool = lang.health()["pool"]
    assert pool["free_blocks"] == pool["total_blocks"] and pool["pending_requests"] == 0


def test_stale_done_never_counts_for_a_request_that_reuses_the_blocks(
    scripted, language_for, make_image
):
    from tests.faults.conftest import image_body

    lang = language_for([scripted.address], "--request-timeout", "1", "--quarantine", "0",
                        "--block-tokens", "4", "--num-blocks", "2")  # fmt: skip
    lang.wait_up()
    # Request A gets both blocks, then times out before its encoder reports.
    a = lang.chat_async(image_body(make_image, seed=1))
    rid_a = _rid_of(scripted)
    scripted.send(scripted.alloc_request(rid_a))
    grant_a = scripted.wait_for(P.AllocGrant, rid_a)
    checksum_a = scripted.write(grant_a, seed=1)
    assert a.result(10)[0] == 504
    # Request B is granted the very same blocks (no quarantine here).
    b = lang.chat_async(image_body(make_image, seed=2, max_tokens=3))
    rid_b = _rid_of(scripted)
    scripted.send(scripted.alloc_request(rid_b))
    grant_b = scripted.wait_for(P.AllocGrant, rid_b)
    assert sorted(grant_b.blocks) == sorted(grant_a.blocks)
    assert grant_b.generation != grant_a.generation
    dropped = lang.health()["requests"]["dropped_messages"]
    # A's late done, and a done for B carrying A's generation and A's data: both ignored.
    scripted.send(scripted.done(grant_a, checksum_a))
    scripted.send(scripted.done(grant_b, checksum_a, generation=grant_a.generation))
    time.sleep(0.3)
    assert not b.done(), "B must not run on A's rows"
    assert lang.health()["requests"]["dropped_messages"] == dropped + 2
    # B's own rows and done: served.
    scripted.send(scripted.done(grant_b, scripted.write(grant_b, seed=2)))
    status, body = b.result(10)
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    pool = lang.health()["pool"]
    assert pool["free_blocks"] == pool["total_blocks"]


def test_checksum_mismatch_and_forged_sizes_fail_cleanly(scripted, language_for, make_image):
    from tests.faults.conftest import image_body

    lang = language_for([scripted.address], "--block-tokens", "4", "--quarantine", "0")
    lang.wait_up()
    first = lang.chat_async(image_body(make_image))
    rid = _rid_of(scripted)
    scripted.send(scripted.alloc_request(rid))
    grant = scripted.wait_for(P.AllocGrant, rid)
    scripted.write(grant, seed=3)
    scripted.send(scripted.done(grant, checksum=12345))
    status, body = first.result(10)
    assert status == 502 and "checksum" in body["error"]["message"]
    # An AllocRequest whose grid disagrees with its image pads is refused.
    second = lang.chat_async(image_body(make_image))
    rid = _rid_of(scripted)
    bad = scripted.alloc_request(rid)
    forged = P.AllocRequest(**{f: getattr(bad, f) for f in bad.__struct_fields__ if f != "image_grid_thw"},
                            image_grid_thw=[[1, 4, 4]])  # fmt: skip
    scripted.send(forged)
    assert scripted.wait_for(P.AllocDenied, rid).code == "bad_request"
    status, body = second.result(10)
    assert status == 502 and "grids hold" in body["error"]["message"]
    pool = lang.health()["pool"]
    assert pool["free_blocks"] == pool["total_blocks"]
