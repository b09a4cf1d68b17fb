"""One contract suite, run against every transfer backend."""

import multiprocessing as mp
import select
import time

import pytest
import torch

from tests.transfer.helpers import destination, fragment, payload
from transfer import (
    MultimodalDataBuffers,
    TransferError,
    TransferState,
    make_receiver,
    make_sender,
    rows_checksum,
)


@pytest.fixture
def pool(backend):
    receiver = make_receiver(backend)
    buf = MultimodalDataBuffers(num_blocks=12, block_tokens=4, hidden=8, receiver=receiver)
    yield buf
    del buf
    receiver.close()


@pytest.fixture
def sender(backend):
    s = make_sender(backend)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_request_arrives_intact(backend, dtype):
    receiver = make_receiver(backend)
    buf = MultimodalDataBuffers(
        num_blocks=12, block_tokens=4, hidden=8, dtype=dtype, receiver=receiver
    )
    sender = make_sender(backend)
    try:
        blocks = fragment(buf, 15)  # 4 blocks, the last one partial
        e, d = payload(15, 8, dtype, seed=1)
        buf.embeds.fill_(-7)
        sender.submit("r1", destination(buf, blocks), e, d)
        assert sender.wait("r1", timeout_s=20) is TransferState.DONE
        got_e, got_d = buf.gather(blocks, 15)
        assert torch.equal(got_e, e) and torch.equal(got_d, d)
        assert rows_checksum(got_e, got_d, 4) == rows_checksum(e, d, 4)
        # the unused tail of the last block was not written
        last = blocks[-1] * 4 + 3
        assert torch.all(buf.embeds[last] == -7)
        sender.release("r1")
        sender.release("r1")  # idempotent
        assert sender.poll("r1") is TransferState.WAITING
    finally:
        sender.close()
        del buf
        receiver.close()


def test_contiguous_blocks_coalesce_into_one_segment(pool, sender):
    blocks = pool.alloc(12)
    dest = destination(pool, blocks)
    e, d = payload(12, 8, torch.float32, seed=2)
    from transfer import plan_segments

    assert len(plan_segments(dest, 12, 8 * 4, 24 * 4)) == 1
    sender.submit("c", dest, e, d)
    assert sender.wait("c") is TransferState.DONE
    assert torch.equal(pool.gather(blocks, 12)[1], d)


def test_poll_never_blocks_and_the_end_is_seen(backend, sender):
    """A 64 MiB write: poll answers at once while it runs (Mooncake's batch status call
    blocks until the end; ours must not), and a sender with a completion fd makes it
    readable when the write ends, so that a loop can sleep on it."""
    receiver = make_receiver(backend)
    hidden, n = 2048, 2048  # float32: 64 MiB in all
    buf = MultimodalDataBuffers(num_blocks=1, block_tokens=n, hidden=hidden, receiver=receiver)
    try:
        e, d = payload(n, hidden, torch.float32, seed=5)
        fd = sender.completion_fd
        start = time.perf_counter()
        sender.submit("big", destination(buf, [0]), e, d)
        t0 = time.perf_counter()
        state = sender.poll("big")
        first_poll_s = time.perf_counter() - t0
        wakeups = 0
        while not state.terminal:
            if fd is None:
                time.sleep(1e-3)
            else:
                assert select.select([fd], [], [], 30)[0], "the completion fd never fired"
                sender.drain_completions()
            state, wakeups = sender.poll("big"), wakeups + 1
            assert time.perf_counter() - start < 60
        total_s = time.perf_counter() - start
        assert state is TransferState.DONE
        assert first_poll_s < 0.25 * total_s, (first_poll_s, total_s)
        if fd is not None:
            assert wakeups <= 2  # woken by the fd, not by spinning
        assert torch.equal(buf.gather([0], n)[1], d)
        sender.release("big")
    finally:
        del buf
        receiver.close()


def test_empty_request_is_done_at_once(pool, sender):
    e, d = payload(0, 8, torch.float32, seed=0)
    sender.submit("empty", destination(pool, []), e, d)
    assert sender.poll("empty") is TransferState.DONE


def test_bad_shapes_and_duplicate_rid_rejected(pool, sender):
    blocks = pool.alloc(4)
    e, d = payload(4, 8, torch.float32, seed=3)
    with pytest.raises(TransferError, match="mismatch"):
        sender.submit("x", destination(pool, blocks), e, d[:, :8])
    with pytest.raises(TransferError, match="blocks"):
        sender.submit("x", destination(pool, blocks), *payload(5, 8, torch.float32, seed=3))
    sender.submit("x", destination(pool, blocks), e, d)
    with pytest.raises(TransferError, match="already submitted"):
        sender.submit("x", destination(pool, blocks), e, d)
    sender.wait("x")


