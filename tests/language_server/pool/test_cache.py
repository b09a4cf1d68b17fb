"""Resident images (issue 18): the cache's bookkeeping, and the receiver serving a repeated image
from resident rows: no job, no write, no new blocks; eviction only of rows nobody reads."""

from __future__ import annotations

import hashlib

import pytest
import torch

import protocol as P
from language_server.pool.cache import ImageCache
from language_server.pool.leases import Lease, LeaseState, Pending, RequestError
from language_server.pool.receiver import Receiver
from tests.language_server.pool.test_receiver import (
    BLOCK,
    HIDDEN,
    Image,
    Link,
    Prompt,
    _write,
)
from transfer import MultimodalDataBuffers, make_receiver


@pytest.fixture(scope="module")
def transport():
    rx = make_receiver("mooncake")
    yield rx
    rx.close()


def _key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def test_lookups_use_the_whole_digest_never_a_prefix():
    cache = ImageCache(8)
    a, b = b"\x01" * 8 + b"a" * 24, b"\x01" * 8 + b"b" * 24  # same first 8 bytes
    assert cache.insert(a, [0], 4, refs=0) is not None
    assert cache.acquire(b) is None and cache.misses == 1
    entry = cache.acquire(a)
    assert entry is not None and entry.blocks == [0] and cache.hits == 1


def test_least_recently_used_idle_residents_go_first_and_readers_pin_theirs():
    cache = ImageCache(3)
    for i, name in enumerate("abc"):
        cache.insert(_key(name), [i], 4, refs=0)
    read = cache.acquire(_key("a"))  # a: read now, and the most recently used
    assert cache.idle_blocks == 2 and cache.room_for(1) is not None  # evicts b, the oldest idle
    assert set(cache.entries) == {_key("a"), _key("c")}
    cache.insert(_key("d"), [1], 4, refs=1)
    assert cache.room_for(2) is None  # only c is idle: no room for two blocks
    assert [e.key for e in cache.evict(5)] == [_key("c")]  # a and d are read: kept
    cache.release(read)
    with pytest.raises(RuntimeError):
        cache.release(read)
    assert cache.idle_blocks == 1 and cache.evictions == 2


def _receiver(transport, blocks=8, **kw) -> Receiver:
    pool = MultimodalDataBuffers(blocks, BLOCK, HIDDEN, torch.float32, transport)
    return Receiver(pool, cache=ImageCache(blocks, pool.bytes_per_token), **kw)


def _request(rx: Receiver, link: Link, rid: str, *images: tuple[str, int]):
    """Admit a request with one image per ``(name, tokens)``; jobs go to ``link``."""
    results: list = []
    prompt = Prompt(tuple(Image(name.encode(), (1, 2, 2 * n), n) for name, n in images))
    req = Pending(rid, prompt, lambda rows, err: results.append(err or rows))
    req.leases = [Lease(req, i, n, content_key=_key(name)) for i, (name, n) in enumerate(images)]
    jobs: list = []

    def send(pending):
        for lease in pending.leases:
            if lease.state is LeaseState.WAITING and lease.blocks is not None:
                jobs.append(rx.job(lease, b"png", [1, 2, 2 * lease.n_tokens]))
                rx.sent(lease, link)

    rx.on_lent = send
    rx.admit(req)
    return req, jobs, results


def _serve(rx, link, rid, *images, seed=0):
    req, jobs, results = _request(rx, link, rid, *images)
    for k, job in enumerate(jobs):
        rx.on_message(link, _write(rx, job, seed=seed + k))
    return jobs, results


