"""Mooncake sender: a stalled peer delays only its own writes, and poll/release never block."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import weakref

import torch

from tests.transfer.helpers import destination, payload
from transfer import Destination, MultimodalDataBuffers, TransferState, make_receiver, make_sender

HIDDEN, ROWS = 2048, 2048  # float32: 64 MiB per request, far more than the socket buffers


def _stalling_receiver(conn) -> None:
    receiver = make_receiver("mooncake")
    buf = MultimodalDataBuffers(num_blocks=1, block_tokens=ROWS, hidden=HIDDEN, receiver=receiver)
    d = buf.describe([0])
    conn.send((d.session, d.embed_addrs, d.deepstack_addrs))
    conn.recv()  # until the test is done with us (we get SIGSTOPped meanwhile)
    del buf
    receiver.close()


def test_a_stalled_peer_delays_only_its_own_writes():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_stalling_receiver, args=(child,), daemon=True)
    proc.start()
    sender = make_sender("mooncake")
    local = make_receiver("mooncake")
    buf = MultimodalDataBuffers(num_blocks=4, block_tokens=4, hidden=8, receiver=local)
    try:
        assert parent.poll(60), "receiver process did not start"
        session, ea, da = parent.recv()
        far = Destination(session, ROWS, tuple(ea), tuple(da))
        e, d = payload(ROWS, HIDDEN, torch.float32, seed=1)
        sender.submit("hello", far, e[:4], d[:4])  # connect while the peer still answers
        assert sender.wait("hello", timeout_s=30) is TransferState.DONE
        sender.release("hello")

        os.kill(proc.pid, signal.SIGSTOP)
        sender.submit("stuck", far, e, d)
        small_e, small_d = payload(4, 8, torch.float32, seed=2)
        blocks = buf.alloc(4)
        t0 = time.perf_counter()
        sender.submit("near", destination(buf, blocks), small_e, small_d)
        assert sender.wait("near", timeout_s=20) is TransferState.DONE
        assert time.perf_counter() - t0 < 5.0
        assert torch.equal(buf.gather(blocks, 4)[1], small_d)
        assert sender.poll("stuck") is TransferState.TRANSFERRING

        t0 = time.perf_counter()
        sender.release("stuck")  # an abort: must not wait for the stalled peer
        assert time.perf_counter() - t0 < 0.5
        assert sender.poll("stuck") is TransferState.WAITING
        assert len(sender._draining) == 1  # its sources stay referenced until Mooncake stops
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        parent.send("bye")
        sender.close()  # waits until Mooncake has stopped reading the stuck write's sources
        assert sender._draining == []
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        del buf
        local.close()


def test_released_sources_live_until_the_write_ends():
    receiver = make_receiver("mooncake")
    buf = MultimodalDataBuffers(num_blocks=1, block_tokens=ROWS, hidden=HIDDEN, receiver=receiver)
    sender = make_sender("mooncake")
    try:
        e, d = payload(ROWS, HIDDEN, torch.float32, seed=3)
        want = d.clone()
        alive = weakref.ref(d)
        sender.submit("r", destination(buf, [0]), e, d)
        sender.release("r")
        del e, d  # the caller lets go at once, as the encode server does on an abort
        assert alive() is not None or torch.equal(buf.deepstack, want)
        deadline = time.monotonic() + 30
        while sender._draining and time.monotonic() < deadline:
            time.sleep(1e-3)
            sender.release("nothing")  # any call reaps finished writes
        assert sender._draining == [] and alive() is None
        assert torch.equal(buf.deepstack, want)  # the write completed into the pool
    finally:
        sender.close()
        del buf
        receiver.close()
