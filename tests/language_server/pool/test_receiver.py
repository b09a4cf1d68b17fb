"""The receiver's block lifetimes (transfer/base.py, rule 2), one rule per test, on a real pool
registered with Mooncake; rows are written into it directly, as a writer's transport would."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch

import protocol as P
from language_server.pool.leases import Lease, LeaseState, Pending, RequestError
from language_server.pool.receiver import Receiver
from transfer import MultimodalDataBuffers, make_receiver, rows_checksum

HIDDEN, BLOCK = 8, 4


@dataclass(eq=False)
class Link:
    """The receiver's view of an encoder: what it sends there is recorded."""

    incarnation: int = 7
    address: str = "tcp://encoder"
    served: int = 0
    inflight: set = field(default_factory=set)
    sent: list = field(default_factory=list)

    def send(self, msg, quiet=False):
        self.sent.append(msg)
        return True


@dataclass(frozen=True)
class Image:
    data: bytes
    grid: tuple
    n_tokens: int
    kind: str = "image"


@dataclass(frozen=True)
class Prompt:
    images: tuple
    input_ids: torch.Tensor = torch.zeros(1, dtype=torch.long)
    positions: torch.Tensor = torch.zeros(3, 1, dtype=torch.long)
    visual_mask: torch.Tensor = torch.zeros(1, dtype=torch.bool)
    image_grid_thw: torch.Tensor = torch.zeros(0, 3, dtype=torch.long)
    video_grid_thw: torch.Tensor = torch.zeros(0, 3, dtype=torch.long)


class Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


@pytest.fixture(scope="module")
def transport():
    rx = make_receiver("mooncake")
    yield rx
    rx.close()


def _receiver(transport, blocks=8, **kw) -> Receiver:
    return Receiver(MultimodalDataBuffers(blocks, BLOCK, HIDDEN, torch.float32, transport), **kw)


def _request(rx: Receiver, link: Link, rid: str, *tokens: int):
    """Admit a request with one image per entry of ``tokens``; send its jobs to ``link``."""
    results: list = []
    prompt = Prompt(tuple(Image(b"png", (1, 2, 2 * n), n) for n in tokens))
    req = Pending(rid, prompt, lambda rows, err: results.append(err or rows.embeds.clone()))
    req.leases = [Lease(req, i, n) for i, n in enumerate(tokens)]
    sent: dict = rx.__dict__.setdefault("test_jobs", {})  # rid -> its EncodeJobs, once lent

    def send(pending):
        for lease in pending.leases:
            sent.setdefault(pending.rid, []).append(
                rx.job(lease, b"png", [1, 2, 2 * lease.n_tokens])
            )
            rx.sent(lease, link)

    rx.on_lent = send
    rx.admit(req)
    return req, sent.setdefault(rid, []), results


def _write(rx: Receiver, job: P.EncodeJob, seed: int) -> P.TransferDone:
    g = torch.Generator().manual_seed(seed)
    e, d = (
        torch.randn(job.n_tokens, HIDDEN, generator=g),
        torch.randn(job.n_tokens, 3 * HIDDEN, generator=g),
    )
    for i, b in enumerate(job.blocks):
        rows = slice(i * BLOCK, min((i + 1) * BLOCK, job.n_tokens))
        n = rows.stop - rows.start
        rx.buffers.embeds[b * BLOCK : b * BLOCK + n] = e[rows]
        rx.buffers.deepstack[b * BLOCK : b * BLOCK + n] = d[rows]
    return P.TransferDone(rid=job.rid, image=job.image, generation=job.generation,
                          n_tokens=job.n_tokens, checksum=rows_checksum(e, d, BLOCK))  # fmt: skip


def test_a_requests_images_get_blocks_together_or_wait(transport):
    rx, link = _receiver(transport, blocks=4), Link()
    _, jobs_a, _ = _request(rx, link, "a", 6, 4)  # 2 + 1 blocks
    assert [len(j.blocks) for j in jobs_a] == [2, 1] and rx.buffers.num_free == 1
    req_b, jobs_b, _ = _request(rx, link, "b", 4, 4)  # needs 2: waits, takes none
    assert jobs_b == [] and rx.buffers.num_free == 1 and list(rx.waiting) == [req_b]
    with pytest.raises(RequestError, match="need 5 blocks") as err:
        _request(rx, link, "c", 20)
    assert err.value.status == 413
    for k, job in enumerate(jobs_a):  # A's rows arrive; its blocks return; B gets its two
        rx.on_message(link, _write(rx, job, seed=k))
    assert [len(j.blocks) for j in jobs_b] == [1, 1] and not rx.waiting
    assert rx.buffers.num_free == 2


