import pytest
import torch

from transfer import BlockAllocator, DoubleFreeError, MultimodalDataBuffers


def test_exhaustion_returns_none_and_never_overcommits():
    a = BlockAllocator(4)
    got = a.alloc(3)
    assert got == [0, 1, 2]
    assert a.alloc(2) is None
    assert a.num_free == 1
    assert a.alloc(1) == [3]
    assert a.alloc(1) is None
    assert a.num_free == 0


def test_double_free_and_bad_ids_rejected_atomically():
    a = BlockAllocator(4)
    blocks = a.alloc(2)
    a.free(blocks)
    with pytest.raises(DoubleFreeError, match="already free"):
        a.free([0])
    b = a.alloc(1)
    with pytest.raises(DoubleFreeError):
        a.free([b[0], 3])  # 3 is free: nothing may be freed
    assert a.num_free == 3
    with pytest.raises(DoubleFreeError, match="out of range"):
        a.free([9])
    with pytest.raises(DoubleFreeError, match="twice"):
        a.free([b[0], b[0]])
    a.free(b)
    assert a.num_free == 4


def test_fragmentation_prefers_a_run_then_takes_holes():
    a = BlockAllocator(10)
    blocks = a.alloc(10)
    a.free(blocks[0:1] + blocks[3:4] + blocks[6:9])  # free: 0, 3, 6, 7, 8
    assert a.alloc(3) == [6, 7, 8]  # contiguous run preferred
    a.free([6, 7, 8])
    assert a.alloc(5) == [0, 3, 6, 7, 8]  # no run of 5: lowest holes
    assert a.num_free == 0


def test_buffers_size_errors():
    buf = MultimodalDataBuffers(num_blocks=4, block_tokens=8, hidden=16)
    with pytest.raises(ValueError, match="need 5 blocks"):
        buf.alloc(33)
    assert buf.alloc(32) == [0, 1, 2, 3]
    assert buf.alloc(1) is None


def test_buffers_regions_and_gather_views():
    buf = MultimodalDataBuffers(num_blocks=6, block_tokens=4, hidden=8, dtype=torch.bfloat16)
    assert buf.embeds.shape == (24, 8) and buf.deepstack.shape == (24, 24)
    assert buf.bytes_per_token == 4 * 8 * 2
    blocks = buf.alloc(7)
    e, d = buf.gather(blocks, 7)
    assert e.shape == (7, 8) and d.shape == (7, 24)
    assert e.data_ptr() == buf.embeds.data_ptr()  # contiguous blocks: a view, no copy


def test_gather_non_contiguous_blocks_reads_each_block():
    buf = MultimodalDataBuffers(num_blocks=8, block_tokens=2, hidden=4)
    for b in range(8):
        buf.embeds[b * 2 : b * 2 + 2] = b
        buf.deepstack[b * 2 : b * 2 + 2] = 100 + b
    e, d = buf.gather([5, 1, 6, 3], 7)
    assert e[:, 0].tolist() == [5, 5, 1, 1, 6, 6, 3]
    assert d[:, 0].tolist() == [105, 105, 101, 101, 106, 106, 103]
    assert buf.block_rows([5, 6, 1, 2], 8) == [(10, 4), (2, 4)]
