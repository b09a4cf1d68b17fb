"""The encoder's image cache (issue 18): a repeated image skips decode and ViT, with the same
rows; bounded in bytes, least recently used out; entries own their rows."""

from __future__ import annotations

import time

import pytest
import torch

import protocol as P
from encode_server.cache import RowCache
from encode_server.jobs import Job, Stage
from encode_server.scheduler import JobScheduler
from encode_server.staging import StagingArena


def _rows(n: int, hidden: int = 4, value: float = 0.0):
    return torch.full((n, hidden), float(value)), torch.full((n, 3 * hidden), float(value))


def test_lru_by_bytes_and_entries_own_their_rows():
    cache = RowCache(max_bytes=3 * 16 * 4 * 4)  # three images of 4 rows x (4 + 12) float32
    for i in range(3):
        cache.put(bytes([i]) * 32, (1, 4, 4), *_rows(4, value=i))
    assert len(cache) == 3 and cache.bytes == cache.max_bytes
    assert cache.get(bytes([0]) * 32) is not None  # 0 is now the most recently used
    embeds, deepstack = _rows(4, value=9)
    cache.put(b"\x09" * 32, (1, 4, 4), embeds, deepstack)
    assert cache.get(b"\x01" * 32) is None and cache.evictions == 1  # 1 was least recent
    embeds.fill_(-1)  # the caller's rows change (a staging span reused): the entry's do not
    assert torch.equal(cache.get(b"\x09" * 32).embeds, torch.full((4, 4), 9.0))
    cache.put(b"big" * 11, (1, 16, 16), *_rows(64))  # alone larger than the bound: not kept
    assert len(cache) == 3 and (cache.hits, cache.misses) == (2, 1)


def _job(encoder, data: bytes, rid: str, grid=None) -> Job:
    image = encoder.preprocess_image(data)
    n = -(-image.n_tokens // 16)
    msg = P.EncodeJob(rid=rid, image=0, data=data, grid=list(grid or image.grid),
                      n_tokens=image.n_tokens, hidden=encoder.hidden, dtype="float32",
                      generation=1, session="s", block_tokens=16, blocks=list(range(n)),
                      embed_addrs=[0] * n, deepstack_addrs=[0] * n)  # fmt: skip
    return Job(peer=b"lang", msg=msg, received_at=time.perf_counter())


@pytest.fixture()
def scheduler(encoder):
    failures: list[tuple[str, str]] = []
    arena = StagingArena(4096, encoder.hidden, torch.float32, "cpu")
    s = JobScheduler(encoder, "float32", arena, 16, 16384,
                     lambda job, stage, why: failures.append((stage, why)), RowCache(64 << 20))  # fmt: skip
    s.failures = failures  # type: ignore[attr-defined]
    return s


def _through(scheduler, job: Job) -> Job:
    scheduler.preprocess_some([job])
    scheduler.encode_batch([job])
    return job


def test_a_repeated_image_skips_decode_and_vit_with_the_same_rows(
    scheduler, encoder, make_image, encode_image, monkeypatch
):
    data = encode_image(make_image(96, 128, seed=4))
    first = _through(scheduler, _job(encoder, data, "a"))
    assert first.stage is Stage.AWAIT_READY and not first.timings().vision_cached
    cold = first.embeds.clone(), first.deepstack.clone()

    def no(*_a, **_k):
        raise AssertionError("a cached image must not be decoded or run through the ViT")

    monkeypatch.setattr(encoder, "preprocess_image", no)
    real_vision = encoder.run_vision
    monkeypatch.setattr(encoder, "run_vision", lambda images, out=None: (
        no() if images else real_vision(images, out)))  # fmt: skip
    second = _through(scheduler, _job_like(first, "b"))
    assert second.stage is Stage.AWAIT_READY and second.timings().vision_cached
    assert second.timings().vision_s == 0.0
    assert torch.equal(second.embeds, cold[0]) and torch.equal(second.deepstack, cold[1])
    assert second.staging is not None and second.staging is not first.staging  # its own span
    assert scheduler.cache.hits == 1 and not scheduler.failures


def _job_like(job: Job, rid: str) -> Job:
    msg = P.EncodeJob(**{f: getattr(job.msg, f) for f in job.msg.__struct_fields__ if f != "rid"},
                      rid=rid)  # fmt: skip
    return Job(peer=b"lang", msg=msg, received_at=time.perf_counter())


def test_a_cached_image_with_another_grid_than_the_job_expects_fails(
    scheduler, encoder, make_image, encode_image
):
    data = encode_image(make_image(64, 64, seed=5))
    _through(scheduler, _job(encoder, data, "a"))
    wrong = _job(encoder, data, "b", grid=[1, 2, 2])
    scheduler.preprocess_some([wrong])
    assert scheduler.failures and "expects [1, 2, 2]" in scheduler.failures[-1][1]
