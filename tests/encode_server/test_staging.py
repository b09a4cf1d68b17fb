"""The encoder's staging arena: spans are contiguous, disjoint, reused, and bounded."""

from __future__ import annotations

import torch

from encode_server.staging import StagingArena
from transfer import make_sender


def test_spans_are_disjoint_views_and_come_back():
    arena = StagingArena(64, hidden=8, dtype=torch.float32, device="cpu", chunk_tokens=16)
    a, b = arena.take(20), arena.take(16)  # 2 chunks + 1 chunk
    assert a is not None and b is not None and arena.free_tokens == 16
    assert a.embeds.shape == (20, 8) and a.deepstack.shape == (20, 24)
    assert a.embeds.is_contiguous() and a.deepstack.is_contiguous()
    ptrs = [(t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in (a.embeds, a.deepstack, b.embeds)]
    assert all(e1 <= s2 or e2 <= s1 for i, (s1, e1) in enumerate(ptrs) for s2, e2 in ptrs[i + 1 :])
    storage = arena.storage
    assert storage.data_ptr() <= a.embeds.data_ptr() < storage.data_ptr() + storage.numel() * 4
    assert arena.take(32) is None, "no room: the caller must wait"
    assert arena.fits(64) and not arena.fits(65)
    arena.give_back(a)
    c = arena.take(32)
    assert c is not None and c.embeds.data_ptr() == a.embeds.data_ptr()


def test_the_arena_is_registered_once_with_the_transport():
    sender = make_sender("mooncake")
    try:
        arena = StagingArena(32, hidden=8, dtype=torch.float32, device="cpu", sender=sender)
        assert [start for start, _, _ in sender._arenas] == [arena.storage.data_ptr()]
    finally:
        sender.close()
