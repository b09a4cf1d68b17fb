"""Choosing an encoder: our own jobs now, plus other language servers' jobs from heartbeats."""

from __future__ import annotations

import protocol as P
from language_server.encoders.links import EncoderPool, LinkState


def _pool() -> EncoderPool:
    pool = EncoderPool(("tcp://127.0.0.1:9", "tcp://127.0.0.1:10"), "mooncake", lambda *a: None)
    for link in pool.links:
        link.state, link.encoder_id, link.incarnation = LinkState.UP, "e", 1
    return pool


def _beat(pool: EncoderPool, link, load: int) -> None:
    pool._alive(link, P.Heartbeat(encoder_id="e", inflight=load, incarnation=1))


def test_a_heartbeat_counting_our_finished_jobs_does_not_skew_the_choice():
    pool = _pool()
    a, b = pool.links
    try:
        b.inflight = {("r", i, 1) for i in range(3)}
        _beat(pool, b, 3)  # b holds 3 jobs, all ours
        b.inflight.clear()  # ... which finished since
        assert b.others == 0
        picks = []
        for i in range(4):  # one request's four images spread over both encoders
            link = pool.pick()
            picks.append(link)
            link.inflight.add(("s", i, 1))
        assert picks.count(a) == 2 and picks.count(b) == 2
    finally:
        for link in pool.links:
            link.sock.close(linger=0)


def test_other_language_servers_jobs_count_against_an_encoder():
    pool = _pool()
    a, b = pool.links
    try:
        b.inflight = {("r", 0, 1)}
        _beat(pool, b, 4)  # 1 of ours + 3 from elsewhere
        assert b.others == 3
        a.inflight = {("s", i, 1) for i in range(3)}
        assert pool.pick() is a  # 3 < 1 + 3
    finally:
        for link in pool.links:
            link.sock.close(linger=0)