def test_a_repeated_image_is_served_from_its_resident_rows(transport):
    rx, link = _receiver(transport), Link()
    jobs, (cold,) = _serve(rx, link, "a", ("cat", 6))
    cold_rows = cold.embeds.clone(), cold.deepstack.clone()
    assert len(jobs) == 1 and cold.cached_images == 0
    assert rx.buffers.num_free == 8 - 2 and rx.cache.idle_blocks == 2  # resident, nobody reads
    jobs, (warm,) = _serve(rx, link, "b", ("cat", 6))
    assert jobs == [] and warm.cached_images == 1 and warm.cached_tokens == 6  # no job, no write
    assert torch.equal(warm.embeds, cold_rows[0]) and torch.equal(warm.deepstack, cold_rows[1])
    assert rx.buffers.num_free == 8 - 2 and not rx.lent and not rx.pending
    # a cached and a new image together: only the new one is encoded, rows in prompt order
    jobs, (mixed,) = _serve(rx, link, "c", ("dog", 3), ("cat", 6), seed=5)
    assert [j.image for j in jobs] == [0] and mixed.cached_images == 1
    assert torch.equal(mixed.embeds[3:], cold_rows[0])
    assert rx.cache.hits == 2 and rx.cache.misses == 2 and len(rx.cache) == 2


def test_eviction_under_pressure_never_takes_rows_a_request_reads(transport):
    rx, link = _receiver(transport, blocks=4), Link()
    _serve(rx, link, "a", ("cat", 8))  # 2 blocks resident
    _serve(rx, link, "b", ("dog", 8))  # 2 more: the pool is all residents now
    assert rx.buffers.num_free == 0 and rx.cache.idle_blocks == 4
    held, _, _ = _request(rx, link, "c", ("cat", 8), ("new", 4))  # cat pinned; new evicts dog
    assert held.leases[0].state is LeaseState.CACHED
    assert set(rx.cache.entries) == {_key("cat")} and rx.cache.idle_blocks == 0
    # a request that needs more than the idle residents waits; it does not take cat's blocks
    waiting, jobs, _ = _request(rx, link, "d", ("big", 12))
    assert jobs == [] and list(rx.waiting) == [waiting]
    cat_blocks = held.leases[0].blocks
    rx.fail(held, RequestError(504, "client went away"))
    # c ended: its new image's blocks are back (its writer is told to stop, they stay lent) ...
    orphan = next(iter(rx.lent.values()))
    rx.on_message(link, P.EncodeFailed(rid="c", image=1, generation=orphan.generation,
                                       stage="transfer", write_stopped=True))  # fmt: skip
    # ... and cat is idle now: evicted for d, which gets its three blocks
    assert not rx.waiting and len(rx.cache) == 0 and len(jobs) == 1
    assert set(jobs[0].blocks) & set(cat_blocks)


def test_a_request_failing_while_it_waits_lets_go_of_its_resident_rows(transport):
    rx, link = _receiver(transport, blocks=4, max_waiting=0), Link()
    _serve(rx, link, "a", ("cat", 4))
    _request(rx, link, "b", ("x", 8), ("y", 4))  # takes 3 blocks, the fourth is cat's
    with pytest.raises(RequestError, match="receive buffers are full"):
        _request(rx, link, "c", ("cat", 4), ("z", 8))  # cat is a hit, z cannot fit: 503
    assert rx.cache.idle_blocks == 1 and not rx.pending.get("c")


def test_an_image_encoded_twice_at_once_evicts_nothing_and_keeps_one_copy(transport):
    rx, link = _receiver(transport, blocks=4), Link()
    _serve(rx, link, "a", ("dog", 8))  # 2 idle resident blocks
    rx.cache.max_blocks = 3  # room for one more block of residents only
    first, jobs_1, _ = _request(rx, link, "b", ("cat", 4))
    second, jobs_2, _ = _request(rx, link, "c", ("cat", 4))  # both miss: both encode
    for job in (*jobs_1, *jobs_2):
        rx.on_message(link, _write(rx, job, seed=9))
    assert set(rx.cache.entries) == {_key("dog"), _key("cat")}  # dog not evicted for the twin
    assert rx.buffers.num_free == 4 - 3 and not rx.lent