def test_write_outside_the_registered_pool_fails(pool, sender):
    blocks = pool.alloc(4)
    good = destination(pool, blocks)
    bad = type(good)(good.session, 4, (good.embed_addrs[0] + (1 << 30),), good.deepstack_addrs)
    e, d = payload(4, 8, torch.float32, seed=4)
    try:
        sender.submit("oob", bad, e, d)
    except TransferError:
        return
    assert sender.wait("oob", timeout_s=20) is TransferState.FAILED
    sender.release("oob")


def _receiver_proc(backend: str, conn) -> None:
    receiver = make_receiver(backend)
    buf = MultimodalDataBuffers(
        num_blocks=16, block_tokens=8, hidden=16, dtype=torch.bfloat16, receiver=receiver
    )
    blocks = fragment(buf, 30)
    d = buf.describe(blocks)
    conn.send((blocks, d.session, d.embed_addrs, d.deepstack_addrs))
    checksum = conn.recv()
    e, ds = buf.gather(blocks, 30)
    want_e, want_d = payload(30, 16, torch.bfloat16, seed=11)
    conn.send(
        (torch.equal(e, want_e), torch.equal(ds, want_d), rows_checksum(e, ds, 8) == checksum)
    )
    del e, ds, buf
    receiver.close()


def test_across_two_processes(backend):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_proc, args=(backend, child), daemon=True)
    proc.start()
    sender = make_sender(backend)
    try:
        assert parent.poll(60), "receiver process did not start"
        blocks, session, ea, da = parent.recv()
        from transfer import Destination

        e, d = payload(30, 16, torch.bfloat16, seed=11)
        sender.submit("x", Destination(session, 8, tuple(ea), tuple(da)), e, d)
        assert sender.wait("x", timeout_s=30) is TransferState.DONE
        parent.send(rows_checksum(e, d, 8))
        assert parent.poll(30)
        assert parent.recv() == (True, True, True)
    finally:
        sender.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_unreachable_receiver_fails_cleanly(backend, sender):
    from transfer import Destination

    session = {"mooncake": "127.0.0.1:1", "shm": "shm://epd-does-not-exist"}[backend]
    e, d = payload(4, 8, torch.float32, seed=5)
    try:
        sender.submit("gone", Destination(session, 4, (4096,), (8192,)), e, d)
    except TransferError:
        assert sender.poll("gone") is TransferState.WAITING  # nothing kept
        return
    assert sender.wait("gone", timeout_s=20) is TransferState.FAILED
    sender.release("gone")
    assert sender.poll("gone") is TransferState.WAITING


@pytest.mark.parametrize("mode", ["per-request", "arena"])
def test_mooncake_registered_sources(mode):
    """The RDMA code path: sources registered per request, or inside a registered arena."""
    receiver = make_receiver("mooncake")
    buf = MultimodalDataBuffers(num_blocks=8, block_tokens=4, hidden=8, receiver=receiver)
    sender = make_sender("mooncake", register_sources=True)
    try:
        arena = torch.empty(4 * 8 * 4 * 4, dtype=torch.uint8)
        e, d = payload(4, 8, torch.float32, seed=6)
        if mode == "arena":
            sender.register_arena(arena)
            e = arena[: e.numel() * 4].view(torch.float32).view(4, 8).copy_(e)
            d = arena[e.numel() * 4 :].view(torch.float32).view(4, 24).copy_(d)
        blocks = buf.alloc(4)
        sender.submit("reg", destination(buf, blocks), e, d)
        entry = sender._inflight["reg"]
        assert len(entry.registered) == (0 if mode == "arena" else 2)
        assert sender.wait("reg") is TransferState.DONE
        sender.release("reg")
        assert entry.registered == [] and sender._draining == []
        assert torch.equal(buf.gather(blocks, 4)[0], e)
    finally:
        sender.close()
        del buf
        receiver.close()


def test_shm_sender_unmaps_a_restarted_receivers_old_pool():
    sender = make_sender("shm")
    try:
        names = []
        for seed in (7, 8):  # a receiver, then its replacement after a "restart"
            receiver = make_receiver("shm")
            buf = MultimodalDataBuffers(num_blocks=4, block_tokens=4, hidden=8, receiver=receiver)
            e, d = payload(4, 8, torch.float32, seed=seed)
            sender.submit(f"r{seed}", destination(buf, buf.alloc(4)), e, d)
            assert sender.wait(f"r{seed}") is TransferState.DONE
            sender.release(f"r{seed}")
            names.append(receiver.session.removeprefix("shm://"))
            del buf
            receiver.close()
        assert names[0] not in sender._maps  # dropped when the second pool was attached
    finally:
        sender.close()