def test_rule_a_rows_verified_and_copied_then_blocks_return(transport):
    event = Event()
    rx, link = _receiver(transport, copy_event=lambda: event), Link()
    _, jobs, results = _request(rx, link, "a", 6, 3)
    for k, job in enumerate(jobs):
        rx.on_message(link, _write(rx, job, seed=k))
    assert len(results) == 1 and results[0].shape == (9, HIDDEN)
    assert rx.buffers.num_free == 8 - 3, "freed while the copy out of them may still run"
    event.done = True
    rx.tick()
    assert rx.buffers.num_free == 8 and not rx.lent and link.served == 2


def test_rule_b_failed_request_keeps_blocks_until_the_writer_says_stopped(transport):
    rx, link = _receiver(transport), Link()
    req, (job,), results = _request(rx, link, "a", 8)
    rx.fail(req, RequestError(504, "timeout"))
    assert results and results[0].status == 504
    assert isinstance(link.sent[-1], P.Abort) and link.sent[-1].image == 0
    time.sleep(0.05)
    rx.tick()
    assert rx.buffers.num_free == 6 and rx.orphaned_blocks == 2  # no timer frees them
    failed = dict(rid="a", image=0, generation=job.generation, stage="transfer")
    rx.on_message(link, P.EncodeFailed(**failed, write_stopped=False))
    assert rx.buffers.num_free == 6
    rx.on_message(Link(), P.EncodeFailed(**failed))  # another encoder cannot free them
    assert rx.buffers.num_free == 6
    rx.on_message(link, P.EncodeFailed(**failed, write_stopped=True))
    assert rx.buffers.num_free == 8 and not rx.lent


def test_rule_b_an_encoder_failure_report_ends_the_request(transport):
    rx, link = _receiver(transport), Link()
    _, (job,), results = _request(rx, link, "a", 4)
    rx.on_message(link, P.EncodeFailed(rid="a", image=0, generation=job.generation,
                                       stage="preprocess", reason="grid differs"))  # fmt: skip
    assert results[0].status == 400 and rx.buffers.num_free == 8
    assert not [m for m in link.sent if isinstance(m, P.Abort)]  # it already stopped


def test_rule_c_restart_frees_at_once_death_after_the_transport_timeout(transport):
    rx, link = _receiver(transport, dead_writer_s=0.2), Link()
    req, (job,), _ = _request(rx, link, "a", 8)
    rx.writer_dead(req.leases[0])
    assert req.leases[0].state is LeaseState.WAITING and rx.buffers.num_free == 6
    rx.tick()
    assert rx.buffers.num_free == 6  # it may still write until the transport's timeout
    time.sleep(0.25)
    rx.tick()
    assert rx.buffers.num_free == 8
    # a restart: the old process's jobs cannot write any more
    rx2, link2 = _receiver(transport), Link()
    req2, _, _ = _request(rx2, link2, "b", 8, 4)
    link2.incarnation = 8
    assert rx2.writer_restarted(link2) == [req2]
    assert rx2.buffers.num_free == 8 and all(x.state is LeaseState.WAITING for x in req2.leases)


def test_stale_generation_and_wrong_link_are_dropped(transport):
    rx, link = _receiver(transport), Link()
    _, (job,), results = _request(rx, link, "a", 4)
    done = _write(rx, job, seed=1)
    rx.on_message(link, P.TransferDone(rid="a", image=0, generation=job.generation + 1,
                                       n_tokens=4, checksum=done.checksum))  # fmt: skip
    rx.on_message(Link(), done)
    assert rx.dropped_messages == 2 and not results
    rx.on_message(link, done)
    assert len(results) == 1 and rx.buffers.num_free == 8


# --- the pool in another process (--engine sglang): verified there, released by the engine ---


def test_a_pool_elsewhere_is_verified_by_its_host_and_held_until_released():
    """The Receiver lends a memory-less ``PoolLayout``; the pool's host (here in this process,
    on the real channel and the shm transport) checks each image's rows in place; the rows are
    handed over as pool runs and the blocks come back only on ``release``. Rows that do not
    match fail the request with 502 and every block comes back."""
    import asyncio

    from language_server.engines.sglang.models.pool_host import PoolHost
    from language_server.pool.host_link import PoolHostLink
    from language_server.pool.leases import ReceivedPrompt
    from transfer.buffers import PoolLayout

    async def until(cond, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    async def main():
        door = PoolHostLink()
        spec = {"address": door.address, "transport": "shm", "num_blocks": 8,
                "block_tokens": BLOCK, "dtype": "float32"}  # fmt: skip
        host = PoolHost(spec, HIDDEN, "cpu")
        try:
            door.wait_hello(10)
            door.start()
            rx = Receiver(PoolLayout.from_hello(door.hello), host=door)
            assert not rx.local and not hasattr(rx.buffers, "embeds")
            link, results, written, reqs = Link(), [], {}, {}
            for rid, tokens, corrupt in [("a", (6, 3), False), ("b", (5,), True)]:
                req = Pending(rid, Prompt(tuple(Image(b"png", (1, 2, 2 * n), n) for n in tokens)),
                              lambda rows, err: results.append(err or rows))  # fmt: skip
                req.leases = [Lease(req, i, n) for i, n in enumerate(tokens)]
                reqs[rid] = req
                rx.on_lent = lambda p: [rx.sent(x, link) for x in p.leases]
                rx.admit(req)
                written[rid] = []
                for k, lease in enumerate(req.leases):
                    job = rx.job(lease, b"png", [1, 2, 2 * lease.n_tokens])
                    done, e, d = _write_into(host.buffers, job, seed=k)
                    written[rid].append(e)
                    if corrupt:
                        host.buffers.embeds[job.blocks[0] * BLOCK] += 1.0
                    rx.on_message(link, done)
                want = len(results) + 1
                await until(lambda want=want: len(results) == want)
            ready, failed = results
            assert isinstance(ready, ReceivedPrompt) and ready.embeds is None
            assert ready.n_visual == 9 and sum(n for _, n in ready.pool_runs) == 9
            rows = torch.cat([host.buffers.embeds[r : r + n] for r, n in ready.pool_runs])
            assert torch.equal(rows, torch.cat(written["a"]))  # in image order
            assert isinstance(failed, RequestError) and failed.status == 502
            assert "do not match the sender's checksum" in failed.message
            assert rx.buffers.num_free == 8 - 3  # a's blocks: handed to the engine
            assert rx.handed_blocks == 3 and rx.lent_blocks == 0
            # nothing an encoder says now can take them back (a late or forged report)
            lease = reqs["a"].leases[0]
            rx.on_message(link, P.EncodeFailed(rid="a", image=0, generation=lease.generation,
                                               stage="transfer", write_stopped=True))  # fmt: skip
            assert rx.buffers.num_free == 8 - 3 and rx.dropped_messages == 1
            ready.release()
            ready.release()  # idempotent
            assert rx.buffers.num_free == 8 and not rx.lent and not rx.handed
            assert (await door.stats()).verified == 3
        finally:
            await door.stop()
            host.transport.close()
            door.close()

    asyncio.run(main())


def _write_into(pool, job: P.EncodeJob, seed: int):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(job.n_tokens, HIDDEN, generator=g)
    d = torch.randn(job.n_tokens, 3 * HIDDEN, generator=g)
    for i, b in enumerate(job.blocks):
        rows = slice(i * BLOCK, min((i + 1) * BLOCK, job.n_tokens))
        n = rows.stop - rows.start
        pool.embeds[b * BLOCK : b * BLOCK + n] = e[rows]
        pool.deepstack[b * BLOCK : b * BLOCK + n] = d[rows]
    done = P.TransferDone(rid=job.rid, image=job.image, generation=job.generation,
                          n_tokens=job.n_tokens, checksum=rows_checksum(e, d, BLOCK))  # fmt: skip
    return done, e, d
